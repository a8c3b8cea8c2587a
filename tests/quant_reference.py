# The reference side of tests/quant.rs. "write ROOT": writes FP8 block-scaled
# (E4M3, E5M2) and MXFP4 checkpoints covering every code point, loads each in
# transformers with dequantize=True in float32, and saves what transformers
# holds as ROOT/<name>-ref.safetensors, and a bf16 chat pair ROOT/pre,
# ROOT/chat of the FP8 models' architecture. "compare OUT...": for each
# chatvec output ROOT/out-<name>, says whether its f32 weights equal the
# reference bit for bit. "requant F32 FP8": quantizes each weight of the f32
# output F32 that the output FP8 stores as FP8 with transformers' own
# Fp8Quantize (what save_pretrained runs), and says whether FP8's codes and
# weight_scale_inv equal it bit for bit. "mxfp4-load OUT": loads chatvec's
# MXFP4 output OUT in transformers and says whether each expert equals its
# blocks and scales decoded here.
import json, os, sys
import torch
from safetensors.torch import save_file, load_file
from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

def qwen3_config():
    return AutoConfig.for_model("qwen3", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=64, head_dim=16)

def gpt_oss_config():
    return AutoConfig.for_model("gpt_oss", hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=64, head_dim=32, num_local_experts=3,
        num_experts_per_tok=2)

