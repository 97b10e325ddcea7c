"""Execution and program accuracy, identical to upstream FinQA's `evaluate.py`.

    python -m finqa_trl.score PREDICTIONS GOLD [--output FILE] [--details FILE]

PREDICTIONS: the official format, a JSON list of {"id", "predicted": [tokens..., "EOF"]}; `predicted`
may also be a plain program string. GOLD: an official split file (.json, .json.gz, .json.xz).
Prints ONE JSON object on stdout: n, exe_acc, prog_acc, invalid (fraction that does not execute), the
counts, and accuracy by number of gold steps and by gold operation. The denominator is the number
of predictions, as upstream's. Bad input: one line on stderr, exit code 2.

Importing this module must not import torch: it is the fast path every other tool calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from finqa_trl.data import DataError, load_file
from finqa_trl.dsl import ALL_OPS, answers_match, as_tokens, equal_program, execute, program_to_string

from . import OneLineError


class ScoreError(OneLineError):
    """Input the scorer cannot score; the message is one line naming the culprit."""


def index_gold(gold: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for ex in gold:
        if ex["id"] in out:
            raise ScoreError(f"duplicate id {ex['id']!r} in the gold file")
        out[ex["id"]] = ex
    return out


def check_predictions(
    predictions: Any, gold_by_id: dict[str, dict[str, Any]], where: str = "predictions"
) -> None:
    """Every entry is {"id", "predicted"}, ids are unique and all present in the gold split."""
    if not isinstance(predictions, list):
        raise ScoreError(f"{where}: expected a JSON list of {{'id', 'predicted'}} objects")
    if not predictions:
        raise ScoreError(f"{where}: no predictions to score")
    seen: set[str] = set()
    for i, p in enumerate(predictions):
        if not isinstance(p, dict) or "id" not in p or "predicted" not in p:
            raise ScoreError(f"{where}: entry {i} is not an object with 'id' and 'predicted'")
        pid = p["id"]
        if not isinstance(pid, str):
            raise ScoreError(f"{where}: entry {i} has a non-string id {pid!r}")
        if pid in seen:
            raise ScoreError(f"{where}: duplicate id {pid!r} (entry {i})")
        if pid not in gold_by_id:
            raise ScoreError(f"{where}: id {pid!r} (entry {i}) is not in the gold split — wrong split file?")
        seen.add(pid)


def gold_ops(program: str) -> list[str]:
    tokens = as_tokens(program)[:-1]
    return [t.rstrip("(") for t in tokens[::4]]


def score_one(predicted: Any, gold: dict[str, Any]) -> dict[str, Any]:
    """One prediction against its gold record: upstream's two checks plus what error analysis needs."""
    pred_tokens = as_tokens(predicted) if isinstance(predicted, (str, list)) else ["EOF"]
    gold_tokens = as_tokens(gold["qa"]["program"])
    run = execute(pred_tokens, gold["table"])
    exe_ok = not run.invalid and answers_match(run.value, gold["qa"]["exe_ans"])
    ops = gold_ops(gold["qa"]["program"])
    return {
        "id": gold["id"],
        "question": gold["qa"]["question"],
        "gold_program": gold["qa"]["program"],
        "predicted_program": program_to_string(pred_tokens),
        "value": run.value,
        "gold_value": gold["qa"]["exe_ans"],
        "exe_correct": exe_ok,
        "prog_correct": equal_program(gold_tokens, pred_tokens),
        "invalid": run.invalid,
        "invalid_reason": run.reason,
        "steps": len(ops),
        "ops": ops,
    }


def summarize(details: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(details)
    exe = sum(d["exe_correct"] for d in details)
    prog = sum(d["prog_correct"] for d in details)
    bad = sum(d["invalid"] for d in details)

    def breakdown(keys, order) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for d in details:
            for k in keys(d):
                groups[k].append(d)
        return {
            k: {
                "n": len(g),
                "exe_acc": sum(x["exe_correct"] for x in g) / len(g),
                "prog_acc": sum(x["prog_correct"] for x in g) / len(g),
            }
            for k, g in sorted(groups.items(), key=lambda kv: order(kv[0]))
        }

    def op_order(op: str) -> tuple[int, str]:
        return (ALL_OPS.index(op), op) if op in ALL_OPS else (len(ALL_OPS), op)

    return {
        "n": n,
        "exe_acc": exe / n if n else 0.0,
        "prog_acc": prog / n if n else 0.0,
        "invalid": bad / n if n else 0.0,
        "exe_correct": exe,
        "prog_correct": prog,
        "n_invalid": bad,
        "by_steps": breakdown(lambda d: [str(d["steps"])], int),
        "by_op": breakdown(lambda d: set(d["ops"]), op_order),
    }


def score(
    predictions: list[dict[str, Any]], gold: Iterable[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict]]:
    """Metrics and per-example details; raises ScoreError on unscoreable input."""
    by_id = index_gold(gold)
    check_predictions(predictions, by_id)
    details = [score_one(p["predicted"], by_id[p["id"]]) for p in predictions]
    return summarize(details), details


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write-then-rename, so an interrupted run never leaves a truncated file behind."""
    write_atomic(path, lambda f: (json.dump(obj, f, indent=indent, ensure_ascii=False), f.write("\n")))


def write_atomic(path: str | Path, write: Callable[[Any], Any], mode: str = "w") -> None:
    """`write(file)` into a temporary file beside `path`, then rename it over `path`: readers (other ranks, a
    resumed run) see the old file or the new one, never half of one. `mode` "wb" for binary writers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with mode 0o666 lets the umask decide, as for any other file (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_predictions(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ScoreError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ScoreError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScoreError(f"{path}: cannot read ({e})") from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finqa_trl.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", help="official-format predictions JSON")
    ap.add_argument("gold", help="official split file (.json / .json.gz / .json.xz)")
    ap.add_argument("--output", help="also write the metrics JSON here")
    ap.add_argument("--details", help="write per-example results (JSON list) here")
    args = ap.parse_args(argv)
    try:
        predictions = _read_predictions(args.predictions)
        gold = load_file(args.gold, labelled=True)
        metrics, details = score(predictions, gold)
    except (ScoreError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        write_json_atomic(args.output, metrics)
    if args.details:
        write_json_atomic(args.details, details)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
