"""GPU check of finqa_trl.lora_dropout (the CPU tests cannot run its bf16 matmuls: Triton's interpreter gets
them wrong). Run from the repository root: PYTHONPATH=. python results/lora-dropout-kernel-2026-11-27/check_kernel.py
1. bf16 outputs and gradients against dropout-then-matmul with the mask the kernel draws, at 3b shapes;
2. the drop rate; 3. checkpointing's recomputation (compiled parts, bf16 autocast) gives the gradients of no
recomputation, on bf16 inputs; 4. times one adapter's dropout + A, forward + backward, eager, compiled and fused."""

import sys
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
# the last: a rank below 16 and a width that is no multiple of 128 (padded ranks, a partial block)
for T, d, rank in [(4096, 3072, r), (3000, 8192, r), (77, 2048, r), (77, 200, 8)]:
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(rank, d, device=dev) / d**0.5).requires_grad_()
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
        f"T={T} d={d} r={rank}: drop rate {1 - keep.float().mean().item():.5f} (p {p}); relative error "
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
for module in model.modules():  # as the LoRA recipes run (adapter_input_cast auto): bf16 inputs, not fp32
    if hasattr(module, "cast_input_dtype_enabled"):
        module.cast_input_dtype_enabled = False
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

if "--quick" in sys.argv:  # the checks only, no timings
    sys.exit(0)

# 4
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def timed(fn, *args, n=20):
    """(wall ms, kernel ms) per call of fn, forward + backward."""
    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(*args)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn(*args)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]
    names = ", ".join(f"{e.key[:40]} {e.self_device_time_total / n:.0f} us" for e in top)
    return wall, sum(e.self_device_time_total for e in kernels) / n / 1e3, names


# three adapters on one input (q, k, v of a 3b layer: d 3,072, r 16), as compiled parts of the recipes run them:
# PEFT's dropout per adapter then A, against the fused op; the adapters' outputs summed (B left out: the same
# on both sides)
def peft_like(x, ws):
    return sum(F.linear(F.dropout(x, p, True), w.to(x.dtype)) for w in ws)


def fused_like(x, ws):
    return sum(fused.dropout_lora_a(x, w, fused.draw_seed(x.device), p) for w in ws)


compiled = {"PEFT dropout + A": torch.compile(peft_like), "fused": torch.compile(fused_like)}
print("three adapters on one bf16 input, compiled, forward + backward: wall ms / kernel ms")
print("| T | d | PEFT dropout + A | fused | kernel ratio |")
tops = []
for T, d in [(4096, 3072), (12288, 3072), (12288, 8192)]:
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ws = [torch.randn(r, d, device=dev, requires_grad=True) for _ in range(3)]
    res = {}
    for name, fn in compiled.items():
        def step(x, ws, fn=fn):
            fn(x, ws).float().sum().backward()
        res[name] = timed(step, x, ws)
    a, b = res["PEFT dropout + A"], res["fused"]
    print(f"| {T} | {d} | {a[0]:.3f} / {a[1]:.3f} | {b[0]:.3f} / {b[1]:.3f} | {b[1] / a[1]:.2f} |")
    tops.append(f"T={T} d={d}: PEFT: {a[2]}\n  fused: {b[2]}")
print("busiest kernels per call:")
for line in tops:
    print(line)
for kernel in (fused._forward_kernel, fused._input_grad_kernel, fused._weight_grad_kernel):
    print(getattr(kernel, "fn", kernel).__name__, "tuned:", {k: str(v) for k, v in getattr(kernel, "cache", {}).items()})
