"""Writes the models of the MXFP4 benchmark (BENCHMARKS.md, issue 26): a
gpt-oss-shaped stack of fused experts (LAYERS x EXPERTS experts of hidden
H, intermediate I) as a bf16 chat pair (pretrained, chat), a bf16 base,
and the same base with its experts in MXFP4 (`*_blocks` + `*_scales`, as
gpt-oss ships them). Values are random: decoding costs the same whatever
they are.

    python scripts/mxfp4-bench-models.py OUT_DIR [LAYERS EXPERTS H I]
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file


def main():
    out = sys.argv[1]
    layers, experts, h, i = (int(x) for x in sys.argv[2:6]) if len(sys.argv) > 5 else (2, 16, 2048, 2048)
    cfg = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": h,
        "intermediate_size": i, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 64, "num_local_experts": experts,
        "num_experts_per_tok": 4, "vocab_size": 1024, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    g = torch.Generator().manual_seed(0)
    for name in ["pretrained", "chat", "base", "base-mxfp4"]:
        t = {"model.embed_tokens.weight": torch.randn(1024, h, generator=g).bfloat16(),
             "lm_head.weight": torch.randn(1024, h, generator=g).bfloat16()}
        for l in range(layers):
            p = f"model.layers.{l}.mlp.experts"
            for proj, (inp, o) in {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}.items():
                if name == "base-mxfp4":
                    t[f"{p}.{proj}_blocks"] = torch.randint(0, 256, (experts, o, inp // 32, 16), generator=g, dtype=torch.uint8)
                    t[f"{p}.{proj}_scales"] = torch.randint(118, 128, (experts, o, inp // 32), generator=g, dtype=torch.uint8)
                else:
                    t[f"{p}.{proj}"] = (torch.randn(experts, inp, o, generator=g) * 0.02).bfloat16()
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        c = dict(cfg)
        if name == "base-mxfp4":
            c["quantization_config"] = {"quant_method": "mxfp4"}
        json.dump(c, open(os.path.join(d, "config.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
