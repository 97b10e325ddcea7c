"""fp32 adapters with and without PEFT's input cast, and bf16 adapters, on the CPU (speed-notes, machine M).

A 4-layer random Llama in bf16, LoRA r16 on all linears, non-reentrant checkpointing, one forward + backward
under bf16 autocast per step, batch 4 x 256 tokens. Prints, per setting: the loss, seconds per step (3 steps
after one warm-up), PEFT's `aten::_to_copy` calls per step (torch profiler), and whether loss and gradients
equal the default's (fp32 adapters, input cast) bit for bit. Run with lora_dropout 0.05 (the recipes') and 0.
    python results/adapter-input-cast-cpu/check.py > results/adapter-input-cast-cpu/output.txt
"""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import profile
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, vocab_size=1000,
)  # fmt: skip


def build(setting: str, dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # nonzero, so that lora_A gets gradients too
            torch.nn.init.normal_(param, std=0.02)
        if setting == "bf16 adapters" and param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    if setting == "fp32 adapters, no input cast":
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    return model


def step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout draws for every setting (on tensors of its input's dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item()


def main() -> None:
    ids = torch.randint(0, CONFIG.vocab_size, (4, 256), generator=torch.Generator().manual_seed(2))
    for dropout in (0.05, 0.0):
        reference = None
        for setting in ("fp32 adapters (default)", "fp32 adapters, no input cast", "bf16 adapters"):
            model = build(setting, dropout)
            step(model, ids)  # warm-up
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                loss = step(model, ids)
                seconds.append(time.perf_counter() - start)
            with profile() as prof:
                step(model, ids)
            copies = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
            grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
            if reference is None:
                reference = (loss, grads)
            same = loss == reference[0] and all(torch.equal(g, reference[1][n]) for n, g in grads.items())
            print(
                f"dropout {dropout}: {setting:30s} loss {loss:.6f}"
                f"  s/step {min(seconds):.3f}-{max(seconds):.3f}"
                f"  _to_copy {copies}  same loss and gradients as the default: {same}"
            )


if __name__ == "__main__":
    main()
