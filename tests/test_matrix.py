"""finqa_trl.matrix: the multi-GPU launch matrix, run here with two CPU processes (cpu_ddp) for two GPUs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finqa_trl import matrix

ROOT = Path(__file__).resolve().parents[1]


def test_error_line_prefers_our_line_then_the_exception():
    assert matrix.error_line("x\nerror: bad flag\nTraceback\nValueError: y\n") == "error: bad flag"
    assert matrix.error_line("Traceback (most recent call last):\n  ...\nValueError: shape mismatch\n") == (
        "ValueError: shape mismatch"
    )
    assert matrix.error_line("a\nlast words\n") == "last words"
    # torchrun: each rank's exception, prefixed, then the launcher's own, which says nothing
    launched = (
        '[rank1]: Traceback (most recent call last):\n[rank1]:   File "x.py", line 1\n'
        "[rank1]: RuntimeError: Tensors of the same index must be on the same device\n"
        "    raise ChildFailedError(\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "====\nfinqa_trl.train FAILED\nmake: *** [Makefile:67: train] Error 1\n"
    )
    assert matrix.error_line(launched) == "RuntimeError: Tensors of the same index must be on the same device"
    assert matrix.error_line("") == "no output"


def test_loss_difference_over_the_common_steps():
    assert matrix.loss_difference({5: 1.1, 10: 0.5}, {5: 1.0, 10: 0.5, 15: 0.4}) == pytest.approx(0.1)
    assert matrix.loss_difference({5: 1.0}, {10: 1.0}) is None


def test_bad_arguments_are_one_line(capsys, tmp_path):
    assert matrix.main(["--configs", "no_such_config"]) == 2
    assert capsys.readouterr().err == "error: no accelerate config accelerate_configs/no_such_config.yaml\n"
    assert matrix.main(["--recipes", "smoke", "--configs", "cpu_ddp", "--runs_dir", str(tmp_path)]) == 2
    assert "accumulation 1 is not a multiple of --num_gpus 2" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was started or written
    for bad, says in (
        (["--accumulation", "0"], "--accumulation must be at least 1"),
        (["--eval_limit", "-1"], "--eval_limit must be >= 0"),
        (["--configs", "multi_gpu", "single_gpu"], "each N-GPU config once"),
        (["--train_args", "--gradient_accumulation_steps 8"], "may not set --gradient_accumulation_steps"),
        (["--train_args", "--lora_dropout 0.1"], "may not set --lora_dropout"),
    ):
        assert matrix.main([*bad, "--runs_dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert not list(tmp_path.iterdir())


def test_resume_compares_kept_rows_with_a_new_baseline_and_reruns_failed_evals(tmp_path, monkeypatch, capsys):
    ran: list[str] = []
    fails = {"single_gpu", "fsdp eval"}  # the first time: the one-GPU run fails, and the FSDP run's eval

    def fake_run(self, recipe, config, gpus, accumulation):  # trains and, faked here, evaluates too
        ran.append(config)
        row = {"recipe": recipe, "config": config, "num_gpus": gpus, "works": config not in fails}
        if not row["works"]:  # a failure that says nothing about N GPUs (unlike a refused input, below)
            return {**row, "error": "torch.OutOfMemoryError: CUDA out of memory"}
        loss = {1: 2.0, 2: 1.0} if config == "single_gpu" else {1: 2.02, 2: 1.0}
        ev = {"error": "timed out"} if f"{config} eval" in fails else {"n": 2, "exe_acc": 0.0, "invalid": 1.0}
        return {**row, "loss": loss, "tokens_per_s": 100.0 * gpus, "eval": ev}

    monkeypatch.setattr(matrix.Matrix, "run", fake_run)
    monkeypatch.setattr(matrix.Matrix, "evaluate_run", lambda self, row: row)
    monkeypatch.setattr(matrix, "plot", lambda rows, path: None)
    args = ["--recipes", "smoke", "--configs", "multi_gpu", "fsdp", "--accumulation", "2",
            "--out", str(tmp_path / "m"), "--runs_dir", str(tmp_path / "runs")]  # fmt: skip
    assert matrix.main(args) == 0
    first = {r["config"]: r for r in json.loads((tmp_path / "m" / "matrix.json").read_text())["runs"]}
    assert "speedup" not in first["multi_gpu"]  # nothing to compare with
    fails.clear()
    ran.clear()
    assert matrix.main(args) == 0
    assert ran == ["single_gpu", "fsdp"]  # multi_gpu kept; fsdp reran, its eval had failed
    rows = {r["config"]: r for r in json.loads((tmp_path / "m" / "matrix.json").read_text())["runs"]}
    assert rows["multi_gpu"]["speedup"] == 2.0 and rows["multi_gpu"]["loss_rel_diff"] == pytest.approx(0.01)
    assert "error" not in rows["fsdp"]["eval"] and rows["fsdp"]["speedup"] == 2.0


def test_a_matrix_cut_off_during_an_eval_keeps_the_training_and_a_rerun_only_evaluates(tmp_path, monkeypatch):
    # A lease's time limit can end the matrix between a run's training and its eval (seen on 2 GPUs): the
    # training's row must be saved already, and the rerun must evaluate the adapter without training again.
    calls: list[tuple[str, str]] = []
    cut = {"on": True}

    def fake_make(self, target, log, **v):
        out = Path(v["OUTPUT_DIR"])
        calls.append((target, out.name))
        out.mkdir(parents=True, exist_ok=True)
        history = [{"step": 1, "loss": 2.0, "num_tokens": 10}, {"step": 2, "loss": 1.0, "num_tokens": 20}]
        (out / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": history}))
        (out / "train_results.json").write_text(json.dumps({"train_runtime": 1.0}))
        (out / "adapter_config.json").write_text("{}")
        return 0, "trained"

    def fake_evaluate(self, name, out, gpus, output_dir=None):
        calls.append(("eval", name))
        if cut["on"]:
            raise KeyboardInterrupt  # the matrix killed mid-eval
        return {"n": 2, "exe_acc": 0.5, "prog_acc": 0.5, "invalid": 0.0, "num_processes": gpus}

    monkeypatch.setattr(matrix.Matrix, "make", fake_make)
    monkeypatch.setattr(matrix.Matrix, "evaluate", fake_evaluate)
    across = {"n": 2, "identical": 2, "same_order": True, "num_gpus": 2}
    monkeypatch.setattr(matrix.Matrix, "eval_across", lambda self, name, out: across)
    monkeypatch.setattr(matrix, "plot", lambda rows, path: None)
    args = ["--recipes", "smoke", "--configs", "multi_gpu", "--accumulation", "2", "--eval_limit", "2",
            "--out", str(tmp_path / "m"), "--runs_dir", str(tmp_path / "runs")]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        matrix.main(args)
    saved = json.loads((tmp_path / "m" / "matrix.json").read_text())["runs"]
    assert [(r["config"], r["works"], r["tokens_per_s"], r["eval"]["error"]) for r in saved] == [
        ("single_gpu", True, 20.0, matrix.PENDING)
    ]
    assert calls == [("train", "single_gpu-1gpu-smoke"), ("eval", "single_gpu-1gpu-smoke")]
    cut["on"] = False
    calls.clear()
    assert matrix.main(args) == 0
    assert calls == [("eval", "single_gpu-1gpu-smoke"), ("train", "multi_gpu-2gpu-smoke"),
                     ("eval", "multi_gpu-2gpu-smoke")]  # fmt: skip
    rows = {r["config"]: r for r in json.loads((tmp_path / "m" / "matrix.json").read_text())["runs"]}
    assert rows["single_gpu"]["eval"]["exe_acc"] == 0.5 and rows["single_gpu"]["eval_across"] == across
    assert rows["multi_gpu"]["speedup"] == 1.0 and rows["multi_gpu"]["loss_rel_diff"] == 0.0


@pytest.fixture
def in_repo(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # make, the recipes and the accelerate configs live there
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return tmp_path


def test_two_processes_match_one_at_the_same_global_batch(in_repo, capsys):
    out = in_repo / "matrix"
    args = ["--recipes", "smoke", "--configs", "cpu_ddp", "--accumulation", "2", "--eval_limit", "2"]
    extra = ["--runs_dir", str(in_repo / "runs"), "--train_args", "--num_train_epochs 10"]
    assert matrix.main([*args, "--out", str(out), *extra]) == 0
    runs = json.loads((out / "matrix.json").read_text())["runs"]
    one, two = runs
    assert (one["config"], one["num_gpus"], one["accumulation"]) == ("single_gpu", 1, 2)
    assert (two["config"], two["num_gpus"], two["accumulation"]) == ("cpu_ddp", 2, 1)
    assert one["works"] and two["works"]
    # the same examples in every optimizer step: the same token count, and the first logged loss to the digit
    assert one["tokens"] == two["tokens"] and one["steps"] == two["steps"]
    first = min(one["loss"], key=int)
    assert two["loss"][first] == pytest.approx(one["loss"][first], rel=1e-5)
    assert two["loss_rel_diff"] <= matrix.LOSS_TOLERANCE and two["speedup"] > 0
    assert one["eval"]["n"] == 2 and two["eval"]["num_processes"] == 2
    # the one-process adapter evaluated again across both processes: the same predictions, in the same order
    across = one["eval_across"]
    assert across["num_processes"] == across["num_gpus"] == 2
    assert across["identical"] == across["n"] == 2 and across["same_order"]
    table = (out / "matrix.md").read_text()
    assert "| cpu_ddp | smoke | 2 | works |" in table and "matches: max" in table
    assert "| runs (n=2: exe acc " in table and (out / "loss.png").stat().st_size > 1000
    assert "adapter on 2 GPUs: 2/2 predictions identical to the one-GPU run's, in the same order" in table
    # The same command again resumes: both runs worked, so both are kept and nothing is launched.
    capsys.readouterr()
    saved = (out / "matrix.json").read_text()
    assert matrix.main([*args, "--out", str(out), *extra]) == 0
    assert capsys.readouterr().out.count(matrix.KEPT) == 2
    assert json.loads((out / "matrix.json").read_text())["runs"] == json.loads(saved)["runs"]
    # Other settings would mix numbers of two setups in one table: one line, the file untouched.
    other = [*args[:-1], "5", "--out", str(out), *extra]
    assert matrix.main(other) == 2
    assert "other settings (eval_limit)" in capsys.readouterr().err
    assert json.loads((out / "matrix.json").read_text())["runs"] == json.loads(saved)["runs"]
    # eval's files are named as predict names them: _first<N> only when N is less than the split (6 here)
    run = in_repo / "runs" / "cpu_ddp-2gpu-smoke"
    named = matrix.Matrix(argparse.Namespace(runs_dir=str(run), out=str(out), eval_limit=100)).metrics_file(
        run
    )
    assert named == run / "metrics_test.json"


def test_a_launch_refused_on_its_input_is_a_row_with_its_reason_and_no_n_gpu_run(in_repo, capsys):
    # The one-GPU run stops on a bad training option (before loading anything): every config would stop the
    # same way, so only that row is recorded and no N-GPU run is launched to hear it again.
    out = in_repo / "matrix"
    args = ["--recipes", "smoke", "--configs", "cpu_ddp", "--accumulation", "2", "--eval_limit", "0"]
    extra = ["--runs_dir", str(in_repo / "runs"), "--train_args", "--lora_r notanumber"]
    assert matrix.main([*args, "--out", str(out), *extra]) == 2
    runs = json.loads((out / "matrix.json").read_text())["runs"]
    assert [(r["config"], r["works"], r.get("refused")) for r in runs] == [("single_gpu", False, True)]
    assert "invalid int value: 'notanumber'" in runs[0]["error"], runs
    assert "fails: " in (out / "matrix.md").read_text()
    err = capsys.readouterr().err
    assert "smoke: the one-GPU run was refused on its input, so its 1 N-GPU runs are not launched" in err
    assert not (in_repo / "runs" / "cpu_ddp-2gpu-smoke.train.log").exists()


def test_a_failure_after_loading_or_a_timeout_is_not_a_refused_input(monkeypatch, tmp_path):
    # Only a run that stopped before loading anything (no fresh recipe.yaml) on its own `error:` line was
    # refused on its input; a timeout, or an error after training (a failed merge), says nothing about N GPUs.
    said = {"rc": 2, "text": "error: bad input", "writes": False}

    def fake_make(self, target, log, **variables):
        if said["writes"]:
            Path(variables["OUTPUT_DIR"]).mkdir(parents=True, exist_ok=True)
            (Path(variables["OUTPUT_DIR"]) / "recipe.yaml").write_text("recipe: smoke\n")
        return said["rc"], said["text"]

    monkeypatch.setattr(matrix.Matrix, "make", fake_make)
    m = matrix.Matrix(argparse.Namespace(runs_dir=str(tmp_path), out=str(tmp_path / "m"), eval_limit=0,
                                         model=None, data_dir=None, train_args=""))  # fmt: skip
    assert m.run("smoke", "single_gpu", 1, 2)["refused"] is True
    said.update(rc=matrix.TIMEOUT_RC, text="step 3\nerror: timed out after 5 s")
    assert "refused" not in m.run("smoke", "single_gpu", 1, 2)
    said.update(rc=1, text="error: training finished, but: merge failed", writes=True)
    assert "refused" not in m.run("smoke", "single_gpu", 1, 2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie has ended


def _wait_file(path: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.is_file()


# A "launcher" that prints, starts a worker that outlives it unless killed (as accelerate's ranks would),
# and waits: what `make train` looks like from the matrix.
LAUNCHER = "echo step 7 of 200; sleep 60 & echo $! > {pid}; wait"


def test_a_timeout_keeps_the_log_and_ends_the_whole_run(tmp_path):
    """A run that times out leaves its log so far, and none of its processes (a rank left running would hold
    the GPUs for the next run)."""
    pid = tmp_path / "worker.pid"
    cmd = ["bash", "-c", LAUNCHER.format(pid=pid)]
    rc, text = matrix.run_logged(cmd, tmp_path / "a.log", timeout=2)
    assert rc == matrix.TIMEOUT_RC and text.startswith("step 7 of 200") and "timed out after 2 s" in text
    assert (tmp_path / "a.log").read_text().startswith("bash -c")
    assert not _alive(int(pid.read_text()))


def test_a_matrix_stopped_from_outside_keeps_the_log_and_ends_the_run(tmp_path):
    """SIGTERM to the matrix (what a lease's `timeout` sends): the run's log so far stays and its processes
    end (a lease's limit once took a 6-minute ZeRO-3 run's whole log, when logs were written at the end)."""
    pid, log = tmp_path / "worker.pid", tmp_path / "b.log"
    code = (
        "import sys; from pathlib import Path; from finqa_trl import matrix; matrix.exit_on_sigterm(); "
        f"matrix.run_logged(['bash', '-c', {LAUNCHER.format(pid=pid)!r}], Path({str(log)!r}), 600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    _wait_file(pid)
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert "step 7 of 200" in log.read_text()
    assert not _alive(int(pid.read_text()))
