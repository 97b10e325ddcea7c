"""GPU check of finqa_trl.lora_dropout (the CPU tests cannot run its bf16 matmuls: Triton's interpreter gets
them wrong). Run from the repository root: PYTHONPATH=. python results/lora-dropout-kernel-2026-11-27/check_kernel.py
1. bf16 outputs and gradients against dropout-then-matmul with the mask the kernel draws, at 3b shapes;
2. the drop rate; 3. checkpointing's recomputation (compiled parts, bf16 autocast) gives the gradients of no
recomputation; 4. times one adapter's dropout + A, forward + backward, eager, compiled and fused."""

import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finqa_trl import lora_dropout as fused

dev = torch.device("cuda")
torch.manual_seed(0)
p, r = 0.05, 16
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")

# 1 + 2
for T, d in [(4096, 3072), (3000, 8192), (77, 2048)]:
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(r, d, device=dev) / d**0.5).requires_grad_()
    seed = torch.tensor(987654321, device=dev)
    y = fused.dropout_lora_a(x, w, seed, p)
    keep = fused.keep_mask(seed, T, d, p)
    dropped = x.detach().float() * keep / (1 - p)
    ref = dropped @ w.detach().T
    g = torch.randn_like(y)
    y.backward(g)
    dx = (g.float() @ w.detach()) * keep / (1 - p)
    dw = g.float().T @ dropped

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    print(
        f"T={T} d={d}: drop rate {1 - keep.float().mean().item():.5f} (p {p}); relative error "
        f"y {rel(y, ref):.2e}, dx {rel(x.grad, dx):.2e}, dA {rel(w.grad, dw):.2e} (bf16 rounding ~4e-3)"
    )
    assert rel(y, ref) < 1e-2 and rel(x.grad, dx) < 1e-2 and rel(w.grad, dw) < 1e-2

# 3
from peft import LoraConfig, get_peft_model  # noqa: E402

base = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).to(dev, torch.bfloat16)
model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["0", "2"]))
for n, prm in model.named_parameters():
    if "lora_B" in n:
        torch.nn.init.normal_(prm, std=0.1)
print("fused adapters:", fused.fuse_lora_dropout(model))
for part in model.base_model.model:
    part.compile()
x = torch.randn(4, 100, 256, device=dev, dtype=torch.bfloat16)


def grads(seed, ckpt):
    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast("cuda", torch.bfloat16):
        out = checkpoint(model, x, use_reentrant=False) if ckpt else model(x)
    out.float().square().sum().backward()
    return [q.grad.clone() for q in model.parameters() if q.requires_grad]


a, b, c = grads(5, False), grads(5, True), grads(6, True)
same = all(torch.equal(u, v) for u, v in zip(a, b))
print(f"checkpointed == not checkpointed (compiled, seed 5): {same}; another seed differs: "
      f"{any(not torch.equal(u, v) for u, v in zip(a, c))}")
assert same

# 4
def bench(fn, *args, n=50):
    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def eager(x, w):
    y = F.linear(F.dropout(x, p, True), w.to(x.dtype))
    y.backward(torch.ones_like(y))


compiled_step = torch.compile(lambda x, w: F.linear(F.dropout(x, p, True), w.to(x.dtype)))


def compiled(x, w):
    y = compiled_step(x, w)
    y.backward(torch.ones_like(y))


def fused_step(x, w):
    y = fused.dropout_lora_a(x, w, fused.draw_seed(x.device), p)
    y.backward(torch.ones_like(y))


print("one adapter's dropout + A, forward + backward (ms):")
print("| T | d | eager | compiled | fused |")
for T, d in [(4096, 3072), (4096, 8192), (16384, 3072), (16384, 2048)]:
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(r, d, device=dev, requires_grad=True)
    print(f"| {T} | {d} | {bench(eager, x, w):.3f} | {bench(compiled, x, w):.3f} | {bench(fused_step, x, w):.3f} |")
