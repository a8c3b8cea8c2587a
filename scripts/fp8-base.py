"""Writes an FP8 block-scaled copy of a bf16 model, as DeepSeek-V3 and the
Qwen3 -FP8 releases store theirs: every 2-D projection weight as F8_E4M3
with a float32 `weight_scale_inv` per 128x128 block (amax / 448), the rest
unchanged, and `quantization_config` in config.json. The benchmark of
quantized inputs (BENCHMARKS.md) applies a chat vector to such a copy.

    python scripts/fp8-base.py SRC_DIR OUT_DIR [BLOCK]
"""
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def quantize(w, block):
    rows, cols = w.shape
    sr, sc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(sr * block, sc * block, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    tiles = padded.reshape(sr, block, sc, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / 448.0
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.reshape(sr * block, sc * block)[:rows, :cols].contiguous(), scale.contiguous()


def main():
    src, out = sys.argv[1], sys.argv[2]
    block = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    os.makedirs(out, exist_ok=True)
    index = os.path.join(src, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    weight_map = {}
    for f in files:
        tensors = {}
        with safe_open(os.path.join(src, f), framework="pt") as st:
            for name in st.keys():
                w = st.get_tensor(name)
                if w.ndim == 2 and name.endswith("proj.weight"):
                    q, s = quantize(w, block)
                    tensors[name], tensors[name + "_scale_inv"] = q, s
                else:
                    tensors[name] = w
        save_file(tensors, os.path.join(out, f), metadata={"format": "pt"})
        weight_map.update({n: f for n in tensors})
    if len(files) > 1:
        json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    for side in os.listdir(src):
        if side.startswith("tokenizer") or side == "generation_config.json":
            shutil.copy(os.path.join(src, side), os.path.join(out, side))


if __name__ == "__main__":
    main()
