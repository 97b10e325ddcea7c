"""The results report: one row per setup (dev and test side by side), a PNG chart, and a clear line when
there is nothing to report. Built from hand-written metrics files, so no model runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finqa_trl import report


def metrics(exe: float, prog: float, invalid: float = 0.1, n: int = 100, **extra) -> dict:
    return {
        "n": n,
        "exe_acc": exe,
        "prog_acc": prog,
        "invalid": invalid,
        "by_steps": {},
        "by_op": {},
        **extra,
    }


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def make_outputs(root: Path) -> Path:
    out = root / "outputs"
    recipe = {
        "recipe": "qdora-1b",
        "model_name_or_path": "meta-llama/Llama-3.2-1B-Instruct",
        "use_peft": True,
        "use_dora": True,
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
    }
    write(out / "qdora-1b" / "recipe.yaml", yaml.safe_dump(recipe))
    run = {
        "model": "outputs/qdora-1b",
        "base": "meta-llama/Llama-3.2-1B-Instruct",
        "method": "QDoRA",
        "quant": "4-bit NF4",
        "eg_k": 0,
        "context": "full",
        "num_samples": 1,
        "decoding": "greedy",
    }
    write(out / "qdora-1b" / "metrics_dev.json", metrics(0.612, 0.583, split="dev", **run))
    write(
        out / "qdora-1b" / "metrics_test.json",
        metrics(0.6, 0.57, 0.02, split="test", examples_per_s=40.5, **run),
    )
    sc = {**run, "num_samples": 8, "decoding": "sample"}
    write(out / "qdora-1b" / "metrics_test_sc8.json", metrics(0.65, 0.6, split="test", **sc))
    # Written by `python -m finqa_trl.score --output`: no metadata, so the recipe and file name tell.
    write(out / "qdora-1b" / "merged" / "metrics_test.json", metrics(0.599, 0.569))
    base = {
        "model": "meta-llama/Llama-3.2-1B-Instruct",
        "method": "base (3-shot)",
        "quant": "bfloat16",
        "eg_k": 3,
    }
    write(
        out / "Llama-3.2-1B-Instruct-3shot" / "metrics_test_3shot.json",
        metrics(0.2, 0.15, 0.3, split="test", **base),
    )
    write(out / "broken" / "metrics_test.json", "{ not json")
    write(out / "other" / "metrics_notes.json", {"hello": 1})
    return out


def test_table_and_chart(tmp_path, capsys):
    out = make_outputs(tmp_path)
    md, png = tmp_path / "results" / "README-table.md", tmp_path / "results" / "acc.png"
    assert report.main(["--outputs", str(out), "--markdown", str(md), "--plot", str(png)]) == 0
    printed, err = capsys.readouterr()
    table = md.read_text()
    assert printed == table
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert (
        lines[0] == "| Model | Method | Quant | Dev Acc | Test Acc | Dev Prog | Test Prog | Invalid | Notes |"
    )
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == 4
    base = rows[0]  # base first, then the fine-tunes by method (and quant)
    merged = next(r for r in rows if "merged" in r[8])
    sc = next(r for r in rows if "self-consistency" in r[8])
    qdora = next(r for r in rows if r not in (base, merged, sc))
    assert base[:5] == ["Llama-3.2-1B-Instruct", "base (3-shot)", "bfloat16", "-", "20.0"]
    # "4-bit NF4" is how predict named its 4-bit evaluations before it named them as recipes do (NF4+DQ)
    assert qdora[:3] == ["Llama-3.2-1B-Instruct", "QDoRA", "4-bit NF4+DQ"]
    assert qdora[3:8] == ["61.2", "60.0", "58.3", "57.0", "2.0"]
    assert "qdora-1b" in qdora[8] and "40.5 ex/s" in qdora[8]
    assert sc[1] == "QDoRA" and sc[4] == "65.0" and "self-consistency x8" in sc[8]
    assert merged[1] == "QDoRA" and merged[4] == "59.9" and "qdora-1b/merged" in merged[8]
    assert "broken" in err and "metrics_notes.json" in err  # unreadable files: a warning, not a crash
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob(".*tmp*"))


def test_results_folder_is_gathered_when_asked(tmp_path, capsys):
    out, res = tmp_path / "outputs", tmp_path / "results"
    write(
        res / "h100" / "lora-3b" / "metrics_dev.json",
        metrics(0.7, 0.68, split="dev", method="LoRA", quant="bf16"),
    )
    args = ["--outputs", str(out), "--markdown", "-", "--plot", "none"]
    assert report.main(args) == 0
    assert "nothing to report" in capsys.readouterr().err
    assert report.main([*args, "--results", str(res)]) == 0
    printed = capsys.readouterr().out
    assert "| LoRA | bf16 | 70.0 | - | 68.0 | - |" in printed
    assert not list(tmp_path.rglob("*.md")) and not list(tmp_path.rglob("*.png"))


def test_nothing_to_report_writes_nothing(tmp_path, capsys):
    md = tmp_path / "results" / "README-table.md"
    assert report.main(["--outputs", str(tmp_path / "outputs"), "--markdown", str(md)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "nothing to report" in captured.err
    assert not (tmp_path / "results").exists()


def _state(path: Path, losses: list[float], step0: int = 5) -> None:
    history = [{"step": step0 * (i + 1), "loss": x} for i, x in enumerate(losses)] + [{"train_runtime": 1.0}]
    write(path, {"global_step": step0 * len(losses), "log_history": history})


def test_loss_curves_one_per_run(tmp_path, capsys):
    out = make_outputs(tmp_path)
    _state(out / "lora-1b" / "trainer_state.json", [2.0, 1.0, 0.5])  # the run's own, written at the end
    _state(out / "lora-1b" / "checkpoint-5" / "trainer_state.json", [2.0])  # ignored: the run has its own
    _state(out / "dora-1b" / "checkpoint-5" / "trainer_state.json", [2.2])  # interrupted: latest checkpoint
    _state(out / "dora-1b" / "checkpoint-10" / "trainer_state.json", [2.2, 1.1])
    curves = report.loss_curves([out])
    assert curves == {"dora-1b": [(5, 2.2), (10, 1.1)], "lora-1b": [(5, 2.0), (10, 1.0), (15, 0.5)]}
    # a checkpoint folder itself as the root: its curve, named after the run
    assert report.loss_curves([out / "dora-1b" / "checkpoint-10"]) == {"dora-1b": [(5, 2.2), (10, 1.1)]}
    png = tmp_path / "loss.png"
    args = ["--outputs", str(out), "--markdown", "-", "--plot", "none", "--loss_plot", str(png)]
    assert report.main(args) == 0
    assert "loss curves of 2 run(s)" in capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bench_file(path: Path, rows: list[dict], host: dict | None = None) -> Path:
    write(
        path, {"device": "NVIDIA H200", "examples": 512, "results": rows} | ({"host": host} if host else {})
    )
    return path


def speed(shape: str, method: str, variant: str, tok_s: float) -> dict:
    return {"shape": shape, "method": method, "variant": variant, "tokens_per_s": tok_s, "peak_gib": 1.0}


def test_bench_files_are_reported_side_by_side_with_ratios_inside_each_source(tmp_path, capsys):
    # One machine's runs split over two files share a source; another machine's plain TRL never pairs with
    # them
    a = bench_file(tmp_path / "a.json", [speed("1b", "lora", "recipe", 300.0), speed("1b", "lora", "x", 1.0)])
    b = bench_file(tmp_path / "b.json", [speed("1b", "lora", "trl", 100.0)])
    evaluation = {"eval": "recipe", "shape": "1b"}
    c = bench_file(
        tmp_path / "c.json", [speed("1b", "lora", "trl", 150.0), evaluation], {"cpu": "EPYC X", "cpus": 16}
    )
    png, md = tmp_path / "bench.png", tmp_path / "bench.md"
    argv = ["--bench", f"M={a}", f"M={b}", str(c), "--variants", "recipe", "trl", "--plot", str(png)]
    assert report.main([*argv, "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "| 1b | lora | recipe | 300 | 1.0 | – | 3.00x | M |" in out
    assert "| 1b | lora | trl | 150 | 1.0 | – | 1.00x | c |" in out and "| x |" not in out
    assert md.read_text() == out and png.read_bytes().startswith(b"\x89PNG")
    # each source's card and host under the table: c's file names its host, M's two files do not
    assert out.endswith("- M: NVIDIA H200, host not recorded\n- c: NVIDIA H200, host EPYC X (16 CPUs)\n")
    rows = report.bench_rows([f"M={a}", str(c)])
    assert [(r["variant"], r["source"]) for r in rows] == [("recipe", "M"), ("x", "M"), ("trl", "c")]


def test_bench_mode_writes_no_accuracy_table_and_bad_files_get_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = bench_file(tmp_path / "good.json", [speed("3b", "qlora", "recipe", 10.0)])
    assert report.main(["--bench", str(good), "--plot", "none"]) == 0
    assert not (tmp_path / "results").exists()  # the table is printed; files only where asked
    write(tmp_path / "bad.json", "{not json")
    for bad in ("bad.json", "missing.json", "M=missing.json"):
        assert report.main(["--bench", str(good), bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --bench {bad}: not a bench result file") and err.count("\n") == 1
    assert not (tmp_path / "results").exists()
    write(tmp_path / "metrics.json", {"n": 1})  # valid JSON, not a bench file
    assert report.main(["--bench", "metrics.json"]) == 2
    assert "no results list" in capsys.readouterr().err


def test_the_accuracy_report_keeps_its_default_files(tmp_path, monkeypatch, capsys):
    # Its --outputs, --markdown, --plot and --loss_plot defaults (set after parsing: --bench has its own)
    monkeypatch.chdir(tmp_path)
    make_outputs(tmp_path / "outputs")
    assert report.main([]) == 0
    assert (tmp_path / "results" / "README-table.md").read_text() == capsys.readouterr().out
    assert (tmp_path / "results" / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "results" / "bench.png").exists()


def test_bench_charts_pair_with_the_first_plain_trl_and_note_only_measured_peaks(
    tmp_path, monkeypatch, capsys
):
    drawn = {}
    monkeypatch.setattr(
        report, "grouped_bars", lambda groups, series, path, **kw: drawn.update(series=series)
    )
    rows = [
        {**speed("1b", "lora", "trl", 100.0), "longest_batch_peak_gib": 3.5},
        {**speed("1b", "lora", "trl", 150.0), "longest_batch_peak_gib": None},  # timed again: not the base
        {**speed("1b", "lora", "recipe", 300.0), "longest_batch_peak_gib": "out of memory"},
    ]
    f = bench_file(tmp_path / "run.json", rows)
    assert report.main(["--bench", str(f), "--plot", str(tmp_path / "c.png")]) == 0
    assert "| 1b | lora | recipe | 300 | 1.0 | out of memory | 3.00x | run |" in capsys.readouterr().out
    assert drawn["series"] == [("trl", [100.0], ["3.5 GiB"]), ("recipe", [300.0], ["3.00x"])]


def test_bench_mode_refuses_what_it_cannot_report_in_one_line(tmp_path, capsys):
    good = bench_file(tmp_path / "good.json", [speed("3b", "qlora", "recipe", 10.0)])
    failed = bench_file(tmp_path / "failed.json", [{"shape": "1b", "method": "lora", "variant": "trl",
                                                    "error": "exited with code 1"}])  # fmt: skip
    assert report.main(["--bench", str(failed), "--plot", str(tmp_path / "none.png")]) == 0
    assert "no chart: no timed training rows" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()
    bad_rows = {
        "noshape": {"method": "lora", "variant": "trl"},
        "nullspeed": {**speed("1b", "lora", "trl", 1.0), "tokens_per_s": None},
        "zero": speed("1b", "lora", "trl", 0.0),
        "nopeak": {"shape": "1b", "method": "lora", "variant": "trl", "tokens_per_s": 5.0},
    }
    for name, row in bad_rows.items():
        f = bench_file(tmp_path / f"{name}.json", [speed("1b", "lora", "recipe", 1.0), row])
        assert report.main(["--bench", str(good), str(f), "--plot", "none"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: --bench {f}: result 1 ") and err.count("\n") == 1, err
    assert report.main(["--bench", str(good), "--variants", "recip", "--plot", "none"]) == 2
    assert capsys.readouterr().err == "error: --variants recip: those files hold recipe\n"
    assert report.main(["--bench", f"={good}"]) == 2
    assert "an empty SOURCE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        report.main(["--bench", str(good), "--loss_plot", "x.png"])
    assert exit_.value.code == 2 and "--loss_plot is for the accuracy report" in capsys.readouterr().err
    assert {p.name for p in tmp_path.iterdir()} == {f"{n}.json" for n in ("good", "failed", *bad_rows)}
