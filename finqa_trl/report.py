"""Results table (markdown) and grouped bar chart from the metrics files that evaluation wrote.

    python -m finqa_trl.report [--outputs outputs] [--results DIR] [--markdown FILE|-] [--plot FILE|none]
        [--loss_plot FILE|none]
    python -m finqa_trl.report --bench [SOURCE=]FILE ... [--variants V ...] [--markdown FILE]
        [--plot FILE|none]

Gathers every `metrics_*.json` under `--outputs` (any depth: `outputs/<run>/merged/` too) and, when
`--results DIR` is given, under DIR as well. One row per model + method + evaluation setup, with dev and
test side by side: Model | Method | Quant | Dev Acc | Test Acc | Dev Prog | Test Prog | Invalid | Notes.
Method and quantization come from the metrics (finqa_trl.predict records them), else from the run's
`recipe.yaml`, else "base (k-shot)". The table is printed and written to `--markdown` (default
results/README-table.md; `-`: print only); the chart goes to `--plot` (default results/accuracy.png).
The training loss of every run whose `trainer_state.json` is found under the same folders (the run's own,
else its last checkpoint's) goes to `--loss_plot` (default results/loss.png), one curve per run.
With nothing to report, one line says so and nothing is written.

`--bench` reports training speed instead: the rows of `finqa_trl.bench` result files, side by side (runs split
over several calls or machines), as finqa_trl.bench prints and charts one run: a table (printed; written to
`--markdown` only when given) and a chart to `--plot` (default results/bench.png). Each row's ratio to plain
TRL pairs it with plain TRL's row of the same shape, method and SOURCE, which is the file's name unless given
(`DD=results/x/DD-1b.json`: files of one machine share a source); `--variants` keeps only those variants.
Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import OneLineError, one_line
from .data import SPLITS
from .recipes import (
    RecipeError,
    checkpoint_step,
    known_quant,
    method_name,
    quantization_name,
    read_run_recipe,
)
from .score import write_atomic

HEADER = ("Model", "Method", "Quant", "Dev Acc", "Test Acc", "Dev Prog", "Test Prog", "Invalid", "Notes")


@dataclass
class Row:
    model: str
    method: str
    quant: str
    notes: list[str]
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> metrics

    @property
    def key(self) -> tuple[str, ...]:
        return (self.model, self.method, self.quant, *self.notes)

    def value(self, split: str, metric: str) -> float | None:
        v = self.splits.get(split, {}).get(metric)
        return float(v) if isinstance(v, (int, float)) else None


def find_metrics(roots: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files.extend(sorted(root.rglob("metrics_*.json")))
    return list(dict.fromkeys(p.resolve() for p in files))


def _split_of(path: Path, metrics: dict[str, Any]) -> str:
    if isinstance(metrics.get("split"), str):
        return metrics["split"]
    tag = path.stem.removeprefix("metrics_")
    for split in sorted(SPLITS, key=len, reverse=True):  # private_test before test
        if tag == split or tag.startswith(split + "_"):
            return split
    return tag.split("_")[0]


def _recipe_near(path: Path) -> dict[str, Any]:
    """The recipe.yaml of the run a metrics file belongs to (beside it, or one up for <run>/merged)."""
    try:
        return read_run_recipe(path.parent)
    except RecipeError:  # an unreadable recipe must not hide the row: it is reported without one
        return {}


def _short(name: Any) -> str:
    text = str(name or "?").removeprefix("builtin:").rstrip("/")
    return Path(text).name.removesuffix(".gguf") or text


def describe(path: Path, metrics: dict[str, Any], root: Path | None = None) -> Row:
    """Model / method / quant / notes of one metrics file (not its numbers)."""
    recipe = _recipe_near(path)
    eg_k = int(metrics.get("eg_k") or 0)
    model = _short(
        metrics.get("base") or recipe.get("model_name_or_path") or metrics.get("model") or path.parent.name
    )
    if metrics.get("method"):
        method = str(metrics["method"])
    elif recipe:
        method = str(recipe.get("method") or method_name(recipe))
    else:
        method = f"base ({eg_k}-shot)"
    quant = str(known_quant(metrics) or (quantization_name(recipe) if recipe else "-"))
    notes = []
    where = path.parent
    if root is not None and where.is_relative_to(root):
        where = where.relative_to(root)
    if recipe or not metrics.get("model"):
        notes.append(str(where))  # which run (output dir) the row is
    if recipe and eg_k:
        notes.append(f"{eg_k}-shot")
    if metrics.get("context") == "gold":
        notes.append("gold context")
    if int(metrics.get("num_samples") or 1) > 1:
        notes.append(f"self-consistency x{metrics['num_samples']}")
    elif metrics.get("decoding") == "sample":
        notes.append("sampled")
    return Row(model, method, quant, notes)


def collect(roots: Sequence[Path]) -> tuple[list[Row], list[str]]:
    """Rows (dev/test of one setup merged into one row) and warnings about unreadable files."""
    rows: dict[tuple[str, ...], Row] = {}
    warnings = []
    for path in find_metrics(roots):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            warnings.append(f"skipped {path}: not readable JSON ({err})")
            continue
        if not isinstance(metrics, dict) or not isinstance(metrics.get("exe_acc"), (int, float)):
            warnings.append(f"skipped {path}: no exe_acc (not a metrics file)")
            continue
        root = next((r.resolve() for r in roots if path.is_relative_to(r.resolve())), None)
        row = describe(path, metrics, root)
        row = rows.setdefault(row.key, row)
        split = _split_of(path, metrics)
        if split in row.splits:
            warnings.append(f"skipped {path}: {split} of this setup already reported")
            continue
        row.splits[split] = metrics
    ordered = sorted(
        rows.values(), key=lambda r: (r.model, not r.method.startswith("base"), r.method, r.quant, r.notes)
    )
    return ordered, warnings


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(" --- " for _ in HEADER) + "|"]
    for r in rows:
        invalid = r.value("test", "invalid")
        invalid = r.value("dev", "invalid") if invalid is None else invalid
        extra = list(r.notes)
        for split in ("dev", "test"):
            n = r.splits.get(split, {}).get("n")
            if n is not None:
                extra.append(f"{split} n={n}")
        speed = r.splits.get("test", r.splits.get("dev", {})).get("examples_per_s")
        if speed:
            extra.append(f"{speed:g} ex/s")
        others = sorted(set(r.splits) - {"dev", "test"})
        for split in others:
            extra.append(
                f"{split}: acc {_pct(r.value(split, 'exe_acc'))} / prog {_pct(r.value(split, 'prog_acc'))}"
            )
        cells = [
            r.model, r.method, r.quant,
            _pct(r.value("dev", "exe_acc")), _pct(r.value("test", "exe_acc")),
            _pct(r.value("dev", "prog_acc")), _pct(r.value("test", "prog_acc")),
            _pct(invalid), "; ".join(extra),
        ]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines.append(
        "Acc: execution accuracy, Prog: program accuracy (FinQA's evaluate.py), Invalid: share of test "
        "(else dev) programs that do not execute; all in %."
    )
    return "\n".join(lines) + "\n"


def grouped_bars(
    groups: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None], Sequence[str]]],
    path: Path,
    *,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> None:
    """A PNG of grouped bars: one group per entry of `groups`, one bar per series (label, a value per group,
    a note per group written above its bar, "" for none); a None value leaves its slot empty."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5))
    for j, (label, values, notes) in enumerate(series):
        slots = [(i, v, n) for i, (v, n) in enumerate(zip(values, notes, strict=True)) if v is not None]
        xs = [i + (j - (len(series) - 1) / 2) * width for i, _, _ in slots]
        bars = ax.bar(xs, [v for _, v, _ in slots], width, label=label)
        if any(n for _, _, n in slots):
            ax.bar_label(bars, [n for _, _, n in slots], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        ax.margins(y=0.15)  # room for the notes above the tallest bar
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot(rows: Sequence[Row], path: Path) -> None:
    """Grouped bars: one group per row, one bar per split x metric."""
    series = [("dev", "exe_acc", "Dev Acc"), ("test", "exe_acc", "Test Acc"),
              ("dev", "prog_acc", "Dev Prog"), ("test", "prog_acc", "Test Prog")]  # fmt: skip
    series = [s for s in series if any(r.value(s[0], s[1]) is not None for r in rows)]
    labels = [f"{r.model}\n{r.method}, {r.quant}" + "".join(f"\n{n}" for n in r.notes) for r in rows]
    bars = [(label, [100 * (r.value(split, metric) or 0.0) for r in rows], [""] * len(rows))
            for split, metric, label in series]  # fmt: skip
    grouped_bars(
        labels,
        bars,
        path,
        ylabel="accuracy (%)",
        title="FinQA: execution (Acc) and program (Prog) accuracy",
        ylim=(0, 100),
    )


def loss_points(state_file: Path) -> list[tuple[int, float]]:
    """[(step, logged training loss)] of a trainer_state.json."""
    history = json.loads(state_file.read_text()).get("log_history", [])
    return [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h and "step" in h]


def loss_curves(roots: Iterable[Path]) -> dict[str, list[tuple[int, float]]]:
    """Run folder (relative to its root) -> its loss curve, from the trainer_state.json that training wrote
    at the end, else from its latest checkpoint's (an interrupted run)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for root in roots:
        best: dict[Path, tuple[int, Path]] = {}  # run folder -> (rank, state file); the run's own ranks first
        for f in root.rglob("trainer_state.json") if root.is_dir() else ():
            in_checkpoint = f.parent.name.startswith("checkpoint-")
            run = f.parent.parent if in_checkpoint else f.parent
            rank = checkpoint_step(f.parent) if in_checkpoint else sys.maxsize
            if rank > best.get(run, (-2, f))[0]:
                best[run] = (rank, f)
        for run, (_, f) in sorted(best.items()):
            try:
                points = loss_points(f)
            except (OSError, json.JSONDecodeError):
                continue
            inside = run != root and run.is_relative_to(root)  # root itself may be a checkpoint folder
            if points:
                curves[str(run.relative_to(root)) if inside else run.name] = points
    return curves


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for name, points in sorted(curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (program + end-of-turn tokens)")
    ax.set_title("FinQA fine-tuning: training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    """The figure as a PNG, atomically: a half-written chart never replaces the last good one."""
    import matplotlib.pyplot as plt

    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), "wb")
    plt.close(fig)


# A row's machine or run, where rows of several bench files are shown together (--bench):
# ratios pair rows of one source only
SOURCE = "source"


def _pair(r: dict[str, Any]) -> tuple[Any, ...]:
    return r.get("shape"), r.get("method"), r.get(SOURCE)


def vs_plain_trl(rows: Sequence[dict[str, Any]]) -> list[float | None]:
    """Each row's tokens/s over plain TRL's for the same (shape, method) and source in these rows; None where
    either is missing. Where plain TRL was timed twice for one pair, its first row is the base (the chart
    draws the first bar of each variant)."""
    base: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        if r.get("variant") == "trl" and "tokens_per_s" in r:
            base.setdefault(_pair(r), r)
    out: list[float | None] = []
    for r in rows:
        b = base.get(_pair(r)) if "tokens_per_s" in r else None
        out.append(None if b is None else r["tokens_per_s"] / b["tokens_per_s"])
    return out


def bench_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per (shape, method, variant); speed-up and memory relative to plain TRL of the same pair (and
    source: a source column where the rows have one)."""
    sourced = any(SOURCE in r for r in rows)
    lines = [
        "| shape | method | variant | tokens/s | peak GiB (run) | peak GiB (worst step) | vs plain TRL |"
        + (" source |" if sourced else ""),
        "|---|---|---|---:|---:|---:|---:|" + ("---|" if sourced else ""),
    ]
    for r, ratio in zip(rows, vs_plain_trl(rows), strict=True):
        if "variant" not in r:
            continue
        tail = f" {r.get(SOURCE, '')} |" if sourced else ""
        if "tokens_per_s" not in r:
            lines.append(
                f"| {r['shape']} | {r['method']} | {r['variant']} | {r.get('error', '–')} | | | |" + tail
            )
            continue
        rel = "–" if ratio is None else f"{ratio:.2f}x"
        name = f"| {r['shape']} | {r['method']} | {r['variant']} |"
        worst = r.get("longest_batch_peak_gib", "–")
        lines.append(f"{name} {r['tokens_per_s']:,.0f} | {r['peak_gib']} | {worst} | {rel} |" + tail)
    return "\n".join(lines)


def bench_chart(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """The timed training rows as a PNG: a group of bars per (shape, method, source), a bar of tokens/s per
    variant, each noted with its ratio to plain TRL (plain TRL's own bars: none) and its worst step's peak GiB
    (where measured: none on a CPU). False, and nothing written, where no row was timed. A variant timed
    twice for one pair (an order check) keeps its first bar; the table lists both."""
    pairs = zip(rows, vs_plain_trl(rows), strict=True)
    timed = [(r, ratio) for r, ratio in pairs if "tokens_per_s" in r and "variant" in r]
    if not timed:
        return False
    groups = list(dict.fromkeys(_pair(r) for r, _ in timed))
    variants = list(dict.fromkeys(r["variant"] for r, _ in timed))
    first: dict[tuple[Any, ...], tuple[dict[str, Any], float | None]] = {}
    for r, ratio in timed:
        first.setdefault((*_pair(r), r["variant"]), (r, ratio))
    series = []
    for variant in variants:
        values: list[float | None] = []
        notes: list[str] = []
        for group in groups:
            r, ratio = first.get((*group, variant), (None, None))
            values.append(None if r is None else r["tokens_per_s"])
            worst = None if r is None else r.get("longest_batch_peak_gib")  # a number, None or an error text
            rel = "" if ratio is None or variant == "trl" else f"{ratio:.2f}x"  # trl: the 1.00x itself
            peak = f"{worst:g} GiB" if isinstance(worst, int | float) and not isinstance(worst, bool) else ""
            notes.append("\n".join(x for x in (rel, peak) if x))
        series.append((variant, values, notes))
    labels = [
        f"{shape} {method}" + ("" if source is None else f"\n{source}") for shape, method, source in groups
    ]
    grouped_bars(labels, series, path, ylabel="training tokens/s", title=title)
    return True


def bench_rows(specs: Sequence[str]) -> list[dict[str, Any]]:
    """The training rows of bench result files given as [SOURCE=]FILE, each marked with its source (the
    file's name without its suffix where none is given), in the order given.
    A row that is not a bench row (shape, method, and where timed a positive tokens/s and a peak) is refused
    in one line."""
    rows: list[dict[str, Any]] = []
    for spec in specs:
        source, sep, name = spec.partition("=")
        if not sep or Path(spec).is_file():  # a file whose name holds "=" is still a file
            source, name = Path(spec).stem, spec
        if not source:
            raise OneLineError(f"--bench {spec}: an empty SOURCE (SOURCE=FILE, or the FILE alone)")
        try:
            run = json.loads(Path(name).read_text())
            results = run.get("results")
        except (OSError, ValueError, AttributeError) as err:
            raise OneLineError(f"--bench {spec}: not a bench result file ({one_line(err)})") from err
        if not isinstance(results, list):
            raise OneLineError(f"--bench {spec}: not a bench result file (no results list)")
        for i, r in enumerate(results):
            if not (isinstance(r, dict) and "variant" in r):
                continue  # evaluation rows
            why = _not_a_bench_row(r)
            if why:
                raise OneLineError(f"--bench {spec}: result {i} {why}")
            rows.append({"device": run.get("device"), "host": run.get("host"), **r, SOURCE: source})
    return rows


def bench_machines(rows: Sequence[dict[str, Any]]) -> str:
    """Which card and host each source ran on, one line per source: plain TRL's speed, and so every ratio to
    it, may move with the host's CPU (bench.host_info), which files before 2026-11-28 did not record."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        host = r.get("host") if isinstance(r.get("host"), dict) else None
        where = f"host {host.get('cpu')} ({host.get('cpus')} CPUs)" if host else "host not recorded"
        what = f"{r.get('device') or 'device not recorded'}, {where}"
        kinds = seen.setdefault(str(r.get(SOURCE, "")), [])
        if what not in kinds:
            kinds.append(what)
    return "\n".join(f"- {source}: {'; '.join(kinds)}" for source, kinds in seen.items())


def _not_a_bench_row(r: dict[str, Any]) -> str | None:
    """Why a training row of a bench file cannot be reported, or None."""
    for key in ("shape", "method", "variant"):
        if not isinstance(r.get(key), str):
            return f"has no {key} name"
    if "tokens_per_s" in r:
        speed = r["tokens_per_s"]
        if isinstance(speed, bool) or not isinstance(speed, int | float) or speed <= 0:
            return f"has tokens_per_s {speed!r}, not a positive number"
        if "peak_gib" not in r:
            return "has tokens_per_s but no peak_gib"
    return None


def report_bench(args: argparse.Namespace) -> int:
    try:
        held = bench_rows(args.bench)
    except OneLineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = [r for r in held if not args.variants or r["variant"] in args.variants]
    if not rows:
        if held:  # only --variants can leave nothing: a mistyped variant would read as empty files
            names = sorted({str(r["variant"]) for r in held})
            print(f"error: --variants {' '.join(args.variants)}: those files hold {' '.join(names)}",
                  file=sys.stderr)  # fmt: skip
            return 2
        print("nothing to report: no training rows in those bench files", file=sys.stderr)
        return 0
    text = bench_table(rows) + "\n\nWhere each source ran:\n" + bench_machines(rows) + "\n"
    print(text, end="")
    if args.markdown not in (None, "-"):
        write_atomic(Path(args.markdown), lambda f: f.write(text))
        print(f"table written to {args.markdown}", file=sys.stderr)
    plot_path = args.plot or "results/bench.png"
    if plot_path.lower() != "none":
        devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
        title = "training tokens/s" + (f" ({', '.join(devices)})" if devices else "")
        title += "\nabove each bar: its ratio to plain TRL, its worst step's peak GiB"
        if bench_chart(rows, Path(plot_path), title):
            print(f"chart written to {plot_path}", file=sys.stderr)
        else:
            print("no chart: no timed training rows", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finqa_trl.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--outputs", help="where evaluation wrote metrics (default: outputs)")
    ap.add_argument("--results", help="also gather metrics_*.json under this folder (e.g. results)")
    ap.add_argument(
        "--markdown", help="table file (default results/README-table.md; --bench: none); '-': print only"
    )
    ap.add_argument(
        "--plot", help="bar chart PNG (default results/accuracy.png; --bench: results/bench.png); 'none'"
    )
    ap.add_argument("--loss_plot", help="training loss PNG (default results/loss.png); 'none': no chart")
    ap.add_argument(
        "--bench", nargs="+", metavar="[SOURCE=]FILE", help="report these bench result files instead"
    )
    ap.add_argument("--variants", nargs="+", help="with --bench: only these variants (e.g. recipe trl)")
    args = ap.parse_args(argv)
    if args.variants and not args.bench:
        ap.error("--variants goes with --bench")
    if args.bench:
        accuracy_only = [
            f"--{k}" for k in ("outputs", "results", "loss_plot") if getattr(args, k) is not None
        ]
        if accuracy_only:
            ap.error(
                f"--bench reports bench files only: {', '.join(accuracy_only)} "
                + ("is" if len(accuracy_only) == 1 else "are")
                + " for the accuracy report"
            )
        return report_bench(args)
    # the accuracy report's defaults (--bench has its own)
    args.outputs = args.outputs or "outputs"
    args.markdown = args.markdown or "results/README-table.md"
    args.plot = args.plot or "results/accuracy.png"
    args.loss_plot = args.loss_plot or "results/loss.png"
    roots = [Path(args.outputs)] + ([Path(args.results)] if args.results else [])
    rows, warnings = collect(roots)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not rows:
        where = " or ".join(str(r) for r in roots)
        print(f"nothing to report: no metrics_*.json under {where} (run `make eval` first)", file=sys.stderr)
        return 0
    table = markdown(rows)
    print(table, end="")
    if args.markdown != "-":
        out = Path(args.markdown)
        write_atomic(out, lambda f: f.write(table))
        print(f"table written to {out}", file=sys.stderr)
    if args.plot.lower() != "none":
        plot(rows, Path(args.plot))
        print(f"chart written to {args.plot}", file=sys.stderr)
    curves = loss_curves(roots) if args.loss_plot.lower() != "none" else {}
    if curves:
        plot_losses(curves, Path(args.loss_plot))
        print(f"loss curves of {len(curves)} run(s) written to {args.loss_plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
