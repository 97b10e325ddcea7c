"""SmolLM2 (real weights) on the CPU: one forward + backward of LoRA (dropout 0, B small and random, as after
a few steps) over two copies of one short FinQA-style question and program, in fp32 (the reference), in bf16
with autocast eager, and in bf16 with autocast and the compiled layer parts (the GPU recipe's dtypes: bf16
base, fp32 adapters). Prints how far each bf16 run's loss and adapter gradient are from fp32, and each other.

usage: python check.py SmolLM2-135M-Instruct.Q4_1.gguf   (run from the repository root)
"""

import copy
import sys

import torch
from peft import LoraConfig, get_peft_model

from finqa_trl.modeling import compile_decoder_layers, load

model, tok = load(sys.argv[1], dtype="float32")
torch.manual_seed(0)
peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
for n, p in peft.named_parameters():
    if "lora_B" in n:
        torch.nn.init.normal_(p, std=1e-3)
text = (
    "Question: what was the change in revenue from 2017 to 2018 if revenue was 5829 in 2018 "
    "and 5735 in 2017? "
    "Program: subtract(5829, 5735), divide(#0, 5735)"
)
ids = tok([text] * 2, return_tensors="pt")["input_ids"]


def run(m: torch.nn.Module, autocast: bool, compiled: bool) -> tuple[float, torch.Tensor]:
    m = copy.deepcopy(m)
    m.train()
    if compiled:
        compile_decoder_layers(m)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for n, p in m.named_parameters() if "lora_" in n])


ref_loss, ref = run(peft, False, False)
half = copy.deepcopy(peft)
for n, p in half.named_parameters():
    if "lora_" not in n:
        p.data = p.data.to(torch.bfloat16)
res = {"eager": run(half, True, False), "compiled": run(half, True, True)}
print(f"fp32 loss {ref_loss:.5f}")
for k, (loss, g) in res.items():
    err = ((g - ref).norm() / ref.norm()).item()
    rel = (loss - ref_loss) / ref_loss * 100
    print(f"{k} bf16: loss {loss:.5f} ({rel:+.3f}%), adapter grad rel. error {err:.4f}")
ge, gc = res["eager"][1], res["compiled"][1]
print(f"eager vs compiled: adapter grad rel. difference {((gc - ge).norm() / ge.norm()).item():.4f}")
