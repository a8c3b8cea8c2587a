# chatvec sft's assistant masks for chat templates that neither chatvec nor
# TRL can mark with {% generation %}: each conversation of the run's data
# files is tokenized with the model's tokenizer and template, and a token is
# in the loss exactly when it lies between the conversation up to a reply
# with the generation prompt and the conversation through that reply (the
# reply and its end-of-turn), which is what generation markers cover. The
# template must render each conversation as a prefix of its continuation:
# a conversation where it does not is refused by its line number.
#
#     python -I premask.py MODEL_DIR TEMPLATE_FILE DATA_FILE...
# Each DATA_FILE (JSONL of {"messages": [...]}) is rewritten as JSONL of
# {"input_ids": [...], "assistant_masks": [...]}; one JSON line on stdout
# says what was done, or which line failed and why.
import json
import os
import sys


def main():
    model, template_file, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    with open(template_file) as f:
        tok.chat_template = f.read()

    def ids(msgs, prompt):
        out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt, return_dict=True)
        return list(out["input_ids"])

    counts = {}
    for path in files:
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                conv = json.loads(line)["messages"]
                full = ids(conv, False)
                mask = [0] * len(full)
                for i, m in enumerate(conv):
                    if m["role"] != "assistant":
                        continue
                    before, upto = ids(conv[:i], True), ids(conv[: i + 1], False)
                    if upto[: len(before)] != before or full[: len(upto)] != upto:
                        first = next((x["content"] for x in conv if x["role"] == "user"), "")[:80]
                        print(json.dumps({"error": f"the conversation starting {first!r} (example {n} of {os.path.basename(path)}): the chat template does not render it up to reply {i + 1} as a prefix of its continuation, so the reply's tokens cannot be told apart"}))
                        return 1
                    for j in range(len(before), len(upto)):
                        mask[j] = 1
                if 1 not in mask:
                    print(json.dumps({"error": f"{os.path.basename(path)} line {n}: no assistant token to train on"}))
                    return 1
                rows.append(json.dumps({"input_ids": full, "assistant_masks": mask}))
        tmp = path + ".premask"
        with open(tmp, "w") as f:
            f.write("\n".join(rows) + "\n")
        os.replace(tmp, path)
        counts[os.path.basename(path)] = len(rows)
    print(json.dumps({"ok": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
