"""scripts/smollm2_runs.sh: the one command behind the SmolLM2 results rows (its real runs need a GPU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "smollm2_runs.sh"


def fake_python(tmp_path: Path) -> Path:
    """A stand-in python that records each call in $CALLS and writes the files the real steps would."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$*" >> "$CALLS"\n'
        'out=""; prev=""; for a in "$@"; do [ "$prev" = --output_dir ] && out=$a; prev=$a; done\n'
        'if [ "$2" = finqa_trl.predict ]; then [ -n "$out" ] || out=$4; mkdir -p "$out";'
        ' for k in metrics details predictions; do echo {} > "$out/${k}_test.json"; done; fi\n'
    )
    fake.chmod(0o755)
    return fake


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_bad_arguments_are_one_line():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "m", "/no/such/dir"], capture_output=True, text=True, cwd=ROOT
    )
    assert (proc.returncode, proc.stderr) == (2, "error: FINQA_DIR /no/such/dir: no such directory\n")


def test_runs_each_recipe_then_the_baselines_and_logs_every_command(tmp_path):
    fake = fake_python(tmp_path)
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(tmp_path / "calls"), "METHODS": "lora qdora",
           "TRAIN_ARGS": "--logging_steps 5", "Q_TRAIN_ARGS": "--kbit_fp32_upcast true"}  # fmt: skip
    subprocess.run(
        ["bash", str(SCRIPT), "model.gguf", str(data), str(results)], check=True, cwd=tmp_path, env=env
    )
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[1] for c in calls] == ["finqa_trl.train", "finqa_trl.predict"] * 2 + [
        "finqa_trl.predict"
    ] * 2 + ["finqa_trl.report"]
    assert "--config recipes/smollm2-135m-qdora.yaml --model_name_or_path model.gguf" in calls[2]
    assert "--train_splits train dev" in calls[0] and "--eg_k 3" in calls[5]
    # Q_TRAIN_ARGS reach the 4-bit recipes only (the 16-bit ones refuse --kbit_fp32_upcast)
    assert calls[0].endswith("--logging_steps 5")
    assert calls[2].endswith("--logging_steps 5 --kbit_fp32_upcast true")
    assert len((results / "commands.txt").read_text().splitlines()) == len(calls)
    for run in ("lora", "qdora", "base-0shot", "base-3shot"):
        assert (results / run / "metrics_test.json").is_file()
        assert (results / run / "predictions_test.json").is_file()
        # FinQA's questions and gold programs must not reach a committed folder
        assert not (results / run / "details_test.json").exists()


def test_empty_shots_runs_no_baseline(tmp_path):
    # SHOTS="" reruns recipes only (the committed baseline rows stay); unset, both baselines run (above)
    (tmp_path / "data").mkdir()
    env = {**os.environ, "PYTHON": str(fake_python(tmp_path)), "CALLS": str(tmp_path / "calls")}
    env.update(METHODS="lora", SHOTS="")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "m.gguf", str(tmp_path / "data"), str(tmp_path / "r")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    calls = [c.split()[1] for c in (tmp_path / "calls").read_text().splitlines()]
    assert calls == ["finqa_trl.train", "finqa_trl.predict", "finqa_trl.report"], proc.stderr
