"""Writes three tiny Llama checkpoints (pretrained, chat, continued-pretrained)
with a real byte-level BPE tokenizer and a Llama-3-style chat template, all
built locally with transformers/tokenizers (no download). Used to run
`chatvec apply` then `chatvec sft` end to end on the CPU.

    python scripts/make_tiny_llama.py OUT_DIR
"""

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CORPUS = [
    "Hello, how are you? I am fine, thank you.",
    "こんにちは。今日はいい天気ですね。",
    "The chat vector adds instruction following to a continued-pretrained model.",
    "1 + 1 = 2. Two plus two is four.",
] * 50


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"
    )
    fast.chat_template = TEMPLATE
    return fast


def main(out: Path):
    tok = tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    pre = LlamaForCausalLM(cfg)
    for name, seed in [("pretrained", None), ("chat", 1), ("base", 2)]:
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(pre.state_dict())
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        model = model.to(torch.bfloat16)
        model.save_pretrained(out / name, safe_serialization=True)
        tok.save_pretrained(out / name)
    print(f"wrote {out}/pretrained, chat, base")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
