"""The multi-GPU launch matrix: each accelerate config x recipe on N GPUs, against one GPU at the same batch.

    python -m finqa_trl.matrix --model MODEL --data_dir FINQA_DIR [--num_gpus 2]
        [--configs multi_gpu fsdp deepspeed_zero2 deepspeed_zero3]
        [--recipes smollm2-135m-lora smollm2-135m-qdora] [--eval_limit 100] [--out results/multi-gpu]

For each recipe, `make train` first runs on one GPU (`single_gpu`, the recipe's micro-batch x accumulation A),
then on `--num_gpus` GPUs under each config with accumulation A / N: the same global batch, and the same
examples in each optimizer step (accelerate deals the one-process batches out to the ranks in turn). Then
`make eval` runs on each saved adapter with the same GPUs (`--eval_limit` test examples). Every run trains
on train + dev in random order without LoRA dropout (see below), logs the loss every 5 steps and saves no
checkpoints.

Writes `<out>/matrix.json` and `<out>/matrix.md` after every run: works / fails with the error line, tokens/s
(TRL's token count over the processes, scaled from the last logged step to all, / train_runtime) and its ratio
to one GPU, peak memory per GPU, and the largest relative difference between the loss curve and the one-GPU
curve. Rerunning the same command resumes: runs that trained and evaluated are kept from `matrix.json` (their
settings must be the same), the others run, rows of other recipes stay; `--overwrite` starts afresh. A run's
training row is saved before its evals, so a matrix stopped during an eval keeps what the training measured; a
rerun evaluates that run's adapter without training it again, if it is still there. A recipe whose one-GPU run
is refused on its input (the run's own `error:` line before it loaded anything; not a timeout or a crash)
launches no N-GPU runs, which would be refused alike, and the matrix exits with 2. Dropout would draw its
masks per process, so the runs set `--lora_dropout 0`: the first logged losses then agree (LoRA on 2 H200s: to
the digit under DDP and ZeRO-2/3, 0.18% off under FSDP), and later ones drift by summation order
(LOSS_TOLERANCE is what counts as matching). Each run's output and its `<run>.{train,eval}.log` are in
`--runs_dir` (matrix-runs/: outside outputs/, so that `make report` does not take these short runs for
results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import OneLineError
from .recipes import resolve
from .report import loss_points, plot_losses
from .score import write_atomic, write_json_atomic

CONFIGS = ("multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
RECIPES = ("smollm2-135m-lora", "smollm2-135m-qdora")
BASELINE = "single_gpu"
LOSS_TOLERANCE = 0.05  # largest relative difference of a logged loss from the one-GPU run's at the same step
LOGGING_STEPS = 5
KEPT = " (kept from the last run)"
# A run's eval before it ran: the training's row is saved first, so a matrix cut off during the evals (a
# lease's time limit) keeps what the training measured; a rerun only evaluates it, if its adapter is there.
PENDING = "not run yet: the matrix stopped after this run's training"
TIMEOUT_RC = 124  # a make call that ran past --timeout (as `timeout` reports it)


# The launcher's own exception when a rank failed: it says nothing; the rank's exception above it does.
_WRAPPERS = ("ChildFailedError", "CalledProcessError")


def error_line(log: str) -> str:
    """The one line that says why a run failed: our `error:` line, else the last exception a process raised
    (a rank's, prefixed `[rankN]:` by torchrun, before the launcher's ChildFailedError), else the end."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", ln.strip()) for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln
    exceptions = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    real = [ln for ln in exceptions if not any(w in ln.split(":")[0] for w in _WRAPPERS)]
    if real or exceptions:
        return (real or exceptions)[-1][:300]
    return lines[-1][:300] if lines else "no output"


