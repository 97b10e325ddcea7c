"""FSDP (v1) and PEFT: the adapter saved after an FSDP run, and its checkpoints, hold every adapter weight,
and a resume from such a checkpoint restores them (through accelerate's save_fsdp_model and load_fsdp_model,
as Trainer calls them).

On 2 H200s (results/multi-gpu-200steps) the FSDP LoRA run trained as well as one GPU but saved an empty
adapter: PEFT 0.21 misses every adapter entry of a model whose decoder layers FSDP wrapped one by one, and
`make eval` then scored the bare base. With that fixed, a resume on 2 H200s went on from freshly initialised
adapters: PEFT loaded none of the checkpoint's weights into the FSDP root. FSDP's state dicts need no GPU, so
two CPU processes check both fixes (modeling.fsdp_safe_adapter_keys, which train.py applies under FSDP) with a
tiny Llama."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # torchrun, two processes


def run_worker(tmp_path: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fsdp_adapter_holds_every_weight(tmp_path: Path, method: str) -> None:
    r = run_worker(tmp_path, method, "fix")
    assert len(r["expected"]) == {"lora": 28, "dora": 42}[method]  # 2 layers x 7 linears x A, B (+ magnitude)
    assert r["full"] == r["expected"]  # the final adapter
    assert r["sharded"] == r["expected"]  # a checkpoint's adapter
    assert r["resumed"]  # loading that checkpoint back into the FSDP root restores every adapter weight
    assert r["full_resumed"]  # so does a full (unsharded) one, into a fresh FSDP model before any forward
    assert r["saved"] == len(r["expected"])
    assert r["trained"] and r["same_values"]  # loaded onto a fresh base: the trained values, not a new init


def test_without_the_fix_this_peft_saves_nothing(tmp_path: Path) -> None:
    """The control: without the fix this PEFT saves an empty adapter, which train.py's check then refuses.
    Should a PEFT release find the keys itself, this test says the fix can go."""
    r = run_worker(tmp_path, "lora", "none")
    if r["full"]:
        pytest.skip("this PEFT finds the adapter's keys under FSDP by itself: fsdp_safe_adapter_keys can go")
    assert r["saved"] == 0 and not r["same_values"] and not r["resumed"]


def test_saving_fixed_alone_resumes_nothing(tmp_path: Path) -> None:
    """The second control: with only the saving half, the checkpoint holds every weight but the resume loads
    none of them (the loading half is what restores them). Should a PEFT release load them itself, this test
    says fsdp_safe_adapter_loading can go."""
    r = run_worker(tmp_path, "lora", "saving")
    assert r["sharded"] == r["expected"]  # the saving half alone: the checkpoint holds every weight
    if r["resumed"]:  # otherwise, as with PEFT 0.21, the resume restored nothing
        pytest.skip("this PEFT loads an FSDP root's adapter by itself: fsdp_safe_adapter_loading can go")
