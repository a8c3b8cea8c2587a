# chatvec eval --harness: runs the installed lm-evaluation-harness (its
# Python API, simple_evaluate) on each model, with the spec as JSON on
# stdin; progress as "chatvec-eval: " lines on stderr, each model's metrics
# as one {"result": ...} line on stdout as soon as it is done.
import json
import math
import sys


def progress(**kw):
    print("chatvec-eval: " + json.dumps(kw), file=sys.stderr, flush=True)


def number(x):
    """A metric value as a float, or None (lm_eval writes "N/A")."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def main():
    spec = json.loads(sys.stdin.read())
    import torch
    import lm_eval
    from lm_eval.tasks import TaskManager

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    engine = spec["engine"]
    if engine == "auto":
        try:
            import vllm  # noqa: F401

            engine = "vllm" if gpus > 0 else "transformers"
        except ImportError:
            engine = "transformers"
    manager = TaskManager(include_path=spec.get("include"))
    for mi, m in enumerate(spec["models"]):
        progress(model=mi, stage="harness", done=0, total=1)
        if engine == "vllm":
            kind = "vllm"
            args = {"pretrained": m["path"], "dtype": "bfloat16", "tensor_parallel_size": max(gpus, 1)}
        else:
            kind = "hf"
            args = {"pretrained": m["path"], "dtype": "bfloat16" if gpus else "float32"}
            if gpus > 1:
                args["parallelize"] = True
        out = lm_eval.simple_evaluate(
            model=kind,
            model_args=args,
            tasks=spec["tasks"],
            task_manager=manager,
            limit=spec.get("limit"),
            batch_size=spec.get("batch") or 16,
            device="cuda" if gpus else "cpu",
            num_fewshot=spec.get("num_fewshot"),
            log_samples=False,
            apply_chat_template=bool(spec.get("apply_chat_template")),
        )
        metrics = []
        better = out.get("higher_is_better", {})
        for task, values in sorted(out["results"].items()):
            for key, value in sorted(values.items()):
                # The task's name and its documents' count are not metrics.
                if key in ("alias", "sample_len", "samples") or "_stderr" in key:
                    continue
                metric, _, filt = key.partition(",")
                v = number(value)
                if v is None:
                    continue
                stderr = number(values.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr"))
                metrics.append(
                    {
                        "task": task,
                        "metric": metric,
                        "filter": filt or None,
                        "value": v,
                        "stderr": stderr,
                        "higher_is_better": bool(better.get(task, {}).get(metric, True)),
                        "samples": (out.get("n-samples", {}).get(task) or {}).get("effective"),
                    }
                )
        print(
            json.dumps(
                {
                    "result": {
                        "model": m["path"],
                        "engine": kind,
                        "lm_eval": getattr(lm_eval, "__version__", None),
                        "metrics": metrics,
                        "versions": {k: str(v) for k, v in (out.get("versions") or {}).items()},
                    }
                }
            ),
            flush=True,
        )
        progress(model=mi, stage="harness", done=1, total=1)


if __name__ == "__main__":
    main()
