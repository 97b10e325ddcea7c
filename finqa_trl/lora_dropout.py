"""LoRA's dropout inside its A matmul: one Triton kernel reads an adapted layer's input, draws the dropout
mask in registers and multiplies by A, instead of writing a dropped-out copy of the input (as big as the
input) and reading it back for A; the backward draws the same mask again from the same seed instead of
keeping it. PEFT computes `lora_B(lora_A(dropout(x)))`, and a profile of compiled 3b LoRA on an H200 spent
19% of its kernel time in the dropout kernels inductor makes of that. Measured (H200s, torch 2.11): the same
tokens/s as the recipe within the order of the processes (0.97-1.06x), its kernels 1.05-1.36x inductor's time,
0.24-0.40 GiB less at the worst step (no masks kept); so a lever, `--lora_dropout_kernel`, off in the recipes
(results/speed-notes.md, Next 20).

Same objective: each element is kept with probability 1 - p and scaled by 1 / (1 - p), every layer and
every call with its own mask; the masks come from another generator (Philox, seeded from torch's generator
in each call, so that activation checkpointing's recomputation, which restores torch's generator, draws the
same masks). Only LoRA layers (not DoRA, whose dropout also feeds its base layer) with a bias-free A, on a
CUDA GPU; everything else, and evaluation, runs PEFT's own code.

The kernels run on the CPU in Triton's interpreter (TRITON_INTERPRET=1): the tests use it, with the ops
opaque to torch.compile there (below).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Triton's interpreter (TRITON_INTERPRET=1: the CPU tests) runs kernels on real tensors only, which
# torch.compile's tracing does not give it: there the ops are opaque custom ops, with their shapes registered
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# One Philox call gives four 32-bit numbers. The input's columns go in blocks of 128, each four lanes of 32:
# element (i, c) of a [T, d] input, in block b = c // 128 and lane q = c % 128 // 32, takes the qth number of
# the call at counter (i * ceil(d / 128) + b) * 32 + c % 32. Every kernel tiles in whole blocks, so the masks
# do not depend on the tiles, and a lane's numbers need no reshuffling between threads (interleaving the four
# numbers column by column did: on an H200 that ran no faster than inductor's one call per element).


# Rows per step and warps per kernel, the first the default; Triton times them at the first call for each
# input width and rank (not each pass length: the shapes of one layer's passes differ only in their rows) and
# keeps the fastest. Triton's interpreter takes the first.
_FORWARD = [({"BM": 32}, 4), ({"BM": 16}, 2), ({"BM": 16}, 4), ({"BM": 64}, 4), ({"BM": 32}, 2)]
_INPUT_GRAD = [({"BM": 64}, 4), ({"BM": 32}, 4), ({"BM": 128}, 4), ({"BM": 128}, 8), ({"BM": 32}, 2)]
_WEIGHT_GRAD = [({"BM": 64}, 4), ({"BM": 32}, 4), ({"BM": 128}, 8), ({"BM": 64}, 8), ({"BM": 32}, 2)]
_SPLIT_ROWS = 128  # a multiple of every BM above: each split of the rows is whole steps


def _tuned(configs: list) -> Any:
    def wrap(kernel: Any) -> Any:
        if _INTERPRETED:
            return kernel
        tuned = [triton.Config(meta, num_warps=warps) for meta, warps in configs]
        return triton.autotune(configs=tuned, key=["d", "r"])(kernel)

    return wrap


def _meta(configs: list) -> dict:
    """Tile sizes passed explicitly: the first configuration in the interpreter, none where Triton tunes."""
    return dict(configs[0][0]) if _INTERPRETED else {}


@triton.jit
def _draws(seed, rows, block, d):
    """The four lanes' numbers, each [len(rows), 32], of the 128-column block `block` of `rows`."""
    blocks = tl.cdiv(d, 128)
    return tl.randint4x(seed, (rows[:, None] * blocks + block) * 32 + tl.arange(0, 32)[None, :])


@triton.jit
def _dropped(x_ptr, rows, cols, bits, T, d, p):
    """The input's [rows, cols] tile with the dropped elements zeroed (the scale comes after the matmul)."""
    x = tl.load(
        x_ptr + rows[:, None] * d + cols[None, :], mask=(rows[:, None] < T) & (cols[None, :] < d), other=0.0
    )
    # times the mask, not tl.where: Triton 3.6 (torch 2.11's) fails to compile a where on this 16-bit load
    return x * (tl.random.uint_to_uniform_float(bits) >= p).to(x.dtype)


