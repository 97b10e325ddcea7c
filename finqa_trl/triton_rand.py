"""Triton's four-numbers-per-Philox-call uniform random numbers for inductor's generated kernels, for torch
versions whose inductor draws one Philox call per number (before pytorch/pytorch#184377, in torch 2.13).
Imported only where `modeling.compiled_rand4x` backports it: it needs Triton, which CPU builds of torch lack.

The same functions as torch 2.13's `triton_helpers.rand4x`: element `e` of a 1-D block whose offsets run on
from a multiple of 4 gets lane `e % 4` of the Philox call at counter `e // 4`, whatever the block size, so a
kernel and its recomputation draw the same numbers. Written after torch 2.13's `triton_helpers.rand4x`
(PyTorch, BSD-3-Clause), so that both torch versions draw the same stream."""

import triton
import triton.language as tl


@triton.jit
def _random_4x_to_block(r0, r1, r2, r3):
    # Lanes packed by logical offset, so the random stream does not depend on XBLOCK
    size: tl.constexpr = r0.numel
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [size * 4])


@triton.jit
def rand4x(seed, offsets, BLOCK: tl.constexpr):
    offsets = offsets.to(tl.uint32)
    seed = tl.min(seed + offsets * 0, axis=0)
    if BLOCK >= 4 and BLOCK % 4 == 0:
        base = tl.min(offsets, axis=0)
        reduced_offsets = base // 4 + tl.arange(0, BLOCK // 4)
        r0, r1, r2, r3 = tl.rand4x(seed, reduced_offsets)
        return _random_4x_to_block(r0, r1, r2, r3)
    return tl.rand(seed, offsets)
