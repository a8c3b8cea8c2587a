# chatvec eval's worker: run by `chatvec eval` in the interpreter it was
# given (--python / CHATVEC_PYTHON), the spec as JSON on stdin, progress as
# "chatvec-eval: " lines on stderr, the results as one JSON line on stdout.
import json
import sys
import time


# Conversations (or prompts) computed together: one forward per batch
# (the spec's "batch", --batch-size).
BATCH = 16


def progress(**kw):
    print("chatvec-eval: " + json.dumps(kw), file=sys.stderr, flush=True)


try:
    # A language-ID model, where installed, tells apart languages that
    # share a script (German from English); else script decides ja/en.
    import py3langid as _langid
except ImportError:
    _langid = None


def script_lang(text):
    """'ja' when kana/kanji outnumber Latin letters, 'en' the other way."""
    ja = sum(
        1
        for ch in text
        if "\u3040" <= ch <= "\u30ff" or "\u3400" <= ch <= "\u4dbf" or "\u4e00" <= ch <= "\u9fff" or "\uff66" <= ch <= "\uff9f"
    )
    latin = sum(1 for ch in text if "a" <= ch.lower() <= "z")
    if ja == 0 and latin == 0:
        return None
    return "ja" if ja >= latin else "en"


def lang_of(text):
    """The language of `text` (an ISO 639-1 code), or None for no letters."""
    if script_lang(text) is None:
        return None
    if _langid is not None:
        return _langid.classify(text)[0]
    return script_lang(text)


def judgeable(want):
    """Whether answers can be judged for language `want` here: any with a
    language-ID model, else only ja and en (told apart by script)."""
    return want is not None and (_langid is not None or want in ("ja", "en"))


def ids_of(tok, msgs, prompt):
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt, return_dict=True)
    return list(out["input_ids"])


def assistant_labels(tok, conv):
    """Token ids of the whole conversation, and labels that keep only the
    assistant turns: for each, the tokens between the conversation up to it
    with the generation prompt and the conversation through it (its reply
    and end-of-turn), as TRL's assistant-only masks cover."""
    full = ids_of(tok, conv, False)
    labels = [-100] * len(full)
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        before, upto = ids_of(tok, conv[:i], True), ids_of(tok, conv[: i + 1], False)
        if upto[: len(before)] != before or full[: len(upto)] != upto:
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        for j in range(len(before), len(upto)):
            labels[j] = full[j]
    return full, labels


class Generator:
    """Answers conversations with one model: vLLM when it was loaded, else
    transformers with batched generation (left padding, one forward per
    step for the whole batch). Rows of one batch share a temperature;
    sampled rows are seeded, so a rerun gives the same answers."""

    def __init__(self, tok, model, llm, eos, dev, chat_template):
        self.tok, self.model, self.llm, self.eos, self.dev = tok, model, llm, eos, dev
        self.chat_template = chat_template
        self.bench_tokens = 0

    def run(self, convs, k, temperatures, seeds, report):
        out = [None] * len(convs)
        if not convs:
            return out
        if self.llm is not None:
            from vllm import SamplingParams

            params = [SamplingParams(temperature=t, max_tokens=k, seed=s) for t, s in zip(temperatures, seeds)]
            res = self.llm.chat(convs, params, chat_template=self.chat_template)
            for i, o in enumerate(res):
                c = o.outputs[0]
                out[i] = (c.text.strip(), c.finish_reason == "stop", len(c.token_ids))
            report(len(convs))
            return out
        import torch

        tok, eos = self.tok, self.eos
        pad = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
        encoded = [ids_of(tok, c, True) for c in convs]
        # Same-temperature rows batched together, each group in order.
        groups = {}
        for i, t in enumerate(temperatures):
            groups.setdefault(t, []).append(i)
        done = 0
        for temp in sorted(groups):
            rows = groups[temp]
            for start in range(0, len(rows), BATCH):
                group = rows[start : start + BATCH]
                part = [encoded[i] for i in group]
                width = max(len(x) for x in part)
                ids = torch.full((len(part), width), pad, dtype=torch.long)
                mask = torch.zeros((len(part), width), dtype=torch.long)
                for row, x in enumerate(part):
                    ids[row, width - len(x) :] = torch.tensor(x)
                    mask[row, width - len(x) :] = 1
                kw = {"do_sample": False}
                if temp > 0:
                    torch.manual_seed(seeds[group[0]])
                    kw = {"do_sample": True, "temperature": temp, "top_p": 1.0, "top_k": 0}
                with torch.no_grad():
                    gen = self.model.generate(
                        ids.to(self.dev), attention_mask=mask.to(self.dev), max_new_tokens=k, pad_token_id=pad, **kw
                    )
                for row, i in enumerate(group):
                    new = gen[row][width:].tolist()
                    cut = next((j for j, t in enumerate(new) if t in eos), None)
                    stopped = cut is not None
                    if stopped:
                        new = new[:cut]
                    out[i] = (tok.decode(new, skip_special_tokens=True).strip(), stopped, len(new))
                done += len(group)
                report(done)
        return out


