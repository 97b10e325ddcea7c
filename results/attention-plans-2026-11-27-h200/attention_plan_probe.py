"""What sdpa's attention costs over the bench's first half epoch, by backend (one H100/H200, torch only).

The bench's recipe runs each step's 16 examples in token-budgeted passes of (rows, padded width); the shapes
of the first 34 steps (2 warmup + 32 timed) are in passes-1b-lora.json, planned on the CPU from the sample's
real prompt lengths (the same for every method of both shapes but QDoRA, whose budget is 0.92 of it). cuDNN's
attention builds a graph per new shape (batch, heads, lengths, strides), cached per thread: the checkpointed
forward runs in the main thread, its recomputation and the backward in autograd's device thread, so a new
shape costs up to three builds. Flash and memory-efficient kernels build nothing.

For each pass, in the order the bench meets them: one layer's attention as the recipe runs it (q, k, v laid
out as transformers' [b, s, h, d].transpose(1, 2), GQA, causal, bf16; checkpointed: forward without saving,
then recomputation + backward), timed synchronised the first time (builds included) and as the mean of 5 more
calls (the steady cost of one layer). The window's attention time = sum over its passes of layers x steady
cost, plus the first-call excess of each shape new to the process. Usage: python attention_plan_probe.py
BACKEND SHAPE (cudnn | flash | efficient; 1b | 3b), each in a fresh process (cuDNN's cache is per process).
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CONFIGS = {"1b": (32, 8, 64, 16), "3b": (24, 8, 128, 28)}  # query heads, kv heads, head dim, layers


def main(backend: str, shape: str) -> None:
    heads, kv, dim, layers = CONFIGS[shape]
    torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")
    torch.backends.cuda.enable_flash_sdp(backend == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(backend == "efficient")
    torch.backends.cuda.enable_math_sdp(False)  # fail rather than fall back silently
    plan = json.loads((Path(__file__).parent / "passes-1b-lora.json").read_text())
    warm = plan["warmup_steps"]

    def call(rows: int, width: int) -> float:
        q = torch.randn(rows, width, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(rows, width, kv, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(rows, width, kv, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        for t in (q, k, v):
            t.requires_grad_(True)
        g = torch.randn(rows, heads, width, dim, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = checkpoint(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True),
            q, k, v, use_reentrant=False,
        )  # fmt: skip
        out.backward(g)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    call(2, 128)  # CUDA context, kernel loading: outside every sum
    seen: dict[tuple[int, int], tuple[float, float]] = {}
    window = {"steady_s": 0.0, "first_excess_s": 0.0, "new_shapes": 0, "passes": 0}
    for step, rows, width in plan["passes"]:
        key = (rows, width)
        if key not in seen:
            first = call(rows, width)
            steady = sum(call(rows, width) for _ in range(5)) / 5
            seen[key] = (first, steady)
            if step >= warm:
                window["first_excess_s"] += max(0.0, first - steady)
                window["new_shapes"] += 1
        if step >= warm:
            window["steady_s"] += layers * seen[key][1]
            window["passes"] += 1
    excess = [f - s for f, s in seen.values()]
    out = {
        "backend": backend,
        "shape": shape,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "window": {k: round(v, 3) if isinstance(v, float) else v for k, v in window.items()},
        "window_total_s": round(window["steady_s"] + window["first_excess_s"], 3),
        "first_call_excess_ms": {
            "mean": round(1e3 * sum(excess) / len(excess), 1),
            "min": round(1e3 * min(excess), 1),
            "max": round(1e3 * max(excess), 1),
        },
        "per_shape_ms": {
            f"{r}x{w}": [round(1e3 * f, 2), round(1e3 * s, 3)] for (r, w), (f, s) in seen.items()
        },
    }
    print("JSON", json.dumps(out))
    w = out["window"]
    print(
        f"{backend:9} {shape}: window attention {out['window_total_s']:.2f} s = steady {w['steady_s']:.2f} "
        f"+ first calls {w['first_excess_s']:.2f} ({w['new_shapes']} new shapes, {w['passes']} passes); "
        f"first-call excess per shape {out['first_call_excess_ms']}"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
