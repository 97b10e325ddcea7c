"""Evaluation over several processes on the CPU (torchrun, gloo): two ranks generate the batches one process
does and write the same predictions file, metrics and details; the shards of an interrupted run are resumed,
by any number of processes.

The smoke model generates a few tokens per example; each launch costs a few seconds of imports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import torchrun_main

from finqa_trl import predict
from finqa_trl.data import FIXTURE_DIR, load_split
from finqa_trl.modeling import SMOKE_MODEL

ROOT = Path(__file__).resolve().parents[1]
N_TEST = len(load_split(FIXTURE_DIR, "test"))
ARGS = ["--model", SMOKE_MODEL, "--max_new_tokens", "6", "--data_dir", str(FIXTURE_DIR)]
OUTPUTS = ["details_test.json", "metrics_test.json", "predictions_test.json"]

pytestmark = pytest.mark.slow


def read(path: Path):
    return json.loads(path.read_text())


def launch(out: Path, *extra: str, logs: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m finqa_trl.predict`, failing where the process group outlived main();
    with `logs`, each rank writes its output there."""
    options = [] if logs is None else ["--log-dir", str(logs), "--redirects", "3"]
    cmd = [sys.executable, *torchrun_main("predict", *options), *ARGS, "--output_dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets anyway, minus its banner about it
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def rank_output(logs: Path, rank: int) -> str:
    files = sorted(logs.rglob(f"attempt_*/{rank}/std*.log"))
    assert files, list(logs.rglob("*"))
    return "".join(f.read_text() for f in files)


def without_run_info(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in predict.RUN_INFO_KEYS}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process, in this one."""
    out = tmp_path_factory.mktemp("single")
    assert predict.main([*ARGS, "--output_dir", str(out)]) == 0
    return out


def test_two_processes_write_what_one_process_writes(single, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = launch(out, logs=logs)
    assert proc.returncode == 0, rank_output(logs, 0)[-3000:] + rank_output(logs, 1)[-3000:]
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS  # the shards are merged and gone
    # ids, order, predicted tokens and raw text; then the same scores and per-example details
    assert read(out / "predictions_test.json") == read(single / "predictions_test.json")
    assert read(out / "details_test.json") == read(single / "details_test.json")
    one, two = read(single / "metrics_test.json"), read(out / "metrics_test.json")
    assert without_run_info(two) == without_run_info(one)
    assert (one["num_processes"], two["num_processes"]) == (1, 2) and two["n_generated"] == N_TEST
    assert "exe_acc" in rank_output(logs, 0) and rank_output(logs, 1) == ""  # rank 1 prints nothing


def test_two_processes_generate_the_batches_one_process_does(tmp_path):
    # 3,000 tokens a batch: one process plans 4 prompts, then 2. Dealing every other example would give each
    # rank 3 prompts in one batch; whole batches of the one-process plan go 4 to one rank and 2 to the other.
    budget = ["--max_batch_tokens", "3000"]
    assert predict.main([*ARGS, "--output_dir", str(tmp_path / "one"), *budget]) == 0
    proc = launch(tmp_path / "two", *budget)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read(tmp_path / "one" / "metrics_test.json"), read(tmp_path / "two" / "metrics_test.json")
    assert (one["batches"], one["largest_batch"]) == (2, 4)
    assert (two["batches"], two["largest_batch"], two["num_processes"]) == (2, 4, 2)
    for name in OUTPUTS[::2]:  # details and predictions
        assert read(tmp_path / "two" / name) == read(tmp_path / "one" / name)


def test_resume_from_predictions_and_leftover_shards(single, tmp_path):
    reference = read(single / "predictions_test.json")
    # An interrupted 4-process run: the merged file from before it, and the shards of ranks 1 and 3.
    main = [{**reference[0], "raw": "MAIN"}]
    shard1 = [{**reference[3], "raw": "SHARD1"}]
    shard3 = [{**reference[1], "raw": "SHARD3"}, {**reference[0], "raw": "DUPLICATE"}]
    tmp_path.joinpath("predictions_test.json").write_text(json.dumps(main))
    tmp_path.joinpath("predictions_test.shard1.json").write_text(json.dumps(shard1))
    tmp_path.joinpath("predictions_test.shard3.json").write_text(json.dumps(shard3))

    proc = launch(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == OUTPUTS
    done = {p["id"] for p in main + shard1 + shard3}
    # What was done first (an id once), then the rest in the order one process generates them in.
    assert read(tmp_path / "predictions_test.json") == main + shard1 + shard3[:1] + [
        p for p in reference if p["id"] not in done
    ]
    metrics = read(tmp_path / "metrics_test.json")
    assert metrics["n"] == N_TEST and metrics["n_generated"] == N_TEST - len(done)


def test_one_process_resumes_leftover_shards(single, tmp_path):
    reference = read(single / "predictions_test.json")
    tmp_path.joinpath("predictions_test.shard0.json").write_text(json.dumps(reference[:2]))
    assert predict.main([*ARGS, "--output_dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == OUTPUTS
    assert read(tmp_path / "predictions_test.json") == reference
    assert read(tmp_path / "metrics_test.json")["n_generated"] == N_TEST - 2


def test_bad_input_stops_every_rank_with_one_line(tmp_path):
    proc = launch(tmp_path / "out", "--split", "validation", logs=tmp_path / "logs")
    assert proc.returncode != 0
    errors = [rank_output(tmp_path / "logs", r).strip() for r in (0, 1)]
    # Each rank exits 2 with the one line, unless the launcher ends it first for the other rank's failure.
    assert any(e.startswith("error: no FinQA split 'validation'") for e in errors), errors
    assert all(e == "" or (e.startswith("error: ") and "\n" not in e) for e in errors), errors
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-3000:]  # torchrun's report
    assert not (tmp_path / "out").exists()
