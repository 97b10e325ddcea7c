"""speed-notes Next 34's loss check: fp32 LoRA adapters of a bf16 base trained three optimizer steps under
bf16 autocast, each adapter computed from its bf16 copy (--adapter_weight_copies) or from autocast's
cast at each use; eager and compiled as bodies, dropout 0 (compiled dropout draws from the graph's own
stream). Prints whether the losses and gradients are the same bit for bit (on the CPU both are, as the
tests assert with dropout too). On a GPU, cuBLAS runs the same bf16 matmuls either way.
Run from the repository root: PYTHONPATH=.:tests python scripts/gpu/check_weight_copies.py
"""

import torch
from test_train import _autocast_steps, _bf16_base_fp32_lora

from finqa_trl.modeling import compile_decoder_layers, shadow_adapter_weights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(copies: bool, compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch._dynamo.reset()
    model = _bf16_base_fp32_lora(dropout=0.0).to(DEVICE)
    if copies:
        shadow_adapter_weights(model, torch.bfloat16)
    if compiled:
        compile_decoder_layers(model, scope="body")
    ids = torch.randint(0, 128, (4, 96), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return _autocast_steps(model, ids, DEVICE)


print(
    f"device {DEVICE} ({torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}), "
    f"torch {torch.__version__}"
)
print("| mode | losses without copies | with copies | same losses | same gradients | max gradient diff |")
print("|---|---|---|---|---|---:|")
for compiled in (False, True):
    (a, ga), (b, gb) = run(False, compiled), run(True, compiled)
    diff = max((ga[k] - gb[k]).abs().max().item() for k in ga)
    same = all(torch.equal(ga[k], gb[k]) for k in ga)
    print(
        f"| {'compiled bodies' if compiled else 'eager'} | {', '.join(f'{x:.6f}' for x in a)} | "
        f"{', '.join(f'{x:.6f}' for x in b)} | {a == b} | {same} | {diff:.3g} |"
    )
