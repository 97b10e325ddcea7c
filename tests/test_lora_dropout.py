"""LoRA's dropout inside its A matmul (finqa_trl.lora_dropout): the Triton kernels against dropout-then-matmul
with the mask they draw, the masks themselves, PEFT models with the fused adapters, and activation
checkpointing's recomputation (eager and compiled). The kernels run in Triton's interpreter on the CPU
(conftest sets TRITON_INTERPRET=1 where there is no GPU), in fp16 and fp32: the interpreter's bf16 matmul is
wrong (its own bug: a plain tl.dot of two bf16 tiles is off by 1e10), so bf16 is checked on the GPU
(results/ says where)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finqa_trl import lora_dropout as fused

# Only in Triton's interpreter, which conftest turns on where there is no GPU (CI): on a GPU machine the
# kernels would meet these CPU tensors; there results/lora-dropout-kernel-2026-11-27/check_kernel.py
# checks them
pytestmark = pytest.mark.skipif(
    not fused._INTERPRETED, reason="needs Triton's interpreter (a machine without GPU)"
)


def _reference(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    keep = fused.keep_mask(seed, x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1], p).reshape(x.shape)
    return x.float() * keep / (1 - p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 100, 96), (1, 7, 12)])
def test_kernels_give_dropout_then_matmul_and_its_gradients(dtype: torch.dtype, shape: tuple) -> None:
    torch.manual_seed(0)
    p, r = 0.3, 8
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    weight = torch.randn(r, shape[-1], requires_grad=True)  # fp32 A, as PEFT keeps it on a 16-bit base
    seed = torch.tensor(123456789, dtype=torch.int64)
    y = fused.dropout_lora_a(x, weight, seed, p)
    assert y.shape == (*shape[:-1], r) and y.dtype == dtype

    dropped = _reference(x.detach(), weight, seed, p)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-2}
    torch.testing.assert_close(y.float(), dropped @ weight.detach().T, **tol)

    grad = torch.randn_like(y)
    y.backward(grad)
    keep = dropped != 0
    expected_dx = (grad.float() @ weight.detach()) * keep / (1 - p)
    torch.testing.assert_close(x.grad.float(), expected_dx, **tol)
    expected_dw = grad.float().reshape(-1, r).T @ dropped.reshape(-1, shape[-1])
    assert weight.grad.dtype == torch.float32  # the parameter's dtype, summed in fp32
    torch.testing.assert_close(weight.grad, expected_dw, rtol=1e-4, atol=1e-3)


def test_masks_drop_p_of_the_elements_with_each_seed_its_own() -> None:
    p, rows, d = 0.25, 256, 512
    keep = fused.keep_mask(torch.tensor(7), rows, d, p)
    n = rows * d
    assert abs((~keep).sum().item() - p * n) < 4 * (p * (1 - p) * n) ** 0.5
    assert torch.equal(keep, fused.keep_mask(torch.tensor(7), rows, d, p))  # the backward draws it again
    other = fused.keep_mask(torch.tensor(8), rows, d, p)
    assert 0.3 < (keep != other).float().mean().item() < 0.45  # independent: 2 p (1 - p) = 0.375
    # the four numbers of one Philox call go to columns 32 apart in a block of 128: they must not agree more
    # often than independent draws would (0.625 = p^2 + (1 - p)^2); nor neighbouring columns
    lanes = keep.reshape(rows, d // 128, 4, 32).float()
    for a in range(4):
        for b in range(a + 1, 4):
            assert 0.58 < (lanes[:, :, a] == lanes[:, :, b]).float().mean().item() < 0.67
    assert 0.58 < (keep[:, 1:] == keep[:, :-1]).float().mean().item() < 0.67
    # nor do neighbouring rows repeat each other's counters
    assert 0.58 < (keep[1:] == keep[:-1]).float().mean().item() < 0.67


def _toy_peft(use_dora: bool = False, dropout: float = 0.2) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"], use_dora=use_dora)
    model = get_peft_model(base, config)
    for name, param in model.named_parameters():  # B starts at zero: give the adapters something to say
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def test_fused_adapters_keep_the_state_dict_and_give_peft_outputs_in_evaluation() -> None:
    model = _toy_peft()
    plain = copy.deepcopy(model)
    assert fused.fuse_lora_dropout(model) == 2
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 32)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert fused.fuse_lora_dropout(model) == 0  # already fused: nothing twice
    # DoRA's dropout also feeds its base layer; without dropout there is nothing to fuse
    assert fused.fuse_lora_dropout(_toy_peft(use_dora=True)) == 0
    assert fused.fuse_lora_dropout(_toy_peft(dropout=0.0)) == 0


def test_an_empty_pass_gives_empty_outputs_and_zero_gradients() -> None:
    x = torch.zeros(0, 64, requires_grad=True)
    weight = torch.randn(16, 64, requires_grad=True)
    y = fused.dropout_lora_a(x, weight, torch.tensor(3), 0.1)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(weight.grad, torch.zeros(16, 64))


def test_a_fused_adapter_drops_its_input_with_a_seed_from_torchs_generator() -> None:
    model = _toy_peft()
    fused.fuse_lora_dropout(model)
    layer = model.base_model.model[0]
    a = layer.lora_A["default"]
    x = torch.randn(6, 32)
    torch.manual_seed(3)
    seed = fused.draw_seed(x.device)
    torch.manual_seed(3)
    y = a(x)
    torch.testing.assert_close(
        y, _reference(x, a.weight, seed, 0.2) @ a.weight.detach().T, rtol=1e-5, atol=1e-5
    )
    a.eval()
    torch.testing.assert_close(a(x), F.linear(x, a.weight), rtol=0, atol=0)  # no dropout outside training


def _grads(model: torch.nn.Module, x: torch.Tensor, seed: int, checkpointed: bool) -> list[torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(seed)
    out = checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
    out.square().sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_checkpoint_recomputation_draws_the_same_masks(compiled: bool) -> None:
    model = _toy_peft()
    fused.fuse_lora_dropout(model)
    model.train()
    # compiled parts (the recipes' scope before TT), called again by an eager checkpoint's recomputation
    if compiled:
        for part in model.base_model.model:
            part.compile()
    x = torch.randn(2, 9, 32, requires_grad=True)
    kept = _grads(model, x, seed=5, checkpointed=False)
    recomputed = _grads(model, x, seed=5, checkpointed=True)
    for a, b in zip(kept, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = _grads(model, x, seed=6, checkpointed=True)
    assert any(not torch.equal(a, b) for a, b in zip(kept, other, strict=True))  # the masks are random


@pytest.mark.parametrize("i", range(5))
def test_every_tile_configuration_draws_the_same_masks(i: int, monkeypatch) -> None:
    """On the GPU Triton picks each kernel's tiles by timing them, so the forward and the two backward kernels
    may tile differently: each element's mask must not depend on the tiles."""
    default_forward = fused._FORWARD[0]
    for name in ("_FORWARD", "_INPUT_GRAD", "_WEIGHT_GRAD"):
        configs = getattr(fused, name)
        monkeypatch.setattr(fused, name, [configs[i % len(configs)]])
    torch.manual_seed(1)
    p, r, shape = 0.4, 16, (3, 50, 264)  # 264 columns: a last partial tile for every width above
    x = torch.randn(*shape, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(r, shape[-1], requires_grad=True)
    seed = torch.tensor(99)
    y = fused.dropout_lora_a(x, weight, seed, p)
    monkeypatch.setattr(fused, "_FORWARD", [default_forward])  # the reference's mask from the default tiles
    dropped = _reference(x.detach(), weight, seed, p)
    torch.testing.assert_close(y, dropped @ weight.detach().T, rtol=1e-5, atol=1e-4)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(
        x.grad, (grad @ weight.detach()) * (dropped != 0) / (1 - p), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(
        weight.grad, grad.reshape(-1, r).T @ dropped.reshape(-1, shape[-1]), rtol=1e-4, atol=1e-3
    )
