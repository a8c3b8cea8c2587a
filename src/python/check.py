# chatvec's environment check, run isolated (python -I) from a file chatvec
# writes: the versions of the packages a job needs and whether a GPU is
# visible, as one JSON line on stdout; never a traceback. With a spec on
# stdin, also whether TRL patches a chat template for assistant-only loss
# and whether chatvec's marked copy renders the same text.
import importlib, json, sys
out = {"python": sys.version.split()[0], "packages": {}, "cuda_devices": 0}
for name in sys.argv[1:]:
    try:
        out["packages"][name] = getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception as e:
        out["packages"][name] = None
try:
    import torch
    out["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
except Exception:
    pass
spec = json.loads(sys.stdin.read() or "null")
if spec:
    # Would TRL patch this chat template for assistant-only loss itself?
    tok = None
    try:
        from transformers import AutoTokenizer
        from trl.chat_template_utils import get_training_chat_template
        tok = AutoTokenizer.from_pretrained(spec["model"])
        tok.chat_template = spec["template"]
        get_training_chat_template(tok)
        out["trl_patches_template"] = True
    except Exception as e:
        out["trl_patches_template"] = False
        out["template_error"] = str(e)[:400]
    # chatvec's copy with markers: the same text for every conversation,
    # and the assistant's reply inside the mask.
    marked = spec.get("marked")
    if marked and tok is not None:
        def render(t, conv, prompt):
            try:
                return tok.apply_chat_template(conv, chat_template=t, tokenize=False, add_generation_prompt=prompt)
            except Exception as e:
                return "raises " + type(e).__name__
        u = lambda c: {"role": "user", "content": c}
        a = lambda c: {"role": "assistant", "content": c}
        convs = [[u("Hi"), a("Hello there.")], [u("A?"), a("B."), u("C?"), a("D.")],
                 [{"role": "system", "content": "Be brief."}, u("A?"), a("B.")], [u("Hi")]]
        try:
            same = all(render(spec["template"], c, p) == render(marked, c, p) for c in convs for p in (False, True))
            enc = tok.apply_chat_template(convs[0], chat_template=marked, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            covered = tok.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
            out["marked_ok"] = same and "Hello there." in covered
            if not same:
                out["marked_error"] = "the marked copy renders other text"
            elif not out["marked_ok"]:
                out["marked_error"] = "the marked copy masks %r, not the reply" % covered
        except Exception as e:
            out["marked_ok"] = False
            out["marked_error"] = str(e)[:400]
# TRL's settings, for the jobs that run TRL (importing it costs seconds).
try:
    if "trl" not in sys.argv[1:]:
        raise ImportError
    import dataclasses
    from trl import ModelConfig, ScriptArguments, SFTConfig
    out["settings"] = sorted({f.name for c in (SFTConfig, ModelConfig, ScriptArguments) for f in dataclasses.fields(c)})
except Exception:
    pass
print(json.dumps(out))
