"""Attributes every difference between a chatvec and a mergekit TIES or
breadcrumbs merge to a selection tie, or reports it.

mergekit picks the kept elements with torch's sort, which is not stable,
so among deltas whose magnitude equals the selection threshold it keeps an
arbitrary subset; chatvec keeps them in index order. This script counts the
differing elements and how many of them have, in some model, a delta
magnitude equal to a selection boundary. Run with mergekit's Python:

    python scripts/mergekit_tie_check.py CONFIG.yml CHATVEC_OUT MERGEKIT_OUT
"""

import glob
import sys

import torch
import yaml
from safetensors.torch import load_file


def load(d):
    out = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        out.update(load_file(f))
    return out


cfg = yaml.safe_load(open(sys.argv[1]))
method = cfg["merge_method"]
a, b = load(sys.argv[2]), load(sys.argv[3])
base = load(cfg["base_model"])
models = [(load(m["model"]), m.get("parameters", {})) for m in cfg["models"]]
total = diff = at_boundary = 0
for name in sorted(a):
    d = a[name].float() != b[name].float()
    total += d.numel()
    n_diff = int(d.sum())
    if n_diff == 0:
        continue
    diff += n_diff
    n = d.numel()
    near = torch.zeros(n, dtype=torch.bool)
    for m, p in models:
        mag = (m[name].float() - base[name].float()).flatten().abs()
        asc = torch.sort(mag).values
        density = p.get("density", 1.0)
        if method.startswith("ties"):
            ranks = [n - max(1, int(density * n))]
        else:
            target, top = int(density * n), int(p.get("gamma", 0.01) * n)
            bot = max(0, n - target - top)
            ranks = [bot, min(n - 1, bot + target - 1)]
        for r in ranks:
            near |= mag == asc[r]
    at_boundary += int(near[d.flatten()].sum())
print(f"{method}: {total} elements, {diff} differ, {at_boundary} of them at a selection tie, "
      f"{diff - at_boundary} elsewhere")
