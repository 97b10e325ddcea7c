"""Inductor's kernel calls for one compiled body, forward and backward, with and without the fp32 adapters'
bf16 copies (speed-notes Next 34), on the CPU: the 2-layer test model of tests/test_train.py (bf16 base, fp32
LoRA on every linear layer, dropout 0.05, the non-reentrant checkpoint) under bf16 autocast. Counts the calls
in the generated code that the `output_code` log prints, by kernel name.
Run from the repository root: PYTHONPATH=.:tests python results/adapter-weight-copies-cpu/count_kernels.py
"""

import collections
import io
import logging
import re
import sys

import torch

from finqa_trl.modeling import compile_decoder_layers, shadow_adapter_weights

sys.path.insert(0, "tests")
from test_train import _bf16_base_fp32_lora  # noqa: E402

CALL = re.compile(r"^\s+(cpp_fused_\w+?)(?:_\d+)?\(", re.M)


def kernel_calls(copies: bool) -> collections.Counter:
    torch._dynamo.reset()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("torch._inductor.codecache").addHandler(handler)
    torch._logging.set_logs(output_code=True)
    model = _bf16_base_fp32_lora(0.05)
    if copies:
        shadow_adapter_weights(model, torch.bfloat16)
    compile_decoder_layers(model, scope="body")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch._logging.set_logs(output_code=False)
    logging.getLogger("torch._inductor.codecache").removeHandler(handler)
    return collections.Counter(CALL.findall(stream.getvalue()))


for copies in (False, True):
    calls = kernel_calls(copies)
    weight_casts = sum(n for name, n in calls.items() if re.fullmatch(r"cpp_fused__to_copy\w*_t", name))
    plain = calls["cpp_fused__to_copy"]
    print(
        f"copies={copies}: {sum(calls.values())} kernel calls; weight casts (names ending _to_copy..._t) "
        f"{weight_casts}; plain _to_copy {plain}"
    )