def main():
    global BATCH
    spec = json.loads(sys.stdin.read())
    BATCH = int(spec.get("batch") or BATCH)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    engine = spec["engine"]
    if engine == "auto":
        try:
            import vllm  # noqa: F401

            engine = "vllm" if gpus > 0 else "transformers"
        except ImportError:
            engine = "transformers"
    k = spec["max_new_tokens"]

    def done(result):
        # One line per model as soon as it is scored, so chatvec keeps what
        # an interrupted run finished.
        print(json.dumps({"result": result}), flush=True)

    for mi, m in enumerate(spec["models"]):
        tok = AutoTokenizer.from_pretrained(m["path"])
        if m.get("chat_template"):
            # --chat-template, for a model without its own.
            tok.chat_template = m["chat_template"]
        kwargs = {"dtype": torch.bfloat16 if gpus else torch.float32}
        if gpus > 1:
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(m["path"], **kwargs)
        if gpus == 1:
            model = model.to("cuda")
        model.eval()
        dev = next(model.parameters()).device
        # LM loss on text in the continued-pretraining language: what the
        # merge may have cost the language the base was taught. Each
        # document's summed NLL over its tokens after the first.
        lm = []
        texts = spec.get("lm_texts") or []
        for start in range(0, len(texts), BATCH):
            part = [tok(t)["input_ids"][: spec["lm_max_tokens"]] for t in texts[start : start + BATCH]]
            width = max(len(x) for x in part)
            ids = torch.zeros((len(part), width), dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for row, x in enumerate(part):
                ids[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = 1
            with torch.no_grad():
                logits = model(ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            for row, x in enumerate(part):
                if len(x) < 2:
                    lm.append([0.0, 0])
                    continue
                logp = torch.log_softmax(logits[row, : len(x) - 1], dim=-1)
                target = torch.tensor(x[1:], device=logp.device)
                lm.append([-logp[torch.arange(len(x) - 1, device=logp.device), target].double().sum().item(), len(x) - 1])
            progress(model=mi, stage="lm", done=min(start + BATCH, len(texts)), total=len(texts))
        if not m.get("chat", True):
            # The reference for the LM loss only: no chat template to use.
            done({"model": m["path"], "engine": engine, "lm_losses": lm, "answers": []})
            continue
        # Assistant-token loss: summed NLL over every assistant token, then
        # one mean (token-weighted).
        nll, count = 0.0, 0
        per_conversation = []
        convs = spec["conversations"]
        labelled = [assistant_labels(tok, conv) for conv in convs]
        # Batched: right-padded, one forward per batch; each conversation's
        # summed NLL over its own assistant tokens, as one at a time gives.
        for start in range(0, len(labelled), BATCH):
            part = labelled[start : start + BATCH]
            width = max(len(full) for full, _ in part)
            ids = torch.zeros((len(part), width), dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for row, (full, _) in enumerate(part):
                ids[row, : len(full)] = torch.tensor(full)
                mask[row, : len(full)] = 1
            with torch.no_grad():
                logits = model(ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            for row, (full, labels) in enumerate(part):
                logp = torch.log_softmax(logits[row, : len(full) - 1], dim=-1)
                target = torch.tensor(labels[1:], device=logp.device)
                keep = (target != -100).nonzero().squeeze(-1)
                one = -logp[keep, target[keep]].double().sum().item()
                nll += one
                count += int(keep.numel())
                per_conversation.append([one, int(keep.numel())])
            progress(model=mi, stage="loss", done=min(start + BATCH, len(convs)), total=len(convs))
        # Generations: greedy, stopping where the model's own generation
        # config says (a missing eos there is the bug this catches).
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        prompts = spec["prompts"]
        llm = None
        if engine == "vllm":
            from vllm import LLM

            del model
            model = None
            llm = LLM(model=m["path"], tensor_parallel_size=max(gpus, 1), dtype="bfloat16")
        gen = Generator(tok, model, llm, eos, dev, m.get("chat_template"))
        started = time.perf_counter()
        answers = gen.run([p["messages"] for p in prompts], k, [0.0] * len(prompts), [0] * len(prompts),
                          lambda d: progress(model=mi, stage="generate", done=d, total=len(prompts)))
        # Benchmark answers, turn by turn: each turn's prompt is the
        # conversation so far, the model's own earlier answers included.
        items = spec.get("bench") or []
        bench_answers = [[] for _ in items]
        turns = max((len(x["turns"]) for x in items), default=0)
        total = sum(len(x["turns"]) for x in items)
        finished = 0
        for t in range(turns):
            live = [i for i, x in enumerate(items) if len(x["turns"]) > t]
            convs = []
            for i in live:
                conv = []
                for u, a in zip(items[i]["turns"][:t], bench_answers[i]):
                    conv += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                conv.append({"role": "user", "content": items[i]["turns"][t]})
                convs.append(conv)
            base = finished

            def turn_progress(d, base=base):
                progress(model=mi, stage="bench", done=base + d, total=total)

            outs = gen.run(convs, spec["bench_max_new_tokens"], [items[i]["temperature"] for i in live],
                           [items[i]["seed"] + t for i in live], turn_progress)
            for i, (text, _stopped, n) in zip(live, outs):
                bench_answers[i].append(text)
                gen.bench_tokens += n
            finished += len(live)
        # Generation's own time and tokens (loading and scoring excluded),
        # for tokens per second.
        generated = {
            "seconds": time.perf_counter() - started,
            "tokens": sum(n for _, _, n in answers) + gen.bench_tokens,
            "batch": BATCH,
        }
        rows = []
        unjudged = set()
        for p, (text, stopped, n) in zip(prompts, answers):
            want = p.get("lang") or lang_of(" ".join(x["content"] for x in p["messages"] if x["role"] == "user"))
            if want is not None and not judgeable(want):
                unjudged.add(want)
                want = None
            rows.append({"answer": text, "stopped": stopped, "tokens": n, "lang": lang_of(text), "want": want})
        for w in sorted(unjudged):
            print(f"no language-ID model here (pip install py3langid): answers to '{w}' prompts are not judged for language", file=sys.stderr)
        done(
            {
                "model": m["path"],
                "engine": engine,
                "assistant_loss": nll / count if count else None,
                "assistant_tokens": count,
                "conversation_losses": per_conversation,
                "lm_losses": lm,
                "answers": rows,
                "bench_answers": bench_answers,
                "language_id": "py3langid" if _langid is not None else "script",
                "generation": generated,
            }
        )


if __name__ == "__main__":
    main()