def run_summary(out: Path) -> dict[str, Any]:
    """Loss curve, tokens/s and peak memory of a finished run, from its trainer_state/train_results files."""
    state = json.loads((out / "trainer_state.json").read_text())
    results = json.loads((out / "train_results.json").read_text())
    history = state.get("log_history", [])
    losses = dict(loss_points(out / "trainer_state.json"))
    counted = [(int(h["step"]), h["num_tokens"]) for h in history if "num_tokens" in h]
    step, tokens = max(counted, default=(0, None))  # TRL's count, as of the last logged step
    runtime, steps = results.get("train_runtime"), state.get("global_step")
    # The runtime covers every step, the count only those up to the last log: scale the count to all steps.
    total = tokens * steps / step if tokens and steps and step else None
    return {
        "loss": losses,
        "tokens": tokens,
        "train_runtime": runtime,
        "tokens_per_s": round(total / runtime, 1) if total and runtime else None,
        "peak_gpu_memory_gib": results.get("peak_gpu_memory_gib"),
        "steps": steps,
    }


def loss_difference(curve: dict[int, float], reference: dict[int, float]) -> float | None:
    """Largest |loss - reference| / reference over the steps both logged (None when they share none)."""
    common = sorted(set(curve) & set(reference))
    if not common:
        return None
    return max(abs(curve[s] - reference[s]) / abs(reference[s]) for s in common if reference[s])


class MatrixError(OneLineError):
    """Bad input to the matrix: one line, before anything runs."""


def _key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["recipe"], row["config"], row["num_gpus"]


