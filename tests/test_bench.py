"""The benchmark's plumbing (the timing itself needs a GPU: `make bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finqa_trl import bench, report, train


def test_every_lever_is_a_valid_override_of_a_recipe(monkeypatch):
    expected = {
        "random_batches": ("train_sampling_strategy", "random"),
        "no_ckpt": ("activation_checkpointing", False),
        "bs8": ("per_device_train_batch_size", 8),
        "bs16": ("per_device_train_batch_size", 16),
        "compile_model": ("torch_compile", True),
    }
    levers = {"no_upcast", "upcast", "bf16_adapters", "no_input_cast", "input_cast", "liger", "no_liger"}
    levers |= {
        "no_cudnn",
        "pad64",
        "no_pad64",
        "compile",
        "no_compile",
        "cudagraphs",
        "autotune",
        "cpp_wrapper",
        "whole_layer",
        "body",
        "parts",
        "causal_attention",
        "defer_metrics",
        "no_causal_attention",
        "no_defer_metrics",
    }
    levers |= {"tokens", "no_tokens", "no_nan_filter", "fused_dropout", "no_fused_dropout", "lean", "no_lean"}
    levers |= {"weight_copies"}
    assert set(expected) | levers == set(bench.LEVERS)
    base = train.parse(["--config", "recipes/lora-1b.yaml"]).training
    for name, (field, value) in expected.items():
        training = train.parse(
            ["--config", "recipes/lora-1b.yaml", *bench.lever_args(f"recipe:{name}")]
        ).training
        assert getattr(training, field) == value != getattr(base, field), name
        # The objective stays the same: the effective batch is the recipe's 16.
        assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 16
    q = ["--config", "recipes/qlora-1b.yaml"]
    assert train.parse(q).script.kbit_fp32_upcast is False  # measured faster at plain TRL's memory
    assert train.parse([*q, *bench.lever_args("recipe:no_upcast")]).script.kbit_fp32_upcast is False
    assert train.parse([*q, *bench.lever_args("recipe:upcast")]).script.kbit_fp32_upcast is True
    lora = ["--config", "recipes/lora-1b.yaml"]
    assert train.parse(lora).script.adapters_in_compute_dtype is False
    assert train.parse([*lora, *bench.lever_args("recipe:bf16_adapters")]).script.adapters_in_compute_dtype
    assert (
        train.parse([*lora, *bench.lever_args("recipe:no_input_cast")]).script.adapter_input_cast == "false"
    )
    assert train.parse([*lora, *bench.lever_args("recipe:input_cast")]).script.adapter_input_cast == "true"
    assert train.parse(lora).training.pad_to_multiple_of == 64  # the recipes' default, which no_pad64 undoes
    assert train.parse(lora).script.micro_batch_tokens == "auto"  # the default, which no_tokens undoes
    assert train.parse([*lora, *bench.lever_args("recipe:no_tokens")]).script.micro_batch_tokens == "false"
    assert train.parse([*lora, *bench.lever_args("recipe:no_pad64")]).training.pad_to_multiple_of is None
    assert train.parse([*lora, *bench.lever_args("recipe:tokens12544")]).script.micro_batch_tokens == "12544"
    assert not train.parse(lora).script.adapter_weight_copies  # a lever until timed
    assert train.parse([*lora, *bench.lever_args("recipe:weight_copies")]).script.adapter_weight_copies
    kept = train.parse([*lora, *bench.lever_args("recipe:tokens4096+keep8")]).script
    assert (kept.micro_batch_tokens, kept.uncheckpointed_layers) == ("4096", 8)
    assert train.parse(lora).script.uncheckpointed_layers == 0  # every layer checkpointed by default
    for bad in ("tokens0", "tokens012", "tokens²", "tokens-5", "keep0", "keep"):
        with pytest.raises(SystemExit, match=f"unknown lever '{bad}'"):
            bench.lever_args(f"recipe:{bad}")
    assert train.parse(lora).training.logging_nan_inf_filter  # on by default, which no_nan_filter undoes
    assert not train.parse([*lora, *bench.lever_args("recipe:no_nan_filter")]).training.logging_nan_inf_filter
    assert train.parse(lora).script.lora_dropout_kernel == "false"  # a lever until timed
    fused = train.parse([*lora, *bench.lever_args("recipe:fused_dropout")]).script.lora_dropout_kernel
    assert fused == "true"
    assert (
        train.parse([*lora, *bench.lever_args("recipe:no_fused_dropout")]).script.lora_dropout_kernel
        == "false"
    )
    assert train.parse(lora).script.cudnn_attention
    assert not train.parse([*lora, *bench.lever_args("recipe:no_cudnn")]).script.cudnn_attention
    assert train.parse(lora).script.compile_layers == "auto"  # compiled on one GPU or DDP
    assert train.parse([*lora, *bench.lever_args("recipe:compile")]).script.compile_layers == "true"
    eager = [*lora, *bench.lever_args("recipe:no_compile")]
    assert train.parse(eager).script.compile_layers == "false"
    assert train.parse(lora).script.compile_mode == "default"
    assert (
        train.parse([*lora, *bench.lever_args("recipe:cudagraphs")]).script.compile_mode == "reduce-overhead"
    )
    tuned = train.parse([*lora, *bench.lever_args("recipe:autotune")]).script.compile_mode
    assert tuned == "max-autotune-no-cudagraphs"
    cpp = train.parse([*lora, *bench.lever_args("recipe:cpp_wrapper")]).script.compile_mode
    assert cpp == "cpp-wrapper"
    assert train.parse(lora).script.causal_attention == "auto" and train.parse(lora).script.defer_metrics
    waits = train.parse([*lora, *bench.lever_args("recipe:no_causal_attention+no_defer_metrics")]).script
    assert waits.causal_attention == "false" and not waits.defer_metrics
    assert train.parse(lora).script.compile_scope == "auto"
    assert train.parse([*lora, *bench.lever_args("recipe:parts")]).script.compile_scope == "parts"
    assert train.parse([*lora, *bench.lever_args("recipe:whole_layer")]).script.compile_scope == "layer"
    assert train.parse([*lora, *bench.lever_args("recipe:body")]).script.compile_scope == "body"
    # Liger's kernels: a recipe default where installed on a GPU (faked here) and the layers run eager (they
    # are off under the compiled layers of one GPU), which no_liger turns off
    monkeypatch.setattr("finqa_trl.modeling.cuda_available", lambda: True)
    monkeypatch.setattr("finqa_trl.modeling.triton_gpu_ready", lambda: True)
    monkeypatch.setattr("finqa_trl.modeling.liger_installed", lambda: True)
    assert not train.parse(lora).training.use_liger_kernel
    assert train.parse(eager).training.use_liger_kernel
    qdora = ["--config", "recipes/qdora-1b.yaml"]  # its recipe keeps Liger off (test_train), the lever on
    assert train.parse([*qdora, *bench.lever_args("recipe:liger")]).training.use_liger_kernel
    assert not train.parse([*q, *bench.lever_args("recipe:no_liger")]).training.use_liger_kernel
    assert not train.parse([*eager, *bench.lever_args("recipe:no_liger")]).training.use_liger_kernel


def test_levers_combine_and_unknown_ones_are_refused():
    assert bench.lever_args("recipe") == []
    assert bench.lever_args("recipe:random_batches+bs16") == [
        *bench.LEVERS["random_batches"],
        *bench.LEVERS["bs16"],
    ]
    with pytest.raises(SystemExit, match="unknown lever 'turbo'"):
        bench.lever_args("recipe:turbo")


def test_table_compares_each_variant_with_plain_trl():
    rows = [
        {"variant": "trl", "shape": "1b", "method": "lora", "tokens_per_s": 1000.0, "peak_gib": 4.8},
        {
            "variant": "recipe:bs16",
            "shape": "1b",
            "method": "lora",
            "tokens_per_s": 2500.0,
            "peak_gib": 5.1,
            "longest_batch_peak_gib": 6.2,
        },
        {"variant": "recipe", "shape": "3b", "method": "dora", "error": "out of memory"},
        {"shape": "1b", "examples": 1147, "wall_seconds": 9.0},
    ]
    lines = report.bench_table(rows).splitlines()
    assert lines[2] == "| 1b | lora | trl | 1,000 | 4.8 | – | 1.00x |"
    assert lines[3] == "| 1b | lora | recipe:bs16 | 2,500 | 5.1 | 6.2 | 2.50x |"
    assert lines[4] == "| 3b | dora | recipe | out of memory | | | |"
    assert len(lines) == 5


def test_cli_refuses_timing_real_shapes_without_a_gpu(capsys, sample_dir):
    assert bench.main(["--data_dir", str(sample_dir), "--tokenizer", str(sample_dir), "--shapes", "1b"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--examples", "0"], ["--warmup_examples", "-1"], ["--max_examples", "0"]])
def test_cli_refuses_empty_windows(bad, capsys, sample_dir):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--data_dir", str(sample_dir), "--tokenizer", str(sample_dir), *bad])
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_cli_names_a_missing_folder_in_one_line(capsys, sample_dir):
    assert bench.main(["--data_dir", str(sample_dir), "--tokenizer", "no/such/tokenizer"]) == 2
    assert capsys.readouterr().err == "error: --tokenizer no/such/tokenizer: no such directory\n"


def test_a_variants_levers_reach_the_trainer(monkeypatch, tmp_path):
    # Regression: the first GPU run timed `recipe:group_by_length` without its lever (the call dropped it).
    seen = {}

    def fake_recipe_trainer(*args, **kwargs):
        seen["extra"] = list(args[8])
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench, "_recipe_trainer", fake_recipe_trainer)
    r = bench.bench_training("recipe:random_batches+bs16", "lora", "tiny", tmp_path, tmp_path, [], 1, 1)
    assert seen["extra"] == bench.lever_args("recipe:random_batches+bs16")
    assert r["error"] == "RuntimeError: stop here" and r["variant"] == "recipe:random_batches+bs16"


def test_eval_timing_reaches_the_result(tmp_path):
    # Regression: bench_eval read a "timing" key that predict's metrics never had, so every eval row lost
    # its generation time, batch counts and load time.
    from finqa_trl.data import FIXTURE_DIR
    from finqa_trl.modeling import SMOKE_MODEL, resolve_source

    model = resolve_source(SMOKE_MODEL).path
    r = bench.bench_eval("smoke", model, FIXTURE_DIR, tmp_path / "eval")
    assert r["examples"] == 6 and r["eval"] == "auto"
    assert r["generation_seconds"] > 0 and r["batches"] >= 1 and r["largest_batch"] >= 1
    assert abs(r["eval_seconds"] - (r["wall_seconds"] - r["load_seconds"])) < 0.02  # rounded to 0.01


def test_a_profiled_eval_writes_its_busiest_ops(tmp_path):
    from finqa_trl.data import FIXTURE_DIR
    from finqa_trl.modeling import SMOKE_MODEL, resolve_source

    model = resolve_source(SMOKE_MODEL).path
    prof = tmp_path / "bench-x-profile-smoke-prefill.txt"
    r = bench.bench_eval("smoke", model, FIXTURE_DIR, tmp_path / "eval", "prefill", prof)
    assert r["profile"] == prof.name and r["examples"] == 6
    text = prof.read_text()
    assert "sorted by self_cpu_time_total" in text and "aten::" in text  # the model's ops, timed


def test_an_eval_variant_that_fails_is_recorded_not_raised(tmp_path):
    r = bench.bench_eval("smoke", tmp_path / "no-such-model", tmp_path, tmp_path / "eval", "static")
    assert r["eval"] == "static" and "error" in r


def test_every_variant_name_passes_the_cli_check(capsys, sample_dir, monkeypatch):
    # Regression: trl:full_length was refused as an unknown lever. The check runs before anything is built;
    # on a machine without a GPU the 1b shape then stops at the GPU check, which shows the names passed.
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    names = ["trl", "trl:full_length", "recipe", "recipe:liger+bs16"]
    assert bench.main(["--data_dir", str(sample_dir), "--tokenizer", str(sample_dir), "--shapes", "1b",
                       "--variants", *names]) == 2  # fmt: skip
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--data_dir", str(sample_dir), "--tokenizer", str(sample_dir), "--variants", "recipe:no"])


def test_eval_variants_override_the_benchs_own_flags():
    from finqa_trl import predict

    base = ["--model", "m", "--split", "test", "--max_new_tokens", "20"]
    assert predict.parse_args([*base, *bench.EVAL_VARIANTS["prefill"]]).max_new_tokens == 1  # last one wins
    assert predict.parse_args([*base, *bench.EVAL_VARIANTS["static"]]).cache_implementation == "static"
    assert predict.parse_args([*base, *bench.EVAL_VARIANTS["continuous"]]).generation == "continuous"


def test_every_eval_variant_passes_predicts_checks(tmp_path, monkeypatch):
    # predict refuses flag combinations that would do nothing; a variant it refused would only show up as an
    # error row of a GPU bench (bench_eval keeps going), so each is resolved here as bench_eval passes it
    # (on a GPU machine with liger-kernel installed, as the liger and memory variants need).
    from finqa_trl import predict
    from finqa_trl.modeling import SMOKE_MODEL

    monkeypatch.setattr("finqa_trl.modeling.liger_installed", lambda: True)
    monkeypatch.setattr("finqa_trl.modeling.cuda_available", lambda: True)

    for name, flags in bench.EVAL_VARIANTS.items():
        args = predict.parse_args(["--model", SMOKE_MODEL, "--split", "test", "--output_dir", str(tmp_path),
                                   "--max_new_tokens", "20", "--overwrite", "true", *flags])  # fmt: skip
        assert predict.resolve_settings(args) is not None, name


def test_the_worst_step_of_token_passes_takes_the_epochs_biggest_pass() -> None:
    # Under the unpadded budget (4 x 3,076 = 12,304) the longest step's passes lose a row to the padding,
    # while steps of shorter examples fill the budget: machine W's run peaks sat above the longest step's.
    # The bench finds the pass of the most padded tokens over the epoch's steps, then of the most rows.
    from types import SimpleNamespace

    lengths = [3076, *[2456] * 7] + [*[3070] * 4, *[50] * 4] + [1530] * 8
    trainer = SimpleNamespace(
        micro_batch_tokens=4 * 3076,
        train_dataset={"input_ids": [[0] * n for n in lengths]},
        args=SimpleNamespace(per_device_train_batch_size=8, pad_to_multiple_of=64),
        _get_train_sampler=lambda data: range(len(lengths)),
    )
    # the longest step: passes of 3 x 3,136 at most; the second step: 4 x 3,072 = 12,288 padded tokens;
    # the third: 8 x 1,536 = 12,288 as well, in more rows
    assert bench.biggest_pass(trainer) == list(range(16, 24))
    trainer._get_train_sampler = lambda data: [*range(8, 16), *range(8), *range(16, 24)][::-1]
    assert sorted(bench.biggest_pass(trainer)) == list(range(16, 24))  # wherever the sampler puts it
    trainer._get_train_sampler = lambda data: None  # an iterable dataset: no order to plan
    assert bench.biggest_pass(trainer) is None
    trainer.micro_batch_tokens = None  # fixed micro-batches: the longest batch is the worst
    assert bench.biggest_pass(trainer) is None


def test_the_worst_steps_pass_runs_with_the_gradients_held(monkeypatch) -> None:
    # Every pass after a step's first runs with the adapter's gradients already allocated, so the extra step
    # measures with them held (earlier runs' extra steps started without and read low by about their size),
    # and leaves none behind.
    from types import SimpleNamespace

    import torch

    layer = torch.nn.Linear(2, 2)
    layer.bias.requires_grad_(False)
    held: list[bool] = []
    trainer = SimpleNamespace(
        model=layer,
        model_wrapped=layer,
        training_step=lambda model, batch: held.append(
            layer.weight.grad is not None and layer.bias.grad is None
        ),
    )
    monkeypatch.setattr(bench, "_batch_of", lambda trainer, rows, description: {})
    assert bench._peak_of_step(trainer, [0]) is None  # no CUDA here
    assert held == [True] and layer.weight.grad is None


@pytest.mark.slow
def test_the_worst_step_is_the_same_longest_batch_on_equal_data(sample_dir, llama3_tokenizer_dir, tmp_path):
    # The memory condition compares each variant's worst step: plain TRL at full length and the recipe with
    # fixed micro-batches train on the same examples at the same micro-batch, so their longest micro-batches
    # hold the same tokens. The recipe itself loads a step's 16 examples as one batch (here all 12), run in
    # passes of at most 4 x the longest example (unpadded): no pass, padding included, holds more than plain
    # TRL's micro-batch of the longest example and three rows padded to it.
    from finqa_trl.modeling import load_tokenizer, resolve_source
    from finqa_trl.prompts import format_split

    model = bench.build_shape("tiny", llama3_tokenizer_dir, tmp_path / "m")
    records = train.load_records(sample_dir, list(bench.BENCH_SPLITS), 12)
    tokenizer = load_tokenizer(resolve_source(str(model)))
    rows = format_split(records, tokenizer=tokenizer, max_prompt_tokens=3072, trim="gold")
    got = {
        v: bench.bench_training(v, "lora", "tiny", model, sample_dir, rows, 4, 4, limit=12)
        for v in ("trl:full_length", "recipe:no_tokens", "trl", "recipe")
    }
    assert all("error" not in r for r in got.values()), got
    # TRL's default max_length=1024 truncates, then drops the examples whose program was cut off; the
    # full_length variant is plain TRL on the recipes' data, for the memory comparison.
    assert got["trl:full_length"]["train_examples"] == got["recipe"]["train_examples"] == len(rows) == 12
    assert got["trl"]["train_examples"] < 12  # the sample's prompts are mostly longer than 1,024 tokens
    fixed = got["recipe:no_tokens"]
    assert got["trl:full_length"]["longest_batch_tokens"] == fixed["longest_batch_tokens"] > 4 * 1024
    assert fixed["micro_batch"] == 4 and fixed["micro_batch_tokens"] is None
    regrouped, longest = got["recipe"], got["recipe"]["longest_example_tokens"]
    assert (
        regrouped["micro_batch"] == 16 and regrouped["longest_batch_tokens"] > fixed["longest_batch_tokens"]
    )
    assert longest == fixed["longest_example_tokens"] > 1024
    assert regrouped["micro_batch_tokens"] == 4 * longest  # plain TRL's worst batch: 4 x the longest
    assert longest == got["trl:full_length"]["longest_example_tokens"]
    rows, width = regrouped["biggest_pass"]  # the epoch's biggest pass, run on its own as well
    assert rows * width <= regrouped["micro_batch_tokens"] and width % 64 == 0
    assert "biggest_pass" not in fixed and "biggest_pass" not in got["trl:full_length"]
    assert got["trl"]["longest_batch_tokens"] <= 4 * 1024  # plain TRL's default truncation


def test_the_meter_counts_the_timed_steps_tokens_on_the_host() -> None:
    # Each batch's real tokens counted by the collator on the CPU and added up as the training step takes the
    # batch, not read back from the GPU at every step; the count never reaches the model
    from types import SimpleNamespace

    import torch

    taken: list[dict] = []
    trainer = SimpleNamespace(
        data_collator=lambda features: {
            "attention_mask": torch.tensor([[1] * len(features) + [0] * 2]),
            "input_ids": torch.zeros(1, len(features) + 2),
        },
        training_step=lambda model, inputs, *rest: taken.append(dict(inputs)),
    )
    meter = bench._Meter(warmup=1)
    meter.watch(trainer)
    batches = [trainer.data_collator([{}] * n) for n in (3, 5, 7, 11, 13)]
    batches.append(trainer.data_collator([{}] * 17))  # collated ahead, never taken
    cb = meter.callback()
    for step, taken_now in ((1, batches[:2]), (2, batches[2:3]), (3, batches[3:5])):  # uneven steps
        for batch in taken_now:
            trainer.training_step(None, batch)
        cb.on_step_end(None, SimpleNamespace(global_step=step, max_steps=3), None)
    assert meter.result()["tokens"] == 7 + 11 + 13  # steps 2 and 3
    assert all(bench.BENCH_TOKENS not in inputs for inputs in taken) and len(taken) == 5


def test_a_profiled_training_variant_keeps_its_timing_and_names_its_batch(tmp_path):
    # The profile runs after the timed window, on the micro-batch of median-length examples; on the CPU there
    # are no kernels to count, so those fields stay empty rather than zero. (The smoke model: the tiny
    # shape's 128k-vocabulary logits take ~17 s per micro-step on a CPU.) Fixed micro-batches of 4: with the
    # recipes' token passes a batch is a step's 16 examples, more than the fixture's 12.
    from finqa_trl.data import FIXTURE_DIR
    from finqa_trl.modeling import SMOKE_MODEL, resolve_source

    model = resolve_source(SMOKE_MODEL).path
    prof = tmp_path / "bench-x-profile-tiny-lora-recipe.txt"
    r = bench.bench_training(
        "recipe:no_tokens", "lora", "tiny", model, FIXTURE_DIR, [], 4, 4, limit=8, profile=prof
    )
    assert "error" not in r and r["tokens_per_s"] > 0, r
    assert r["profile"] == prof.name and r["profile_step_ms"] > 0 and r["profiled_step_ms"] > 0
    assert r["profile_gpu_kernel_ms"] is None and r["profile_kernels"] is None
    assert 0 < r["profile_batch_tokens"] < r["longest_batch_tokens"]  # the median examples, not the longest
    text = prof.read_text()
    assert "sorted by self_cpu_time_total" in text and "aten::" in text


def test_a_compiled_variant_counts_its_graphs_at_the_end_of_the_window_and_after_the_extra_steps():
    # The extra worst-step passes run the longest examples in passes of shapes the window may not have met,
    # so a compile there must not read as one inside the timed window.
    from finqa_trl.data import FIXTURE_DIR
    from finqa_trl.modeling import SMOKE_MODEL, resolve_source

    model = resolve_source(SMOKE_MODEL).path
    r = bench.bench_training(
        "recipe:no_tokens+compile", "lora", "tiny", model, FIXTURE_DIR, [], 4, 4, limit=8
    )
    assert "error" not in r and r["tokens_per_s"] > 0, r
    assert 1 <= r["compiled_graphs_window"] <= r["compiled_graphs"]


def test_cli_refuses_a_variant_that_only_starts_like_recipe_and_a_folder_without_splits(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--data_dir", str(tmp_path), "--tokenizer", str(tmp_path), "--variants", "recipex"])
    assert exit_.value.code == 2 and "unknown variant 'recipex'" in capsys.readouterr().err
    work = tmp_path / "work"
    argv = ["--data_dir", str(tmp_path), "--tokenizer", str(tmp_path), "--shapes", "tiny"]
    argv += ["--workdir", str(work)]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not work.exists()  # refused before anything was written


def test_each_training_variant_runs_in_a_fresh_process(tmp_path, monkeypatch):
    # Variants in one process share cuDNN's attention plans (one per batch length), so a later one runs faster
    # for that alone: by default each runs as its own `python -m finqa_trl.bench --same_process` child, whose
    # result (and profile) the parent collects; a child that dies leaves an error row, not a lost run.
    import argparse
    import subprocess

    seen = []

    def fake_run(cmd, check):  # noqa: ANN001
        seen.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        variant = cmd[cmd.index("--variants") + 1]
        if variant == "recipe:no_liger":  # this child crashes before writing anything
            return subprocess.CompletedProcess(cmd, 1)
        row = {"variant": variant, "method": "lora", "shape": "1b", "tokens_per_s": 10.0}
        (out / "bench-child.json").write_text(json.dumps({"results": [row]}))
        (out / "bench-child-profile-1b-lora-recipe.txt").write_text("ops")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = argparse.Namespace(data_dir="d", tokenizer="t", examples=512, warmup_examples=32, max_examples=7)
    prof = tmp_path / "bench-x-profile-1b-lora-recipe.txt"
    r = bench.bench_training_in_fresh_process(args, "1b", "lora", "recipe", tmp_path / "work", prof)
    assert r == {**r, "tokens_per_s": 10.0, "process": "fresh", "profile": prof.name}
    assert prof.read_text() == "ops"  # moved out of the child's temporary folder
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "finqa_trl.bench", "--same_process"] and "--profile" in cmd
    assert cmd[cmd.index("--workdir") + 1] == str(tmp_path / "work")  # the parent's saved models, reused
    assert (cmd[cmd.index("--shapes") + 1], cmd[cmd.index("--methods") + 1]) == ("1b", "lora")
    flags = {
        f: cmd[cmd.index(f) + 1] for f in ("--data_dir", "--tokenizer", "--examples", "--warmup_examples")
    }
    assert flags == {"--data_dir": "d", "--tokenizer": "t", "--examples": "512", "--warmup_examples": "32"}
    assert cmd[cmd.index("--max_examples") + 1] == "7"
    bad = bench.bench_training_in_fresh_process(
        args, "1b", "lora", "recipe:no_liger", tmp_path / "work", None
    )
    assert "--profile" not in seen[1]
    assert bad["variant"] == "recipe:no_liger" and "exited with code 1" in bad["error"]


@pytest.mark.slow
def test_the_bench_times_a_variant_in_a_real_child_process(
    sample_dir, llama3_tokenizer_dir, tmp_path, capsys
):
    # The default path end to end on the CPU: the parent builds the tiny model, a `--same_process` child
    # trains one window on one example and the parent's JSON holds its row.
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--data_dir", str(sample_dir), "--tokenizer", str(llama3_tokenizer_dir), "--shapes", "tiny",
            "--methods", "lora", "--variants", "recipe", "--examples", "1", "--warmup_examples", "1",
            "--max_examples", "1", "--workdir", str(work), "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    (result_file,) = out.glob("bench-*.json")
    assert result_file.with_suffix(".png").read_bytes().startswith(b"\x89PNG")  # the chart beside it
    run = json.loads(result_file.read_text())
    (row,) = run["results"]
    assert row["process"] == "fresh" and "error" not in row, row
    # which host ran it: plain TRL's speed may move with the CPU, so every ratio needs it beside the card
    import torch
    import trl

    assert run["host"] == bench.host_info()  # the parent's host, as the rows' children ran on it
    assert (
        run["host"]["versions"]["torch"] == torch.__version__
        and run["host"]["versions"]["trl"] == trl.__version__
    )
    assert row["variant"] == "recipe" and row["tokens_per_s"] > 0 and row["train_examples"] == 1


def test_host_info_names_the_cpu_and_tolerates_what_a_machine_lacks(monkeypatch, tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t: x\n")
    real_path = bench.Path
    monkeypatch.setattr(bench, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    host = bench.host_info()
    assert host["cpu"] == "Some CPU @ 2.0GHz" and 1 <= host["cpus"] <= host["cpus_host"]
    assert host["versions"]["peft"] and set(host["versions"]) >= {
        "torch",
        "transformers",
        "trl",
        "bitsandbytes",
    }

    # no /proc/cpuinfo (macOS) and a package not installed: the platform's name and None, never an error
    monkeypatch.setattr(
        bench, "Path", lambda p: tmp_path / "missing" if p == "/proc/cpuinfo" else real_path(p)
    )
    real_version = bench.importlib.metadata.version

    def version(name: str) -> str:
        if name == "bitsandbytes":
            raise bench.importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(bench.importlib.metadata, "version", version)
    monkeypatch.setattr(bench.platform, "processor", lambda: "arm")
    host = bench.host_info()
    assert host["cpu"] == "arm" and host["versions"]["bitsandbytes"] is None and host["versions"]["peft"]


def test_the_table_and_chart_share_each_rows_ratio_to_plain_trl(tmp_path) -> None:
    rows = [
        {"shape": "1b", "method": "lora", "variant": "recipe", "tokens_per_s": 300.0, "peak_gib": 5.0,
         "longest_batch_peak_gib": 5.1},
        {"shape": "1b", "method": "lora", "variant": "trl", "tokens_per_s": 100.0, "peak_gib": 3.0},
        {"shape": "1b", "method": "lora", "variant": "recipe", "tokens_per_s": 330.0, "peak_gib": 5.0},
        {"shape": "3b", "method": "qlora", "variant": "recipe", "tokens_per_s": 90.0, "peak_gib": 6.0},
        {"shape": "3b", "method": "qlora", "variant": "trl", "error": "exited with code 1"},
        {"shape": "1b", "eval": "recipe", "examples": 4, "eval_seconds": 1.0},
    ]  # fmt: skip
    assert report.vs_plain_trl(rows) == [3.0, 1.0, 3.3, None, None, None]
    table = report.bench_table(rows)
    assert "| 1b | lora | recipe | 300 | 5.0 | 5.1 | 3.00x |" in table
    assert "| 1b | lora | recipe | 330 | 5.0 | – | 3.30x |" in table  # the second of an order check
    assert "| 3b | qlora | recipe | 90 | 6.0 | – | – |" in table  # plain TRL failed: no ratio
    png = tmp_path / "bench.png"
    assert report.bench_chart(rows, png, "test") and png.read_bytes().startswith(b"\x89PNG")
    assert not report.bench_chart(rows[4:], tmp_path / "none.png", "test")  # nothing timed: no chart
    assert not (tmp_path / "none.png").exists()
