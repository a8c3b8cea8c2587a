"""Runs mergekit 0.1.5's karcher, multislerp and nuslerp on one tensor of the
1b bench inputs in float32 (as `dtype: float32` does) and in float64, and
counts the bf16 elements more than one ulp apart: mergekit's f32 result
against its own algorithm in f64, and chatvec's outputs (merged beforehand
into /tmp/kout, /tmp/msout, /tmp/nsout from the bench's method configs)
against the same f64 result. Run with mergekit's Python:

    python scripts/mergekit_f64_check.py model.embed_tokens.weight ...
"""
import sys, json, os, torch
from safetensors import safe_open
from mergekit.merge_methods.karcher import karcher_merge_tensors
from mergekit.merge_methods.nuslerp import nuslerp
def get(d, name):
    if os.path.exists(d + '/model.safetensors.index.json'):
        f = json.load(open(d + '/model.safetensors.index.json'))['weight_map'][name]
    else:
        f = 'model.safetensors'
    with safe_open(d + '/' + f, 'pt') as h: return h.get_tensor(name)
def multislerp(ts, w, base, eps=1e-8):
    # mergekit 0.1.5's multislerp body, on plain tensors
    t = torch.stack(ts) - base
    flat = t.view(t.shape[0], -1); w = torch.tensor(w, dtype=t.dtype); w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True); units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0); mean = mean / torch.norm(mean)
    dots = (units * mean).sum(-1, keepdim=True); tang = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tn = torch.norm(tang) + eps
    res = mean * torch.cos(tn) + tang * (torch.sin(tn) / tn)
    return (res * (norms.squeeze(-1) * w).sum()).view(t.shape[1:]) + base
def ulps(a, b):
    d = (a.to(torch.bfloat16).view(torch.int16).int() - b.to(torch.bfloat16).view(torch.int16).int()).abs()
    return int((d > 1).sum()), int(d.max())
for name in sys.argv[1:]:
    p, c, b = [get('/work/bench-data/1b/' + m, name).float() for m in ['pretrained', 'chat', 'base']]
    runs = {
        'karcher': ('/tmp/kout', lambda dt: karcher_merge_tensors([p.to(dt), c.to(dt), b.to(dt)], [1/3]*3)),
        'multislerp': ('/tmp/msout', lambda dt: multislerp([c.to(dt), b.to(dt)], [0.5, 0.5], p.to(dt))),
        'nuslerp': ('/tmp/nsout', lambda dt: p.to(dt) + nuslerp(0.5, c.to(dt) - p.to(dt), b.to(dt) - p.to(dt), flatten=True)),
    }
    for m, (out, f) in runs.items():
        cv = get(out, name).float(); r32 = f(torch.float32).float(); r64 = f(torch.float64).float()
        print(f"{m:10} {name}: mergekit f32 vs f64 {ulps(r32, r64)}, chatvec vs f64 {ulps(cv, r64)}, chatvec vs f32 {ulps(cv, r32)}")