class Matrix:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.logs = Path(args.runs_dir)
        self.rows: list[dict[str, Any]] = []
        self.out = Path(args.out)
        self.device = _device()

    def settings(self) -> dict[str, Any]:
        """What a kept row must have been run with (other settings make other numbers)."""
        a = self.args
        return {
            "num_gpus": a.num_gpus,
            "model": a.model,
            "data_dir": a.data_dir,
            "accumulation": a.accumulation,
            "train_args": a.train_args,
            "eval_limit": a.eval_limit,
        }

    def load(self) -> None:
        """The rows of an earlier run of the same settings (resume), unless --overwrite."""
        path = self.out / "matrix.json"
        if getattr(self.args, "overwrite", False) or not path.is_file():
            return
        try:
            old = json.loads(path.read_text())
            rows = old["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise MatrixError(f"{path} is not a matrix file ({err}); --overwrite starts afresh") from None
        differ = [k for k, v in self.settings().items() if old.get("settings", {}).get(k) != v]
        if differ:
            raise MatrixError(
                f"{path} holds runs made with other settings ({', '.join(differ)}): pass --overwrite to "
                "replace them, or --out for a matrix of its own"
            )
        for row in rows:  # JSON made the logged steps strings
            row["loss"] = {int(k): v for k, v in row.get("loss", {}).items()}
        self.rows = rows

    def saved(self, recipe: str, config: str, gpus: int) -> dict[str, Any] | None:
        """This run's row in the matrix (one per run: `put` replaces), if any."""
        return next((r for r in self.rows if _key(r) == (recipe, config, gpus)), None)

    def kept(self, recipe: str, config: str, gpus: int) -> dict[str, Any] | None:
        """The last run's row of this run, if it is complete: it trained, and its evals (if any) ran."""
        r = self.saved(recipe, config, gpus)
        evals = [r.get("eval") or {}, r.get("eval_across") or {}] if r else []
        return r if r and r["works"] and not any("error" in e for e in evals) else None

    def trained(self, recipe: str, config: str, gpus: int) -> dict[str, Any] | None:
        """The row of a run that trained but whose evals never ran, if its adapter is still there."""
        r = self.saved(recipe, config, gpus)
        adapter = self.logs / _run_name(recipe, config, gpus) / "adapter_config.json"
        pending = r is not None and r["works"] and (r.get("eval") or {}).get("error") == PENDING
        return dict(r) if pending and adapter.is_file() else None

    def put(self, row: dict[str, Any], note: str = "") -> None:
        """Add a row, in place of an older one of the same run; then save and print it."""
        at = next((i for i, r in enumerate(self.rows) if _key(r) == _key(row)), None)
        if at is None:
            self.rows.append(row)
        else:
            self.rows[at] = row
        self.save()
        print(_line(row) + note, flush=True)

    def make(self, target: str, log: Path, **variables: Any) -> tuple[int, str]:
        """`make <target>` with this interpreter (no install step), its output in `log`."""
        cmd = ["make", target, f"PY={sys.executable}", "STAMP=", *(f"{k}={v}" for k, v in variables.items())]
        return run_logged(cmd, log, self.args.timeout)

    def train_args(self, accumulation: int) -> str:
        a = self.args
        parts = [
            *(["--model_name_or_path", a.model] if a.model else []),
            *(["--data_dir", a.data_dir] if a.data_dir else []),
            "--train_splits", "train", "dev",
            "--gradient_accumulation_steps", str(accumulation),
            "--logging_steps", str(LOGGING_STEPS),
            "--save_strategy", "no",
            "--overwrite_output_dir", "true",
            # Dropout draws its masks per process, so with it the N-GPU curve can only match the 1-GPU one
            # statistically; without it every step computes the same thing (up to summation order).
            "--lora_dropout", "0",
            # Random order, not the recipes' length grouping: transformers sizes length-grouped megabatches
            # by per-device batch x accumulation, which differs between the runs, so the steps would hold
            # other examples. A random permutation is dealt to the ranks batch by batch: the same examples.
            "--train_sampling_strategy", "random",
            *a.train_args.split(),
        ]  # fmt: skip
        return " ".join(parts)

    def run(self, recipe: str, config: str, gpus: int, accumulation: int) -> dict[str, Any]:
        """Train one run: its row, without evals."""
        name = _run_name(recipe, config, gpus)
        out = self.logs / name
        row: dict[str, Any] = {
            "recipe": recipe,
            "config": config,
            "num_gpus": gpus,
            "accumulation": accumulation,
        }
        recipe_file = out / "recipe.yaml"  # train.py writes it once model and data are loaded
        before = recipe_file.stat().st_mtime_ns if recipe_file.is_file() else None
        t = time.perf_counter()
        rc, text = self.make(
            "train",
            self.logs / f"{name}.train.log",
            RECIPE=recipe,
            ACCELERATE_CONFIG=config,
            NUM_GPUS=gpus,
            OUTPUT_DIR=out,
            ARGS=self.train_args(accumulation),
        )
        row["wall_s"] = round(time.perf_counter() - t, 1)
        if rc != 0 or not (out / "train_results.json").is_file():
            error = error_line(text)
            # Refused on its input: its own `error:` line (not the matrix's timeout), before it loaded
            # anything (no new recipe.yaml). Every config of this recipe would be refused the same way.
            loaded = recipe_file.is_file() and recipe_file.stat().st_mtime_ns != before
            refused = rc != TIMEOUT_RC and error.startswith("error:") and not loaded
            return {**row, "works": False, "error": error, **({"refused": True} if refused else {})}
        row.update(works=True, **run_summary(out))
        return row

    def evaluate_run(self, row: dict[str, Any]) -> dict[str, Any]:
        """`make eval` of a trained run's adapter (the one-GPU run's again on N GPUs), into its row."""
        name = _run_name(row["recipe"], row["config"], row["num_gpus"])
        out = self.logs / name
        row.pop("eval_across", None)
        row["eval"] = self.evaluate(name, out, row["num_gpus"])
        if row["config"] == BASELINE and "error" not in row["eval"]:
            row["eval_across"] = self.eval_across(name, out)
        return row

    def obtain(
        self, recipe: str, config: str, gpus: int, accumulation: int, base: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], str]:
        """A run's row and a note: kept from the last matrix, evaluated now after an earlier training, or run.
        A new training's row is saved (compared with `base`) before its evals start."""
        row = self.kept(recipe, config, gpus)
        if row is not None:
            return row, KEPT
        row = self.trained(recipe, config, gpus)
        if row is not None:
            return self.evaluate_run(row), " (trained in the last run, evaluated now)"
        row = self.run(recipe, config, gpus, accumulation)
        if row["works"] and self.args.eval_limit:
            if base is not None:
                compare(row, base)
            self.put({**row, "eval": {"error": PENDING}}, " (evaluating)")
            self.evaluate_run(row)
        return row, ""

    def evaluate(self, name: str, out: Path, gpus: int, output_dir: Path | None = None) -> dict[str, Any]:
        """`make eval` of a run's adapter on `gpus` GPUs: its metrics, or the error line."""
        eval_args = f"--limit {self.args.eval_limit} --overwrite true"
        if output_dir is not None:
            eval_args += f" --output_dir {output_dir}"
        log = self.logs / f"{name}.eval{'' if output_dir is None else f'-{gpus}gpu'}.log"
        rc, text = self.make("eval", log, OUTPUT_DIR=out, NUM_GPUS=gpus, EVAL_ARGS=eval_args)
        if rc != 0:  # the eval's own error line; looking for its files could fail on the same bad input
            return {"error": error_line(text)}
        metrics = self.metrics_file(out, output_dir)
        if metrics is not None and metrics.is_file():
            m = json.loads(metrics.read_text())
            return {k: m.get(k) for k in ("n", "exe_acc", "prog_acc", "invalid", "num_processes")}
        return {"error": error_line(text)}

    def eval_across(self, name: str, out: Path) -> dict[str, Any]:
        """The one-GPU run's adapter evaluated again on --num_gpus GPUs: how many predictions are identical
        to the one-GPU file's (the processes split the examples; rank 0 merges them in one-process order)."""
        across = out / f"eval-{self.args.num_gpus}gpu"
        result = self.evaluate(name, out, self.args.num_gpus, across)
        one, many = self.metrics_file(out), self.metrics_file(out, across)
        result["num_gpus"] = self.args.num_gpus
        if "error" in result or one is None or many is None:
            return result
        a = json.loads(one.with_name(one.name.replace("metrics_", "predictions_", 1)).read_text())
        b = json.loads(many.with_name(many.name.replace("metrics_", "predictions_", 1)).read_text())
        by_id = {p["id"]: p for p in b}
        return {
            **result,
            "identical": sum(p == by_id.get(p["id"]) for p in a),
            "same_order": [p["id"] for p in a] == [p["id"] for p in b],
        }

    def metrics_file(self, out: Path, output_dir: Path | None = None) -> Path | None:
        """Where `make eval --limit N` wrote its metrics: predict's own naming (`_first<N>` only when N is
        less than the split)."""
        from . import predict

        where = ["--output_dir", str(output_dir)] if output_dir is not None else []
        args = predict.parse_args(["--model", str(out), "--limit", str(self.args.eval_limit), *where])
        try:
            return predict.select_examples(args)[0].path("metrics")
        except OneLineError:  # bad data or model: the eval itself said so
            return None

    def save(self) -> None:
        meta = {
            "date": dt.date.today().isoformat(),
            "device": self.device,
            "num_gpus": self.args.num_gpus,
            "tolerance": LOSS_TOLERANCE,
            "settings": self.settings(),
        }
        write_json_atomic(self.out / "matrix.json", {**meta, "runs": self.rows})
        text = table(self.rows) + "\n"
        write_atomic(self.out / "matrix.md", lambda f: f.write(text))
        plot(self.rows, self.out / "loss.png")

    def __call__(self) -> int:
        a = self.args
        plan = {}  # checked for every recipe before the first run starts
        for recipe in a.recipes:
            values = resolve(recipe).values
            plan[recipe] = accumulation = a.accumulation or int(values.get("gradient_accumulation_steps", 1))
            if accumulation % a.num_gpus:
                print(
                    f"error: {recipe}: accumulation {accumulation} is not a multiple of --num_gpus "
                    f"{a.num_gpus}, so no run can keep its global batch (set --accumulation)",
                    file=sys.stderr,
                )
                return 2
        self.load()
        self.logs.mkdir(parents=True, exist_ok=True)
        refused = []
        for recipe, accumulation in plan.items():
            base, note = self.obtain(recipe, BASELINE, 1, accumulation)
            self.put(base, note)
            if base.get("refused"):
                # A bad input refuses every launch alike: launching N-GPU runs to hear it again costs GPU time
                # (a failure to fit one GPU, a timeout or a crash says nothing about N GPUs: those still run).
                # Rows of an earlier run stay (they cost GPU time), without their comparison to a baseline
                # that no longer worked.
                for row in self.rows:
                    if row["recipe"] == recipe and row["config"] != BASELINE:
                        compare(row, base)
                self.save()
                refused.append(recipe)
                print(
                    f"{recipe}: the one-GPU run was refused on its input, so its {len(a.configs)} N-GPU runs "
                    "are not launched; fix the input and run the matrix again (with --overwrite or another "
                    "--out if the fix changes its settings)",
                    file=sys.stderr,
                )
                continue
            for config in a.configs:
                row, note = self.obtain(recipe, config, a.num_gpus, accumulation // a.num_gpus, base)
                compare(row, base)  # also a kept row: its baseline may be new
                self.put(row, note)
        print(f"\n{table(self.rows)}\n\n-> {self.out / 'matrix.md'}")
        return 2 if refused else 0


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run `cmd` with its output going to `log` as it comes, so that a matrix stopped from outside (a lease's
    time limit) still leaves what the run printed. The command runs in a process group of its own, and a
    timeout, or the matrix itself being stopped, ends the whole group: `make` alone would leave accelerate's
    workers holding the GPUs for the next run. Returns (exit code, output); TIMEOUT_RC after a timeout."""
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            f.write(f"\nerror: timed out after {timeout:g} s\n")
            rc = TIMEOUT_RC
        except BaseException:  # KeyboardInterrupt, or SystemExit from SIGTERM (main installs that)
            _end_group(proc)
            raise
    return rc, log.read_text(errors="replace").split("\n", 1)[1]


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (each rank can exit cleanly), SIGKILL to what is left of it
    after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        proc.poll()  # reap `make` once it exits: a zombie still counts as a member of the group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def exit_on_sigterm() -> None:
    """SIGTERM (`timeout`, a batch system) as SystemExit, so that `finally`/`except` blocks end the runs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def _run_name(recipe: str, config: str, gpus: int) -> str:
    return f"{config}-{gpus}gpu-{recipe}"  # another GPU count (or matrix) never reuses a run's folder


def compare(row: dict[str, Any], base: dict[str, Any]) -> None:
    """Set `row`'s loss gap and speed-up against the one-GPU run (or drop them where either did not train)."""
    row.pop("loss_rel_diff", None)
    row.pop("speedup", None)
    if row["works"] and base["works"]:
        row["loss_rel_diff"] = loss_difference(row["loss"], base["loss"])
        if row.get("tokens_per_s") and base.get("tokens_per_s"):
            row["speedup"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Every run's loss curve in one chart: N-GPU curves should lie on their recipe's one-GPU curve."""
    curves = {
        f"{r['recipe']} {r['config']} ({r['num_gpus']} GPU{'s' if r['num_gpus'] > 1 else ''})": sorted(
            (int(k), v) for k, v in r["loss"].items()
        )
        for r in rows
        if r["works"] and r.get("loss")
    }
    if curves:
        plot_losses(curves, path)


def _device() -> str | None:
    """The GPUs' names (the runs are child processes; this one only asks)."""
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # a broken CUDA install must not lose the matrix
        return None
    return None


def _line(r: dict[str, Any]) -> str:
    what = "works" if r["works"] else f"fails: {r['error']}"
    return f"{r['config']} x {r['recipe']} on {r['num_gpus']} GPU(s): {what}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| config | recipe | GPUs | result | tokens/s | vs 1 GPU | peak GiB per GPU "
        f"| loss vs 1 GPU (tolerance {LOSS_TOLERANCE:.0%}) | eval |",
        "|---|---|---:|---|---:|---:|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['config']} | {r['recipe']} | {r['num_gpus']} |"
        if not r["works"]:
            lines.append(f"{head} fails: {r['error'].replace('|', '/')} | | | | | |")
            continue
        diff = r.get("loss_rel_diff")
        loss = (
            "reference"
            if r["config"] == BASELINE
            else "–"
            if diff is None
            else (f"{'matches' if diff <= LOSS_TOLERANCE else 'differs'}: max {diff:.1%}")
        )
        ev = r.get("eval", {})
        evs = (
            "–"
            if not ev
            else f"fails: {ev['error']}"
            if "error" in ev
            else f"runs (n={ev['n']}: exe acc {ev['exe_acc']:.0%}, invalid {ev['invalid']:.0%})"
        )
        peak = ", ".join(f"{p:g}" for p in r.get("peak_gpu_memory_gib") or []) or "–"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "–"
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "–"
        lines.append(f"{head} works | {tps} | {speed} | {peak} | {loss} | {evs} |")
    for r in rows:
        across = r.get("eval_across")
        if not across:
            continue
        lines.append("")
        what = (
            f"fails: {across['error']}"
            if "error" in across
            else f"{across['identical']}/{across['n']} predictions identical to the one-GPU run's, "
            f"{'in the same order' if across['same_order'] else 'in another order'}"
        )
        lines.append(f"Eval of the one-GPU {r['recipe']} adapter on {across['num_gpus']} GPUs: {what}.")
    return "\n".join(lines)


# Set by the matrix itself for every run: --train_args may not change them (the global batch, the data, and
# what makes N-GPU steps compute what one GPU does). --logging_steps may be changed (a denser loss curve).
OWN_TRAIN_ARGS = (
    "--gradient_accumulation_steps",
    "--train_splits",
    "--output_dir",
    "--lora_dropout",
    "--train_sampling_strategy",
)


def _bad_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, before any run starts (None: nothing)."""
    if args.accumulation is not None and args.accumulation < 1:
        return f"--accumulation must be at least 1, got {args.accumulation}"
    if args.eval_limit < 0 or args.timeout < 1:
        return "--eval_limit must be >= 0 and --timeout >= 1"
    if BASELINE in args.configs or len(set(args.configs)) < len(args.configs):
        return f"--configs lists each N-GPU config once; {BASELINE} is every recipe's one-GPU reference"
    own = [a for a in args.train_args.split() if a.split("=")[0] in OWN_TRAIN_ARGS]
    if own:
        return (
            f"--train_args may not set {', '.join(own)}: the matrix sets it for every run "
            "(--accumulation sets the accumulation)"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finqa_trl.matrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="base model for every recipe (default: each recipe's)")
    ap.add_argument("--data_dir", default=None, help="FinQA folder (default: $FINQA_DIR, else the fixture)")
    ap.add_argument("--num_gpus", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--accumulation", type=int, default=None, help="one-GPU accumulation (default: recipe's)")
    ap.add_argument("--eval_limit", type=int, default=100, help="test examples for make eval (0: no eval)")
    ap.add_argument("--train_args", default="", help="extra training options for every run")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per make call")
    ap.add_argument("--out", default="results/multi-gpu", help="matrix.json and matrix.md go here")
    ap.add_argument("--runs_dir", default="matrix-runs", help="each run's output_dir and logs go here")
    ap.add_argument("--overwrite", action="store_true", help="rerun all (default: keep what worked)")
    args = ap.parse_args(argv)
    if args.num_gpus < 2:
        ap.error("--num_gpus must be at least 2")
    problem = _bad_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    for config in args.configs:
        if not Path(f"accelerate_configs/{config}.yaml").is_file():
            print(f"error: no accelerate config accelerate_configs/{config}.yaml", file=sys.stderr)
            return 2
    exit_on_sigterm()
    try:
        return Matrix(args)()
    except OneLineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
