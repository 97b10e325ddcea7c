"""The scorer CLI contract: upstream's numbers, one JSON object, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finqa_trl.data import load_split
from finqa_trl.dsl import program_to_string, tokenize_program
from finqa_trl.score import main, score

# Upstream's own evaluate.py (czyssrs/FinQA code/evaluate/evaluate.py @ 0f16e286), run on this machine
# over its example_predictions.json restricted to the 472 ids present in the sample's test split,
# printed Exe acc 0.3983050847457627 (188/472) and Prog acc 0.3834745762711864 (181/472).
UPSTREAM_EXE, UPSTREAM_PROG, UPSTREAM_N = 188, 181, 472


@pytest.fixture(scope="module")
def sample_test(sample_dir):
    return load_split(sample_dir, "test")


@pytest.fixture(scope="module")
def upstream_predictions(sample_dir, sample_test, tmp_path_factory):
    ids = {ex["id"] for ex in sample_test}
    preds = [p for p in json.loads((sample_dir / "example_predictions.json").read_text()) if p["id"] in ids]
    path = tmp_path_factory.mktemp("preds") / "predictions.json"
    path.write_text(json.dumps(preds))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finqa_trl.score", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_reproduces_upstreams_numbers(upstream_predictions, sample_dir, tmp_path):
    out = tmp_path / "metrics.json"
    proc = run_cli(str(upstream_predictions), str(sample_dir / "test.json.xz"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # ONE JSON object, nothing else on stdout
    metrics = json.loads(lines[0])
    assert metrics["n"] == UPSTREAM_N
    assert metrics["exe_acc"] == UPSTREAM_EXE / UPSTREAM_N == 0.3983050847457627
    assert metrics["prog_acc"] == UPSTREAM_PROG / UPSTREAM_N == 0.3834745762711864
    assert 0 < metrics["invalid"] < 0.1
    assert json.loads(out.read_text()) == metrics
    assert sum(v["n"] for v in metrics["by_steps"].values()) == UPSTREAM_N


def test_gold_programs_score_perfectly_as_strings_or_token_lists(sample_test):
    as_strings = [{"id": ex["id"], "predicted": ex["qa"]["program"]} for ex in sample_test]
    as_tokens = [{"id": ex["id"], "predicted": tokenize_program(ex["qa"]["program"])} for ex in sample_test]
    for preds in (as_strings, as_tokens):
        metrics, details = score(preds, sample_test)
        assert (metrics["n"], metrics["exe_acc"], metrics["prog_acc"], metrics["invalid"]) == (
            509,
            1.0,
            1.0,
            0.0,
        )
        assert all(d["predicted_program"] == d["gold_program"] for d in details)


def test_details_explain_each_prediction(sample_test):
    ex = sample_test[0]
    preds = [{"id": ex["id"], "predicted": "divide(1, 0)"}]
    metrics, [d] = score(preds, sample_test)
    assert metrics["invalid"] == 1.0 and metrics["exe_acc"] == 0.0
    assert d["invalid_reason"] == "division by zero"
    assert d["gold_program"] == ex["qa"]["program"] and d["question"] == ex["qa"]["question"]
    assert d["steps"] == len(tokenize_program(ex["qa"]["program"])[:-1]) // 4


def test_scoring_does_not_import_torch():
    code = "import sys, finqa_trl.score; print('torch' in sys.modules, 'transformers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False False"


FIXTURE_GOLD = [
    {
        "id": "a",
        "pre_text": [],
        "post_text": [],
        "table": [["x", "1"]],
        "qa": {"question": "q?", "program": "add(1, 2)", "exe_ans": 3.0},
    },
    {
        "id": "b",
        "pre_text": [],
        "post_text": [],
        "table": [["x", "1"]],
        "qa": {"question": "q?", "program": "greater(1, 2)", "exe_ans": "no"},
    },
]


@pytest.fixture
def gold_file(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(FIXTURE_GOLD))
    return path


def write(tmp_path, obj, name="preds.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_cli_scores_a_small_file(tmp_path, gold_file, capsys):
    preds = [
        {"id": "a", "predicted": "add(2, 1)"},
        {"id": "b", "predicted": ["greater(", "1", "2", ")", "EOF"]},
    ]
    assert main([write(tmp_path, preds), str(gold_file)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert (metrics["n"], metrics["exe_acc"], metrics["prog_acc"]) == (2, 1.0, 1.0)
    # A subset is scored over its own size, as upstream does.
    assert main([write(tmp_path, preds[:1]), str(gold_file)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1


@pytest.mark.parametrize(
    "preds,message",
    [
        ([{"id": "zzz", "predicted": "add(1, 2)"}], "id 'zzz' (entry 0) is not in the gold split"),
        ([{"id": "a", "predicted": "x"}, {"id": "a", "predicted": "y"}], "duplicate id 'a' (entry 1)"),
        ([], "no predictions to score"),
        ({"id": "a"}, "expected a JSON list"),
        ([{"id": "a"}], "entry 0 is not an object with 'id' and 'predicted'"),
        ("[{not json", "not valid JSON"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, gold_file, preds, message):
    proc = run_cli(write(tmp_path, preds), str(gold_file))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_cli_errors_on_missing_and_bad_gold(tmp_path, gold_file):
    preds = write(tmp_path, [{"id": "a", "predicted": "add(1, 2)"}])
    proc = run_cli(preds, str(tmp_path / "nope.json"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope.json" in proc.stderr
    dup = write(tmp_path, FIXTURE_GOLD + FIXTURE_GOLD[:1], "dup.json")
    proc = run_cli(preds, dup)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'a'" in proc.stderr
    proc = run_cli(str(tmp_path / "missing.json"), str(gold_file))
    assert proc.returncode == 2 and "missing.json: no such file" in proc.stderr


def test_garbage_predictions_count_as_invalid(tmp_path, gold_file, capsys):
    preds = [{"id": "a", "predicted": 42}, {"id": "b", "predicted": ["EOF"]}]
    assert main([write(tmp_path, preds), str(gold_file)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert (metrics["exe_acc"], metrics["invalid"]) == (0.0, 1.0)
    assert program_to_string(["add(", "1", "2", ")", "EOF"]) == "add(1, 2)"