@triton.jit
def _forward_lane(acc, x_ptr, a_ptr, rows, cols, bits, T, d, r, p, BR: tl.constexpr, PREC: tl.constexpr):
    ranks = tl.arange(0, BR)
    x = _dropped(x_ptr, rows, cols, bits, T, d, p)
    a = tl.load(
        a_ptr + ranks[None, :] * d + cols[:, None], mask=(ranks[None, :] < r) & (cols[:, None] < d), other=0.0
    )
    return acc + tl.dot(x, a.to(x.dtype), input_precision=PREC)


@_tuned(_FORWARD)
@triton.jit
def _forward_kernel(
    x_ptr, a_ptr, y_ptr, seed_ptr, T, d, r, p, scale,
    BM: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # y[T, r] = (x * keep * scale) @ A^T, a block of BM rows per program; scaled once, after the sum
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    lane = tl.arange(0, 32)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BM, BR), tl.float32)
    for block in range(0, tl.cdiv(d, 128)):
        r0, r1, r2, r3 = _draws(seed, rows, block, d)
        col0 = block * 128
        acc = _forward_lane(acc, x_ptr, a_ptr, rows, col0 + lane, r0, T, d, r, p, BR, PREC)
        acc = _forward_lane(acc, x_ptr, a_ptr, rows, col0 + 32 + lane, r1, T, d, r, p, BR, PREC)
        acc = _forward_lane(acc, x_ptr, a_ptr, rows, col0 + 64 + lane, r2, T, d, r, p, BR, PREC)
        acc = _forward_lane(acc, x_ptr, a_ptr, rows, col0 + 96 + lane, r3, T, d, r, p, BR, PREC)
    ranks = tl.arange(0, BR)
    tl.store(
        y_ptr + rows[:, None] * r + ranks[None, :],
        (acc * scale).to(y_ptr.dtype.element_ty),
        mask=(rows[:, None] < T) & (ranks[None, :] < r),
    )


@triton.jit
def _input_grad_lane(
    g, a_ptr, dx_ptr, rows, cols, bits, T, d, r, p, scale, BR: tl.constexpr, PREC: tl.constexpr
):
    ranks = tl.arange(0, BR)
    a = tl.load(
        a_ptr + ranks[:, None] * d + cols[None, :], mask=(ranks[:, None] < r) & (cols[None, :] < d), other=0.0
    )
    dx = tl.dot(g, a.to(g.dtype), input_precision=PREC) * scale
    tl.store(
        dx_ptr + rows[:, None] * d + cols[None, :],
        tl.where(tl.random.uint_to_uniform_float(bits) >= p, dx, 0.0).to(dx_ptr.dtype.element_ty),
        mask=(rows[:, None] < T) & (cols[None, :] < d),
    )