def fp8(out, e5m2):
    cfg = qwen3_config()
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    dt = torch.float8_e5m2 if e5m2 else torch.float8_e4m3fn
    q = {}
    B = 16
    for k, w in m.state_dict().items():
        if w.ndim == 2 and "proj" in k:
            R, C = w.shape
            codes = torch.randint(0, 256, (R * C,), generator=g, dtype=torch.uint8)
            codes[:256] = torch.arange(256, dtype=torch.uint8)
            v = codes.view(dt).float()
            codes[~torch.isfinite(v)] = 0
            q[k] = codes.view(dt).reshape(R, C)
            # scales of varied magnitude, not powers of two
            s = torch.rand(((R + B - 1) // B, (C + B - 1) // B), generator=g) * 4.0 ** torch.randint(-8, 3, (1,), generator=g).float()
            q[k + "_scale_inv"] = s
        else:
            q[k] = w.contiguous()
    d = os.path.join(out, "fp8-e5m2" if e5m2 else "fp8-e4m3")
    os.makedirs(d, exist_ok=True)
    save_file(q, d + "/model.safetensors", metadata={"format": "pt"})
    m.config.save_pretrained(d)
    c = json.load(open(d + "/config.json"))
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e5m2" if e5m2 else "e4m3",
        "activation_scheme": "dynamic", "weight_block_size": [B, B]}
    json.dump(c, open(d + "/config.json", "w"), indent=2)
    ref = AutoModelForCausalLM.from_pretrained(d, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.float32)
    return d, ref

def mxfp4(out):
    cfg = gpt_oss_config()
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    q = {}
    for k, v in m.state_dict().items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            E, A, Bd = v.shape  # the parameter is [experts, in, out]; blocks are [experts, out, in / 32, 16]
            q[k + "_blocks"] = torch.randint(0, 256, (E, Bd, A // 32, 16), generator=g, dtype=torch.uint8)
            s = torch.randint(100, 150, (E, Bd, A // 32), generator=g, dtype=torch.uint8)
            # the extreme exponents: subnormal results in f32, and large ones
            s.view(-1)[:8] = torch.tensor([0, 1, 2, 127, 128, 160, 170, 126], dtype=torch.uint8)
            q[k + "_scales"] = s
        else:
            q[k] = v.contiguous()
    d = os.path.join(out, "mxfp4")
    os.makedirs(d, exist_ok=True)
    save_file(q, d + "/model.safetensors", metadata={"format": "pt"})
    m.config.save_pretrained(d)
    c = json.load(open(d + "/config.json"))
    c["architectures"] = ["GptOssForCausalLM"]
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert":
        ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    json.dump(c, open(d + "/config.json", "w"), indent=2)
    ref = AutoModelForCausalLM.from_pretrained(d, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32)
    return d, ref

def chat_pair(out, cfg, seed, pre_name, chat_name):
    # a bf16 pretrained model and its "chat" model (the pretrained one nudged)
    torch.manual_seed(seed)
    pre = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    pre.save_pretrained(os.path.join(out, pre_name))
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pre.save_pretrained(os.path.join(out, chat_name))

if sys.argv[1] == "write":
    out = sys.argv[2]
    for d, ref in [fp8(out, False), fp8(out, True), mxfp4(out)]:
        sd = {k: v.detach().float().contiguous() for k, v in ref.state_dict().items()}
        save_file(sd, d + "-ref.safetensors")
    chat_pair(out, qwen3_config(), 7, "pre", "chat")
    chat_pair(out, gpt_oss_config(), 8, "pre-oss", "chat-oss")
elif sys.argv[1] == "mxfp4-load":
    # loads chatvec's MXFP4 output in transformers (dequantize=True, float32):
    # every key present, each expert equal to its blocks and scales decoded
    # here in f64, finite logits
    d = sys.argv[2]
    m, info = AutoModelForCausalLM.from_pretrained(d, quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    raw = load_file(d + "/model.safetensors")
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    lut = torch.cat([lut, -lut])
    sd = m.state_dict()
    bad, n = [], 0
    for k in raw:
        if not k.endswith("_blocks"):
            continue
        stem = k.removesuffix("_blocks")
        b, sc = raw[k].long(), raw[stem + "_scales"].double()
        vals = torch.stack([lut[b & 15], lut[b >> 4]], dim=-1).reshape(*sc.shape, 32)
        vals = vals * torch.pow(2.0, sc - 127).unsqueeze(-1)
        want = vals.reshape(sc.shape[0], sc.shape[1], -1).transpose(1, 2).float()
        n += 1
        if not torch.equal(want, sd[stem]):
            bad.append(stem)
    logits = m(torch.arange(8).unsqueeze(0)).logits
    print("mxfp4-load", "identical" if n and not bad and not problems else f"differs: {bad} {problems}", n,
        "finite" if torch.isfinite(logits).all() else "nonfinite")
elif sys.argv[1] == "requant":
    import types
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    exact, q = load_file(sys.argv[2] + "/model.safetensors"), load_file(sys.argv[3] + "/model.safetensors")
    qc = json.load(open(sys.argv[3] + "/config.json"))["quantization_config"]
    config = FineGrainedFP8Config(weight_block_size=qc["weight_block_size"], scale_fmt=qc.get("scale_fmt", "float"))
    op = Fp8Quantize(types.SimpleNamespace(quantization_config=config))
    names = [k for k, v in q.items() if v.dtype == torch.float8_e4m3fn]
    bad = []
    for k in names:
        ref = op._quantize_one(k, exact[k])
        scale = k.rsplit(".", 1)[0] + ".weight_scale_inv"
        if not torch.equal(ref[k].view(torch.uint8), q[k].view(torch.uint8)):
            bad.append(k)
        # f32 scales, or E8M0 ones (scale_fmt ue8m0) if the base stores them so
        if not torch.equal(ref[scale].float().view(torch.int32), q[scale].float().view(torch.int32)):
            bad.append(scale)
    print("requant", "identical" if names and not bad else "differs: " + ", ".join(bad), len(names))
else:
    for d in sys.argv[2:]:
        d = d.rstrip("/")
        name = os.path.basename(d).removeprefix("out-")
        ref = load_file(os.path.join(os.path.dirname(d), name + "-ref.safetensors"))
        got = load_file(d + "/model.safetensors")
        assert set(ref) == set(got), (name, set(ref) ^ set(got))
        bad = [k for k in ref if got[k].dtype != torch.float32 or not torch.equal(ref[k].view(torch.int32), got[k].view(torch.int32))]
        print(name, "identical" if not bad else "differs: " + ", ".join(bad))
