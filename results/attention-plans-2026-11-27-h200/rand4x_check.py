"""GPU check of compiled_rand4x's backport (torch < 2.13): the compiled dropout keeps p, scales by 1/(1-p),
its backward uses the forward's mask, and a checkpoint's recomputation draws the same masks. Written after
machine CC's run for speed-notes Next 15; ran on machine DD
(results/levers-2026-11-27-h200/DD-rand4x-check.txt). The lever was removed after that run: this needs the
code of commit b23b235. Usage, from its project root on a CUDA GPU:
PYTHONPATH=. python results/attention-plans-2026-11-27-h200/rand4x_check.py"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finqa_trl.modeling import RAND4X_SITES, compiled_rand4x

print("compiled_rand4x:", compiled_rand4x(), "torch", torch.__version__)
p = 0.05


def lora_a(x, a):  # LoRA's A path: dropout on the layer input, then the rank-16 matmul
    return F.dropout(x, p, training=True) @ a


drop = torch.compile(lambda x: F.dropout(x, p, training=True), dynamic=True)
comp = torch.compile(lora_a, dynamic=True)
for rows in (4096, 3000):  # a second shape: dynamic kernels
    x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(2048, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = drop(x)
    kept = y != 0
    rate = 1 - kept.float().mean().item()
    scale = (y[kept].float() / x[kept].float()).mean().item()
    g = torch.randn_like(y)
    y.backward(g)
    grad_ok = torch.equal(x.grad, (g * kept / (1 - p)).to(x.grad.dtype)) or torch.allclose(
        x.grad.float(), (g * kept / (1 - p)).float(), rtol=1e-2, atol=1e-3
    )
    x.grad = None
    gy = torch.randn(rows, 16, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(7)
    comp(x, a).backward(gy)
    plain = (x.grad.clone(), a.grad.clone())
    x.grad = a.grad = None
    torch.manual_seed(7)
    checkpoint(comp, x, a, use_reentrant=False).backward(gy)
    same = torch.equal(plain[0], x.grad) and torch.equal(plain[1], a.grad)
    print(
        f"rows {rows}: drop rate {rate:.5f} (p {p}), scale {scale:.5f} (want {1 / (1 - p):.5f}), "
        f"backward uses the forward's mask {grad_ok}, checkpointed grads equal {same}"
    )
print("rand4x sites emitted:", RAND4X_SITES["count"])