@_tuned(_INPUT_GRAD)
@triton.jit
def _input_grad_kernel(
    g_ptr, a_ptr, dx_ptr, seed_ptr, T, d, r, p, scale,
    BM: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # dx[T, d] = (g @ A) * keep * scale, one program per BM rows x one block of 128 columns
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    block = tl.program_id(1)
    col0 = block * 128
    lane = tl.arange(0, 32)
    ranks = tl.arange(0, BR)
    g = tl.load(
        g_ptr + rows[:, None] * r + ranks[None, :], mask=(rows[:, None] < T) & (ranks[None, :] < r), other=0.0
    )
    r0, r1, r2, r3 = _draws(tl.load(seed_ptr), rows, block, d)
    _input_grad_lane(g, a_ptr, dx_ptr, rows, col0 + lane, r0, T, d, r, p, scale, BR, PREC)
    _input_grad_lane(g, a_ptr, dx_ptr, rows, col0 + 32 + lane, r1, T, d, r, p, scale, BR, PREC)
    _input_grad_lane(g, a_ptr, dx_ptr, rows, col0 + 64 + lane, r2, T, d, r, p, scale, BR, PREC)
    _input_grad_lane(g, a_ptr, dx_ptr, rows, col0 + 96 + lane, r3, T, d, r, p, scale, BR, PREC)


@triton.jit
def _weight_grad_lane(acc, gt, x_ptr, rows, cols, bits, T, d, p, PREC: tl.constexpr):
    x = _dropped(x_ptr, rows, cols, bits, T, d, p)
    return acc + tl.dot(gt, x.to(gt.dtype), input_precision=PREC)


@triton.jit
def _store_weight_grad(part_ptr, acc, cols, split, d, r, scale, BR: tl.constexpr):
    ranks = tl.arange(0, BR)
    tl.store(
        part_ptr + split * r * d + ranks[:, None] * d + cols[None, :],
        acc * scale,
        mask=(ranks[:, None] < r) & (cols[None, :] < d),
    )


@_tuned(_WEIGHT_GRAD)
@triton.jit
def _weight_grad_kernel(
    g_ptr, x_ptr, part_ptr, seed_ptr, T, d, r, p, scale, rows_per_split,
    BM: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # part[s, r, d] = g[rows of split s]^T @ (x * keep * scale)[those rows], one program per block of 128
    # columns and split; the splits are summed after, in a fixed order (no atomics: the same sum every time)
    block = tl.program_id(0)
    split = tl.program_id(1)
    col0 = block * 128
    lane = tl.arange(0, 32)
    ranks = tl.arange(0, BR)
    seed = tl.load(seed_ptr)
    acc0 = tl.zeros((BR, 32), tl.float32)
    acc1 = tl.zeros((BR, 32), tl.float32)
    acc2 = tl.zeros((BR, 32), tl.float32)
    acc3 = tl.zeros((BR, 32), tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BM):
        rows = m0 + tl.arange(0, BM)
        g = tl.load(
            g_ptr + rows[:, None] * r + ranks[None, :],
            mask=(rows[:, None] < T) & (ranks[None, :] < r),
            other=0.0,
        )
        gt = tl.trans(g)
        r0, r1, r2, r3 = _draws(seed, rows, block, d)
        acc0 = _weight_grad_lane(acc0, gt, x_ptr, rows, col0 + lane, r0, T, d, p, PREC)
        acc1 = _weight_grad_lane(acc1, gt, x_ptr, rows, col0 + 32 + lane, r1, T, d, p, PREC)
        acc2 = _weight_grad_lane(acc2, gt, x_ptr, rows, col0 + 64 + lane, r2, T, d, p, PREC)
        acc3 = _weight_grad_lane(acc3, gt, x_ptr, rows, col0 + 96 + lane, r3, T, d, p, PREC)
    _store_weight_grad(part_ptr, acc0, col0 + lane, split, d, r, scale, BR)
    _store_weight_grad(part_ptr, acc1, col0 + 32 + lane, split, d, r, scale, BR)
    _store_weight_grad(part_ptr, acc2, col0 + 64 + lane, split, d, r, scale, BR)
    _store_weight_grad(part_ptr, acc3, col0 + 96 + lane, split, d, r, scale, BR)


def _precision(x: torch.Tensor) -> str:
    # fp32 inputs (PEFT's input cast, CPU runs) multiply in fp32, not TF32; 16-bit ones as cuBLAS would
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot takes no dimension below 16


def _op(name: str) -> Any:
    # triton_op, not custom_op: torch.compile traces into it and launches the kernels from its own
    # generated code. Opaque custom ops cost each call a Python dispatch (and the backward another): on an
    # H200, compiled 3b LoRA with them ran 0.88-0.97x the recipe's own dropout (results/speed-notes.md)
    if _INTERPRETED:
        return torch.library.custom_op(name, mutates_args=())
    return triton_op(name, mutates_args=())


@_op("finqa_trl::dropout_lora_a")
def dropout_lora_a(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """`F.linear(F.dropout(x, p), weight)` in one kernel, its mask drawn from `seed` (a 0-d int64 tensor on
    x's device): x [..., d] in a 16-bit dtype or fp32, weight [r, d] (A, any float dtype: used in x's, as
    autocast would for a 16-bit x); returns [..., r] in x's dtype."""
    d, r = x.shape[-1], weight.shape[0]
    flat = x.reshape(-1, d).contiguous()
    y = torch.empty(flat.shape[0], r, device=x.device, dtype=x.dtype)
    T = flat.shape[0]
    wrap_triton(_forward_kernel)[lambda meta: (triton.cdiv(T, meta["BM"]),)](
        flat, weight.contiguous(), y, seed, T, d, r, p, 1.0 / (1.0 - p),
        BR=_rank_block(r), PREC=_precision(x), **_meta(_FORWARD),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], r)


@_op("finqa_trl::dropout_lora_a_backward")
def dropout_lora_a_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `dropout_lora_a` for x (x's dtype) and weight (weight's dtype, summed in fp32)."""
    d, r = x.shape[-1], weight.shape[0]
    flat = x.reshape(-1, d).contiguous()
    g = grad.reshape(-1, r).to(x.dtype).contiguous()
    T = flat.shape[0]
    scale = 1.0 / (1.0 - p)
    BR = _rank_block(r)
    dx = torch.empty_like(flat)
    wrap_triton(_input_grad_kernel)[lambda meta: (triton.cdiv(T, meta["BM"]), triton.cdiv(d, 128))](
        g, weight.contiguous(), dx, seed, T, d, r, p, scale, BR=BR, PREC=_precision(x), **_meta(_INPUT_GRAD)
    )
    # A's gradient reduces over all T rows into only r x d numbers: split the rows so that the GPU gets some
    # 500 programs (d / 128 column blocks alone would be 24 for a 3b model's 3,072)
    splits = max(1, min(triton.cdiv(T, _SPLIT_ROWS), 512 // triton.cdiv(d, 128)))
    # at least one step: an empty pass (T = 0) then gets no splits, and A's gradient the sum of none (zeros)
    rows_per_split = max(_SPLIT_ROWS, triton.cdiv(triton.cdiv(T, splits), _SPLIT_ROWS) * _SPLIT_ROWS)
    splits = triton.cdiv(T, rows_per_split)
    parts = torch.empty(splits, r, d, device=x.device, dtype=torch.float32)
    wrap_triton(_weight_grad_kernel)[(triton.cdiv(d, 128), splits)](
        g, flat, parts, seed, T, d, r, p, scale, rows_per_split,
        BR=BR, PREC=_precision(x), **_meta(_WEIGHT_GRAD),
    )  # fmt: skip
    return dx.reshape(x.shape), parts.sum(0).to(weight.dtype)


if _INTERPRETED:

    @dropout_lora_a.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @dropout_lora_a_backward.register_fake
    def _(
        grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, seed, p = inputs
    ctx.save_for_backward(x, weight, seed)  # x and A, not the mask: the backward draws it again
    ctx.p = p


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, weight, seed = ctx.saved_tensors
    dx, dweight = dropout_lora_a_backward(grad, x, weight, seed, ctx.p)
    return dx, dweight, None, None


dropout_lora_a.register_autograd(_backward, setup_context=_setup_context)


def keep_mask(seed: torch.Tensor, rows: int, d: int, p: float) -> torch.Tensor:
    """The [rows, d] mask that `dropout_lora_a` draws from `seed` (True: kept), for tests and checks: the
    forward of an all-ones input through rows of the identity as A gives the kept elements times 1 / (1 - p),
    64 columns a call."""
    x = torch.ones(rows, d, device=seed.device, dtype=torch.float16)
    eye = torch.eye(d, device=seed.device)
    return torch.cat([dropout_lora_a(x, eye[c : c + 64], seed, p) != 0 for c in range(0, d, 64)], dim=1)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox seed from torch's generator of `device`, on the device (no wait for the GPU). Traced under
    torch.compile as a random op, which inductor draws from the same generator; checkpointing restores it."""
    return torch.randint(0, 2**62, (), device=device, dtype=torch.int64)


def _runs_here(x: torch.Tensor) -> bool:
    # the kernels index in int32: an input of 2^31 elements or more (e.g. 262k tokens x 8,192) runs PEFT's way
    return (
        x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.numel() < 2**31
        and (x.is_cuda or _INTERPRETED)  # read once, when the kernels were defined: how they run
    )


class DropoutLoRAA(torch.nn.Linear):
    """PEFT's `lora_A` (a bias-free nn.Linear) that applies its layer's dropout itself: fused while training
    on a CUDA GPU (`dropout_lora_a`), as `F.dropout` then the matmul otherwise. Set as the module's class in
    place: its parameter, and so its state_dict key, stay the same."""

    dropout_p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _runs_here(x):
            return dropout_lora_a(x, self.weight, draw_seed(x.device), self.dropout_p)
        return F.linear(F.dropout(x, self.dropout_p, self.training), self.weight)


def fuse_lora_dropout(model: Any) -> int:
    """Give every plain LoRA adapter of `model` (nn.Dropout with p > 0, bias-free nn.Linear A, no variant
    such as DoRA) its dropout inside A: A becomes a `DropoutLoRAA` and PEFT's
    dropout an nn.Identity. Returns how many adapters. Evaluation, and inputs the kernel does not take, run
    what PEFT ran."""
    from peft.tuners.lora import LoraLayer

    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, a in module.lora_A.items():
            dropout = module.lora_dropout[name]
            if (
                name in getattr(module, "lora_variant", {})
                or type(a) is not torch.nn.Linear
                or a.bias is not None
                or type(dropout) is not torch.nn.Dropout
                or not dropout.p
            ):
                continue
            a.__class__ = DropoutLoRAA
            a.dropout_p = float(dropout.p)
            module.lora_dropout[name] = torch.nn.Identity()
            fused += 1
    return fused
