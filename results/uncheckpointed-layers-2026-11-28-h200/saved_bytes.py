"""Bytes the autograd graph keeps per token for one decoder layer run without its activation checkpoint
(speed-notes Next 30), on the CPU: a Llama-3.2-<shape>-shaped layer in bf16, LoRA r 16 on every
linear layer (fp32 adapters, PEFT's input cast off, dropout 0.05), bf16 autocast, compiled as a body
as the recipes compile it (with lean_recompute for `lean`; `eager`: neither compiled nor lean). The
saved tensors of a 512- and a 1,024-token pass are summed by storage, the weights left out; the
difference over 512 tokens is what each further token costs.
Run from the repository root, SHAPE 3b or 1b, MODE lean, no or eager:
PYTHONPATH=. python results/uncheckpointed-layers-2026-11-28-h200/saved_bytes.py SHAPE MODE
"""

import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from finqa_trl.modeling import compile_decoder_layers, lean_mlp_recompute

shape = sys.argv[1]
mode = sys.argv[2]
lean = mode == "lean"
kw = (
    dict(
        hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128
    )
    if shape == "3b"
    else dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64
    )
)
cfg = LlamaConfig(num_hidden_layers=1, vocab_size=1024, use_cache=False, attn_implementation="sdpa", **kw)
m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
for n, p in m.named_parameters():
    if p.requires_grad:
        p.data = p.data.float()
for mod in m.modules():
    if hasattr(mod, "cast_input_dtype_enabled"):
        mod.cast_input_dtype_enabled = False
m.train()
if lean:
    lean_mlp_recompute(m)
if mode != "eager":
    compile_decoder_layers(m, scope="body")
params = {p.untyped_storage().data_ptr() for p in m.parameters()}
layer = m.base_model.model.model.layers[0]


def measure(T):
    x = torch.randn(1, T, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rot = m.base_model.model.model.rotary_emb(x, torch.arange(T)[None])
    seen = {}

    def pack(t):
        k = t.untyped_storage().data_ptr()
        if k not in params:
            seen[k] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, position_embeddings=rot, attention_mask=None)  # warm (compile)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x, position_embeddings=rot, attention_mask=None)
    return sum(seen.values()), out


a, _ = measure(512)
b, _ = measure(1024)
print(shape, mode, "KiB per token per layer:", (b - a) / 512 / 1024)
