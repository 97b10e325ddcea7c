"""The CPU check of lean_recompute's memory (session 22): the peak of tensor memory over one training step of
a tiny Llama (3 layers, hidden 256, intermediate 1024, 2,048 tokens, LoRA on every linear layer, dropout
0.05, non-reentrant activation checkpointing), with and without `lean_mlp_recompute`, eager and with the
decoder layers' parts compiled as the recipes compile them. The peak comes from torch's memory profile of the
step (allocations and frees of every tensor, inductor's buffers included). One unit is a tokens x hidden
fp32 tensor (2 MiB), the size of what machines LL (+0.07 GiB) and MM (+0.19 GiB, a tokens x intermediate
one: 4 units here) measured more on an H200 with the two earlier versions; the CPU showed those as +2 and
+8 MiB compiled.

    python results/lean-recompute-2026-11-27/cpu_peak.py
"""

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import profile
from torch.profiler._memory_profiler import Action
from transformers import LlamaConfig, LlamaForCausalLM

from finqa_trl.modeling import compile_decoder_layers, lean_mlp_recompute

H, I, T = 256, 1024, 2048


def peak_mib(lean: bool, compiled: bool) -> float:
    torch._dynamo.reset()
    cfg = LlamaConfig(
        hidden_size=H, intermediate_size=I, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear")
    model = get_peft_model(LlamaForCausalLM(cfg), lora)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    if lean:
        lean_mlp_recompute(model)
    if compiled:
        compile_decoder_layers(model)
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second step: graphs compiled, gradients allocated
        model.zero_grad(set_to_none=False)
        with profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
            model(input_ids=ids, labels=ids).loss.backward()
    now = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        now += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, now)
    return peak / 2**20


if __name__ == "__main__":
    for compiled in (False, True):
        plain, lean = peak_mib(False, compiled), peak_mib(True, compiled)
        print(
            f"{'compiled' if compiled else 'eager':8}  peak MiB: recipe {plain:.2f}, lean {lean:.2f}, "
            f"lean - recipe {lean - plain:+.2f} (a tokens x hidden fp32 tensor: {T * H * 4 / 2**20:.2f})"
        )
