"""Training: the smoke recipe through the real entry point (LoRA, DoRA, QLoRA, QDoRA), TRL's completion-only
labels on a real FinQA example with the Llama 3 tokenizer, resume, merge, Hub pushes (faked), GGUF sources,
every bad-input message, and a two-process CPU run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import torchrun_main

from finqa_trl import modeling
from finqa_trl.data import FIXTURE_DIR
from finqa_trl.recipes import method_name
from finqa_trl.train import UsageError, _check_precision_options, main, parse, prepare

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# A few steps on a tiny model: the pipeline, not the accuracy.
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1"]
# two CPU processes under torchrun, failing where the process group outlived main()
TORCHRUN = torchrun_main("train")
LLAMA3_PAD, LLAMA3_EOT = 128004, 128009


@pytest.fixture(scope="module", autouse=True)
def offline_cache(tmp_path_factory: pytest.TempPathFactory):
    """Offline, and a private model cache (the smoke model is built into it once per module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINQA_TRL_CACHE", str(tmp_path_factory.mktemp("finqa-trl-cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.delenv("FINQA_DIR", raising=False)
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # main() may set it; restored afterwards
        yield


def smoke_args(out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "recipes/smoke.yaml",
        "--data_dir",
        str(FIXTURE_DIR),
        "--output_dir",
        str(out),
        *FAST,
        *extra,
    ]


def adapter_keys(out: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def snapshot(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.rglob("*")
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------ training


def test_smoke_lora_via_python_m(tmp_path: Path) -> None:
    """`python -m finqa_trl.train`: adapter, tokenizer, checkpoint and the resolved recipe in output_dir."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "finqa_trl.train", *smoke_args(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[finqa_trl] smoke: LoRA of " in proc.stderr and "1 process(es)" in proc.stderr
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_dora"]) == (16, 32, 0.05, False)
    assert {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]} == {  # all-linear, resolved by PEFT
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["recipe"] == "smoke" and method_name(recipe) == "LoRA"
    assert recipe["model_name_or_path"] == modeling.SMOKE_MODEL and recipe["max_steps"] == 2
    assert recipe["output_dir"] == str(out)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(
        "loss" in h for h in state["log_history"] if "train_runtime" not in h
    )


@pytest.mark.parametrize(
    "method, extra",
    [
        ("DoRA", ["--use_dora", "true"]),
        (
            "QLoRA",
            [
                "--load_in_4bit",
                "true",
                "--bnb_4bit_quant_storage",
                "bfloat16",
                "--use_bnb_nested_quant",
                "true",
            ],
        ),
        (
            "QDoRA",
            ["--use_dora", "true", "--load_in_4bit", "true", "--bnb_4bit_quant_storage", "bfloat16"],
        ),
    ],
)
def test_smoke_dora_qlora_qdora(method: str, extra: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / method
    assert main(smoke_args(out, *extra)) == 0
    err = capsys.readouterr().err
    assert f"smoke: {method} of " in err
    if method.startswith("Q"):  # the base really was NF4 while training
        assert "4-bit nf4 linear layers" in err
    keys = adapter_keys(out)
    assert any("lora_A" in k for k in keys)
    assert any("lora_magnitude_vector" in k for k in keys) is method.endswith("DoRA")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert method_name(recipe) == method and recipe["load_in_4bit"] is method.startswith("Q")


def test_resume_from_last_checkpoint(tmp_path: Path, capsys) -> None:
    """Rerunning the same recipe in its output_dir resumes; the saved recipe.yaml is itself a --config."""
    out = tmp_path / "run"
    assert main(smoke_args(out, "--save_strategy", "steps", "--save_steps", "2")) == 0
    assert (out / "checkpoint-2").is_dir()
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["data_dir"] == str(FIXTURE_DIR) and saved["save_steps"] == 2
    capsys.readouterr()
    assert main(["--config", str(out / "recipe.yaml"), "--max_steps", "3"]) == 0
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().err
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["max_steps"] == 3


def test_a_resume_launched_with_another_global_batch_is_refused(tmp_path: Path, capsys) -> None:
    """Each checkpoint records how many processes saved it and their global batch. Resuming it at another
    global batch (the Trainer would recompute steps and schedule) is one line; another process count at the
    same global batch is a warning. Nothing saved is lost."""
    out = tmp_path / "run"
    assert main(smoke_args(out, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "2")) == 0
    launch = out / "checkpoint-2" / "launch.json"
    saved = json.loads(launch.read_text())
    training = parse(smoke_args(out)).training
    batch = training.per_device_train_batch_size * training.gradient_accumulation_steps
    assert saved == {"processes": 1, "global_batch": batch}
    capsys.readouterr()
    resume = ["--config", str(out / "recipe.yaml"), "--max_steps", "3"]
    accumulation = str(2 * training.gradient_accumulation_steps)
    assert main([*resume, "--gradient_accumulation_steps", accumulation]) == 2  # twice the global batch
    assert f"this launch (1 process(es)) makes it {2 * batch}," in one_line_error(capsys)
    launch.write_text(json.dumps({"processes": 2, "global_batch": 2 * batch}))  # as two processes save it
    assert main(resume) == 2
    err = one_line_error(capsys)
    assert f"at a global batch of {2 * batch} examples; this launch (1 process(es)) makes it {batch}" in err
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-3").exists()
    launch.write_text(json.dumps({"processes": 2, "global_batch": batch}))  # 2 processes at half the batch
    assert main(resume) == 0
    assert "was saved by 2 process(es), resumed on 1" in capsys.readouterr().err
    assert json.loads((out / "checkpoint-3" / "launch.json").read_text()) == saved
    # resuming a checkpoint that --overwrite_output_dir would delete first: one line, nothing deleted
    explicit = ["--resume_from_checkpoint", str(out / "checkpoint-3"), "--overwrite_output_dir", "true"]
    assert main(smoke_args(out, *explicit)) == 2
    assert "lies in the output_dir that --overwrite_output_dir true would empty" in one_line_error(capsys)
    assert (out / "checkpoint-3").is_dir()
    (out / "checkpoint-3" / "launch.json").write_text("{not json")  # damaged: said, then resumed unchecked
    assert main(["--config", str(out / "recipe.yaml"), "--max_steps", "4"]) == 0
    assert "launch.json is unreadable: resuming without checking" in capsys.readouterr().err


def adapter_gap(a: dict, b: dict) -> float:
    """The largest difference between two adapters' tensors (safetensors dicts with the same keys)."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def straight_and_resumed(
    tmp_path: Path, run: Callable[[Path, list[str]], None], every: int, resume_at: int, steps: int
) -> tuple[dict, dict, float]:
    """A straight run saving a checkpoint every `every` steps, and a run resumed from its checkpoint at step
    `resume_at` alone (with the recipe.yaml a run stopped there leaves): each one's losses by step, and the
    largest difference between their adapters."""
    from safetensors.torch import load_file

    a, b = tmp_path / "straight", tmp_path / "resumed"
    args = ["--max_steps", str(steps), "--save_strategy", "steps", "--save_steps", str(every)]
    args += ["--save_total_limit", str(steps), "--train_sampling_strategy", "group_by_length"]
    run(a, args)
    b.mkdir()
    shutil.copytree(a / f"checkpoint-{resume_at}", b / f"checkpoint-{resume_at}")
    shutil.copy(a / "recipe.yaml", b / "recipe.yaml")
    run(b, args)
    losses = []
    for d in (a, b):
        history = json.loads((d / "trainer_state.json").read_text())["log_history"]
        losses.append({h["step"]: h["loss"] for h in history if "loss" in h})
    wa, wb = (load_file(d / "adapter_model.safetensors") for d in (a, b))
    return losses[0], losses[1], adapter_gap(wa, wb)


def test_a_resume_inside_an_epoch_trains_what_the_straight_run_trained(tmp_path: Path, capsys) -> None:
    """Length-grouped order (the recipes' default): the resumed epoch's batches are the straight run's. With
    transformers' own sampler the permutation was drawn again from another RNG state (adapters 0.004
    apart)."""

    def run(out: Path, args: list[str]) -> None:
        assert main(smoke_args(out, *args)) == 0

    # 12 fixture examples in batches of 2: 6 steps an epoch; step 8 is inside the second epoch
    straight, resumed, apart = straight_and_resumed(tmp_path, run, every=4, resume_at=8, steps=10)
    assert f"resuming from {tmp_path / 'resumed' / 'checkpoint-8'}" in capsys.readouterr().err
    assert resumed == straight and apart == 0


@pytest.mark.slow
def test_a_resume_inside_an_epoch_on_two_processes(tmp_path: Path) -> None:
    """The same on two CPU processes, where accelerate's dataloader, after a resume's skip, does not pass the
    epoch on to the sampler: resumed and straight adapters were 0.01 apart before the sampler read the epoch
    from the trainer's state."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run(out: Path, args: list[str]) -> None:
        cmd = [sys.executable, *TORCHRUN, *smoke_args(out, *args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    # 12 examples, 2 per process: 3 steps an epoch; step 4 is inside the second epoch
    straight, resumed, apart = straight_and_resumed(tmp_path, run, every=2, resume_at=4, steps=6)
    assert resumed == straight and apart == 0


# --------------------------------------------------------------------------- token-budgeted micro-batches


def test_plan_micro_batches_fills_the_budget_with_the_fewest_passes() -> None:
    from finqa_trl.train import plan_micro_batches

    lengths = [100, 700, 300, 650, 120, 90, 500, 310]

    def cost(group: list[int]) -> int:  # rows x the longest row padded to 64
        return len(group) * -(-max(lengths[i] for i in group) // 64) * 64

    groups = plan_micro_batches(lengths, 1536, 64)
    assert sorted(i for g in groups for i in g) == list(range(8))  # every row once
    assert all(cost(g) <= 1536 for g in groups)
    # the fewest that fit: two passes of four rows cannot hold them (4 x 704 tokens), three can (the two
    # longest rows, then 3 x 512, then 3 x 128)
    assert [len(g) for g in groups] == [2, 3, 3] and groups[0] == [1, 3] and groups[1] == [6, 7, 2]
    assert len(plan_micro_batches(lengths, 10**6, 64)) == 1  # everything in one pass
    # near-equal sizes, the smaller micro-batches taking the longest rows
    assert [len(g) for g in plan_micro_batches(lengths, 10**6, 64, parts=5)] == [1, 1, 2, 2, 2]
    assert len(plan_micro_batches(lengths, 10**6, 64, parts=20)) == 8  # at most one per row
    assert plan_micro_batches([5000, 10], 1000, 64) == [[0], [1]]  # a row over the budget goes alone
    # mixed lengths (random order, an epoch's first step): the long row's micro-batch takes short rows along,
    # and the other short rows share one; near-equal counts (4 x 4) would need twice the passes
    assert plan_micro_batches([3000] + [100] * 15, 4 * 3008, 64) == [[0, 1, 2, 3], list(range(4, 16))]


def test_plan_micro_batches_is_never_beaten_by_any_grouping() -> None:
    # Against every way of grouping up to 6 rows: no grouping within the budget has fewer micro-batches, each
    # planned one fits (or is a single row), and an agreed larger count splits without leaving the budget.
    import random

    from finqa_trl.train import plan_micro_batches

    def groupings(rows: list[int]):
        if not rows:
            yield []
            return
        for rest in groupings(rows[1:]):
            for k in range(len(rest)):
                yield [*rest[:k], [rows[0], *rest[k]], *rest[k + 1 :]]
            yield [[rows[0]], *rest]

    def fits(group: list[int], lengths: list[int], budget: int) -> bool:
        return len(group) == 1 or len(group) * -(-max(lengths[i] for i in group) // 64) * 64 <= budget

    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 3000) for _ in range(rng.randint(1, 6))]
        budget = rng.randint(64, 9000)
        plan = plan_micro_batches(lengths, budget, 64)
        best = min(
            len(g) for g in groupings(list(range(len(lengths)))) if all(fits(x, lengths, budget) for x in g)
        )
        assert len(plan) == best and all(fits(g, lengths, budget) for g in plan)
        agreed = plan_micro_batches(lengths, budget, 64, parts=best + 2)
        assert len(agreed) == min(best + 2, len(lengths)) and all(fits(g, lengths, budget) for g in agreed)
        assert sorted(i for g in agreed for i in g) == list(range(len(lengths)))


def test_a_micro_batch_keeps_no_reference_to_the_batch() -> None:
    # The rows of a pass are views/copies made per step; nothing may hold on to them (a cache here once kept
    # every step's batch alive on the GPU)
    import gc
    import weakref

    import torch

    from finqa_trl.train import _rows

    batch = torch.arange(24).reshape(4, 6)
    part = _rows(batch, torch.tensor([2, 0]), 4, 6, 3)
    assert part.tolist() == [[12, 13, 14], [0, 1, 2]]
    gone = weakref.ref(batch), weakref.ref(part)
    del batch, part
    gc.collect()
    assert all(ref() is None for ref in gone)


@pytest.mark.parametrize("sampling", ["group_by_length", "random"])
def test_micro_batch_tokens_trains_the_steps_of_fixed_micro_batches_in_fewer_passes(
    sampling, tmp_path
) -> None:
    # Each step's 2 x 4 examples load as one batch and run in passes of at most N padded tokens: the same
    # examples per step and the same loss (TRL divides by the trained tokens of the whole step), so without
    # dropout the losses and the adapter match fixed micro-batches to float rounding. 1536 (2 x the fixture's
    # longest example padded to 64: auto's budget until 2026-11-27) regroups these 8 rows into the fixed run's
    # pairs: bit for bit. auto's budget is plain TRL's worst batch (2 x the longest example, unpadded), so the
    # padded longest example cannot share its pass.
    import torch
    from safetensors.torch import load_file

    from finqa_trl.train import prepare

    runs = {}
    for budget in ("false", "auto", "auto:0.7", "auto:1e-9", "1536", "1000", "100000"):
        out = tmp_path / budget
        args = ["--max_steps", "3", "--gradient_accumulation_steps", "4", "--lora_dropout", "0"]
        run = parse(
            smoke_args(out, *args, "--train_sampling_strategy", sampling, "--micro_batch_tokens", budget)
        )
        trainer = prepare(run).trainer
        passes: list = []
        trainer.model.register_forward_pre_hook(
            lambda m, a, kw, passes=passes: passes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        trainer.train()
        trainer.save_model(str(out))
        history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[budget] = history, load_file(out / "adapter_model.safetensors"), passes, trainer
    fixed, auto, pairs, small, whole = (runs[b] for b in ("false", "auto", "1536", "1000", "100000"))
    assert fixed[3].micro_batch_tokens is None and (fixed[3].args.per_device_train_batch_size, 4) == (2, 4)
    assert whole[3].args.per_device_train_batch_size == 8 and whole[3].args.gradient_accumulation_steps == 1
    longest = max(len(ids) for ids in auto[3].train_dataset["input_ids"])
    assert 704 < longest < 768  # padded to 768: the padding lengthens it
    assert auto[3].micro_batch_tokens == 2 * longest
    assert all(rows * width <= 2 * longest for rows, width in auto[2])
    assert {rows for rows, width in auto[2] if width == 768} == {1}  # the longest example's pass
    # auto:F: a fraction of auto's budget (here below two rows of 704, so every pass holds one row)
    part = runs["auto:0.7"]
    assert part[3].micro_batch_tokens == int(0.7 * 2 * longest) < 2 * 704
    assert all(rows * width <= int(0.7 * 2 * longest) for rows, width in part[2])
    assert part[3].passes == len(part[2]) > auto[3].passes
    assert len(part[0]) == 3 and part[0] == pytest.approx(fixed[0], rel=1e-5)
    # a fraction that rounds to 0 tokens: the smallest budget (a pass per row), not none (one pass per step)
    tiny = runs["auto:1e-9"]
    assert tiny[3].micro_batch_tokens == 1 and {rows for rows, width in tiny[2]} == {1}
    # 12 examples an epoch: steps of 8, 4 (the epoch's rest) and 8 examples, in passes of 2 rows or in one
    assert len(fixed[2]) == 4 + 2 + 4 and len(whole[2]) == 3
    assert (whole[3].passes, pairs[3].passes, small[3].passes) == (3, 10, len(small[2]))  # as counted
    assert auto[3].passes == len(auto[2]) > pairs[3].passes
    assert all(rows * width <= 1000 for rows, width in small[2]) and 3 < len(small[2])
    for budget in (auto, pairs, small, whole):
        assert len(budget[0]) == 3 and budget[0] == pytest.approx(fixed[0], rel=1e-5)
        assert adapter_gap(budget[1], fixed[1]) < 1e-4
    if sampling == "group_by_length":
        assert all(torch.equal(pairs[1][k], fixed[1][k]) for k in fixed[1])


def test_prepare_leaves_the_parsed_run_as_it_was_so_a_second_prepare_plans_the_same(tmp_path) -> None:
    # Token passes load each step's examples as one batch: the trainer gets the batch size times the
    # accumulation and an accumulation of 1, on a copy. Were the parsed Run rewritten, a caller that prepares
    # it twice would read that batch as the fixed one the second time: a 4x budget.
    from finqa_trl.train import prepare

    run = parse(smoke_args(tmp_path, "--gradient_accumulation_steps", "4", "--micro_batch_tokens", "auto"))
    parsed = (run.training.per_device_train_batch_size, run.training.gradient_accumulation_steps)
    first, second = prepare(run), prepare(run)
    assert (run.training.per_device_train_batch_size, run.training.gradient_accumulation_steps) == parsed
    for prepared in (first, second):
        args = prepared.trainer.args
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (parsed[0] * 4, 1)
        assert prepared.run.training is not run.training and prepared.run.script is run.script
    assert first.trainer.micro_batch_tokens == second.trainer.micro_batch_tokens > 0


def test_micro_batch_tokens_settings(monkeypatch) -> None:
    from finqa_trl.train import _validate, micro_batch_tokens

    def setting(*extra: str, recipe: str = "lora-1b"):
        run = parse(["--config", f"recipes/{recipe}.yaml", *extra])
        _validate(run)
        return micro_batch_tokens(run.script, run.training)

    auto = ("--micro_batch_tokens", "auto")
    assert parse(["--config", "recipes/lora-1b.yaml"]).resolved["micro_batch_tokens"] == "auto"  # recipes
    assert setting() == "auto" and setting(*auto) == "auto"
    # the QDoRA recipes: a fraction of auto's budget (their compiled layers keep more per token)
    assert setting(recipe="qdora-3b") == "auto:0.92" and setting("--micro_batch_tokens", "auto:1") == "auto:1"
    assert setting(recipe="smoke") is None  # no accumulation there: nothing to regroup
    assert setting("--micro_batch_tokens", "false") is None
    assert setting("--micro_batch_tokens", "9000") == 9000
    assert setting(*auto, "--gradient_accumulation_steps", "1") is None  # nothing to regroup
    for bad in ("0", "-5", "lots", "auto:0", "auto:1.5", "auto:", "auto:half", "auto:nan"):
        with pytest.raises(
            UsageError, match=r"micro_batch_tokens must be auto, auto:F \(0 < F <= 1\), false"
        ):
            setting("--micro_batch_tokens", bad)
    with pytest.raises(UsageError, match="does not apply with padding_free or packing"):
        setting("--micro_batch_tokens", "9000", "--padding_free", "true")
    assert setting("--auto_find_batch_size", "true") is None  # it would halve each step's examples instead
    with pytest.raises(UsageError, match="auto_find_batch_size would halve the examples of each step"):
        setting("--micro_batch_tokens", "9000", "--auto_find_batch_size", "true")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` with an FSDP config sets it
    assert setting(*auto) is None and setting("--micro_batch_tokens", "auto:0.5") is None  # FSDP: fixed
    with pytest.raises(UsageError, match="--micro_batch_tokens N is for one GPU or DDP"):
        setting("--micro_batch_tokens", "9000")


def test_merge_writes_a_standalone_bf16_model(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(smoke_args(out, "--max_steps", "1", "--merge")) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.dtype == torch.bfloat16 and (out / "merged" / "tokenizer.json").is_file()
    assert yaml.safe_load((out / "merged" / "recipe.yaml").read_text())["recipe"] == "smoke"
    # the same function as base + adapter, up to bf16 rounding
    base, tok = modeling.load(modeling.SMOKE_MODEL, dtype="float32")
    ref = PeftModel.from_pretrained(base, str(out)).eval()
    ids = tok("net revenue grew 5% in 2019", return_tensors="pt")
    with torch.no_grad():
        got, want = merged.float()(**ids).logits, ref(**ids).logits
    assert (got - want).abs().max() < 0.03 * want.abs().max()


def test_hub_push_each_epoch_and_final(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--push_to_hub + --hub_model_id: one push per epoch (its checkpoint) and one of the final adapter."""
    from huggingface_hub import HfApi

    calls: list[tuple[str, str, str]] = []
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, ""))
    )
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, **kw: calls.append(("folder", Path(kw["folder_path"]).name, kw["commit_message"])),
    )
    monkeypatch.setattr(
        HfApi, "upload_file", lambda self, **kw: calls.append(("file", kw["path_in_repo"], ""))
    )
    out = tmp_path / "run"
    args = ["--config", "recipes/smoke.yaml", "--data_dir", str(FIXTURE_DIR), "--output_dir", str(out)]
    args += ["--max_train_samples", "4", "--per_device_train_batch_size", "4", "--num_train_epochs", "2"]
    assert main([*args, "--push_to_hub", "true", "--hub_model_id", "me/finqa-smoke"]) == 0
    folders = [c for c in calls if c[0] == "folder"]
    assert calls[0] == ("create", "me/finqa-smoke", "")
    assert folders == [
        ("folder", "checkpoint-1", "epoch 1 (step 1)"),
        ("folder", "checkpoint-2", "epoch 2 (step 2)"),
        ("folder", "run", "final adapter"),
    ]
    assert ("file", "recipe.yaml", "") in calls  # beside each epoch's adapter
    assert yaml.safe_load((out / "recipe.yaml").read_text())["push_to_hub"] is True


# ------------------------------------------------------------------------------------------ labels


def test_completion_only_labels_on_a_real_finqa_example(
    sample_dir: Path, llama3_tokenizer, tmp_path: Path
) -> None:
    """TRL's own tokenization + collation: every prompt token is -100; exactly the program tokens and the
    <|eot_id|> after them are trained; padding is <|finetune_right_pad_id|> (128004) and never trained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finqa_trl.train import build_dataset, build_trainer, load_records, parse

    tok = llama3_tokenizer
    modeling.configure_padding(tok)
    assert (tok.pad_token_id, tok.convert_tokens_to_ids(modeling.end_of_turn_token(tok))) == (
        LLAMA3_PAD,
        LLAMA3_EOT,
    )
    run = parse(
        ["--config", "recipes/lora-1b.yaml", "--data_dir", str(sample_dir), "--output_dir", str(tmp_path)]
    )
    records = load_records(run.script.data_dir, ["train"], 4)
    dataset = build_dataset(run.script, records, tok)
    tiny = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(tiny)
    modeling.sync_special_tokens(model, tok)
    trainer = build_trainer(run, model, tok, dataset)

    rows = [trainer.train_dataset[i] for i in range(len(records))]
    for row, rec, formatted in zip(rows, records, dataset, strict=True):
        ids, labels = row["input_ids"], row["labels"]
        prompt = tok.apply_chat_template(formatted["prompt"], add_generation_prompt=True)["input_ids"]
        assert ids[: len(prompt)] == prompt
        assert all(label == -100 for label in labels[: len(prompt)])  # system, question, context, header
        trained = labels[len(prompt) :]
        assert trained == ids[len(prompt) :] and -100 not in trained
        program = rec["qa"]["program"]
        assert trained == tok(program, add_special_tokens=False)["input_ids"] + [LLAMA3_EOT]
        assert tok.decode(trained) == program + "<|eot_id|>"

    batch = trainer.data_collator(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1  # some rows really are padded
    for i, n in enumerate(lengths):
        assert torch.all(batch["input_ids"][i, n:] == LLAMA3_PAD)
        assert torch.all(batch["labels"][i, n:] == -100) and torch.all(batch["attention_mask"][i, n:] == 0)
        assert batch["labels"][i, n - 1] == LLAMA3_EOT  # the end-of-turn token is a training target
        assert int((batch["labels"][i] == LLAMA3_EOT).sum()) == 1


# ------------------------------------------------------------------------------------------ modeling


def test_padding_for_chatml_tokenizers() -> None:
    """SmolLM2-style (ChatML) tokenizers pad with <|endoftext|>, not their end-of-turn <|im_end|>."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b"])}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")),
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template="{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    )
    modeling.configure_padding(tok)
    assert modeling.end_of_turn_token(tok) == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_smoke_model_is_built_once_and_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = modeling.build_smoke_model()
    assert modeling.build_smoke_model() == first  # cached
    monkeypatch.setenv("FINQA_TRL_CACHE", str(tmp_path))
    again = modeling.build_smoke_model()
    assert again != first and again.name == first.name
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    model, tok = modeling.load(modeling.SMOKE_MODEL)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.eos_token == "<|eot_id|>"
    assert "<|start_header_id|>assistant<|end_header_id|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )


def _export_gguf(model_dir: Path, out: Path) -> Path:
    """Write a Llama model + byte-level BPE tokenizer as an F32 GGUF file, as llama.cpp's converter does."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    c, sd = model.config, model.state_dict()
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    added = {t["id"]: t["content"] for t in tok_json["added_tokens"]}
    tokens = [added.get(i, t) for t, i in sorted(tok_json["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_add_bos_token(True)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    w.add_chat_template(modeling.LLAMA3_CHAT_TEMPLATE)

    def rope_permute(t: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's q/k layout
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(c.num_hidden_layers):
        for hf, name in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                t = rope_permute(t, c.num_attention_heads if name == "attn_q" else c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gguf_source_loads_dequantized_trains_and_merges(tmp_path: Path, capsys) -> None:
    """A .gguf file loads as a plain (trainable, saveable) model equal to the original; LoRA and QLoRA train
    on it, and --merge rebuilds the base from the GGUF."""
    import torch

    gguf_file = _export_gguf(modeling.build_smoke_model(), tmp_path / "smoke.gguf")
    ref, ref_tok = modeling.load(modeling.SMOKE_MODEL, dtype="float32")
    model, tok = modeling.load(str(gguf_file), dtype="float32")
    assert getattr(model, "hf_quantizer", None) is None  # dequantized: no GGUF quantizer left
    assert tok.pad_token == "<|finetune_right_pad_id|>" and modeling.end_of_turn_token(tok) == "<|eot_id|>"
    text = "what was the change in net revenue from 2018 to 2019?"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    ids = ref_tok(text, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, ref(**ids).logits, atol=1e-5)

    out = tmp_path / "lora"
    assert main(smoke_args(out, "--model_name_or_path", str(gguf_file), "--max_steps", "1", "--merge")) == 0
    assert (out / "merged" / "model.safetensors").is_file()
    out = tmp_path / "qlora"
    assert (
        main(
            smoke_args(
                out, "--model_name_or_path", str(gguf_file), "--max_steps", "1", "--load_in_4bit", "true"
            )
        )
        == 0
    )
    assert "4-bit nf4 linear layers" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad input


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_unknown_recipe(tmp_path: Path, capsys) -> None:
    assert main(["--config", "recipes/qlora-7b.yaml", "--output_dir", str(tmp_path / "o")]) == 2
    line = one_line_error(capsys)
    assert "unknown recipe 'qlora-7b'" in line and "available: dora-1b, dora-3b" in line and "smoke" in line
    assert not (tmp_path / "o").exists()


def test_misspelled_yaml_key(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text(f"base: {ROOT / 'recipes' / 'smoke.yaml'}\nlora_rank: 8\n")
    assert main(["--config", str(bad), "--output_dir", str(tmp_path / "o")]) == 2
    line = one_line_error(capsys)
    assert "unknown setting 'lora_rank'" in line and "mine.yaml" in line and "did you mean" in line
    assert not (tmp_path / "o").exists()


def test_unknown_command_line_option(tmp_path: Path, capsys) -> None:
    assert main(smoke_args(tmp_path / "o", "--lora_rank", "8")) == 2
    assert "unknown option --lora_rank" in one_line_error(capsys)
    assert main(smoke_args(tmp_path / "o", "--learning_rate", "fast")) == 2
    assert "invalid float value: 'fast'" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_missing_data_dir(tmp_path: Path, capsys) -> None:
    args = smoke_args(tmp_path / "o")
    args[args.index("--data_dir") + 1] = str(tmp_path / "nowhere")
    assert main(args) == 2
    line = one_line_error(capsys)
    assert "nowhere" in line and "does not exist" in line and "make data" in line
    assert not (tmp_path / "o").exists()


def test_4bit_without_bitsandbytes(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import peft  # noqa: F401 - imported (with its bitsandbytes parts) before bitsandbytes "disappears"
    import trl  # noqa: F401

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    assert main(smoke_args(tmp_path / "o", "--load_in_4bit", "true")) == 2
    line = one_line_error(capsys)
    assert "needs bitsandbytes" in line and "lora/dora recipe" in line
    assert not (tmp_path / "o").exists()


def test_output_dir_of_another_recipe_is_refused(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text(
        yaml.safe_dump({"recipe": "qdora-3b", "model_name_or_path": "m", "use_dora": True})
    )
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    (out / "checkpoint-9").mkdir()
    before = snapshot(out)
    assert main(smoke_args(out)) == 2
    line = one_line_error(capsys)
    assert f"output_dir {out} holds a run of recipe 'qdora-3b'" in line and "--overwrite_output_dir" in line
    assert snapshot(out) == before  # nothing overwritten

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "README.md").write_text("not a run")
    assert main(smoke_args(stranger)) == 2
    assert "is not empty and holds no recipe.yaml" in one_line_error(capsys)
    assert snapshot(stranger) == {"README.md": hashlib.sha256(b"not a run").hexdigest()}

    # the escape hatch: start over there (the other run's checkpoints go, so nothing resumes from them, and
    # its training log goes, so that an interrupted new run is never reported with the old run's curve)
    for log in ("trainer_state.json", "train_results.json", "all_results.json"):
        (out / log).write_text('{"global_step": 999, "log_history": [{"step": 999, "loss": 9.9}]}')
    with monkeypatch.context() as m:
        m.setattr("trl.SFTTrainer.train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            main(smoke_args(out, "--max_steps", "1", "--overwrite_output_dir", "true"))
    assert not any(
        (out / log).exists() for log in ("trainer_state.json", "train_results.json", "all_results.json")
    )
    assert main(smoke_args(out, "--max_steps", "1", "--overwrite_output_dir", "true")) == 0
    assert not (out / "checkpoint-9").exists() and (out / "checkpoint-1").is_dir()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["recipe"] == "smoke"


def test_a_resume_never_switches_precision(tmp_path: Path) -> None:
    # Every saved recipe records the precision settings; one saved before they were recorded ran with the
    # default of its time (4-bit: fp32 upcast on), so resuming it under the new default is refused.
    from finqa_trl.train import PRECISION, UsageError, check_output_dir, parse

    out = tmp_path / "run"
    out.mkdir()

    def saved_without_precision(*extra: str) -> None:
        resolved = parse(smoke_args(out, *extra)).resolved
        assert set(PRECISION) <= set(resolved)  # recorded in every run's recipe.yaml
        old = {k: v for k, v in resolved.items() if k not in PRECISION}
        (out / "recipe.yaml").write_text(yaml.safe_dump(old))

    saved_without_precision(*Q4)
    with pytest.raises(UsageError, match=r"differs \(kbit_fp32_upcast: True -> False\)"):
        check_output_dir(out, parse(smoke_args(out, *Q4)).resolved, overwrite=False)
    check_output_dir(out, parse(smoke_args(out, *Q4, "--kbit_fp32_upcast", "true")).resolved, overwrite=False)
    saved_without_precision()  # a 16-bit run: the 4-bit setting means nothing there, the adapters' dtype does
    check_output_dir(out, parse(smoke_args(out)).resolved, overwrite=False)
    with pytest.raises(UsageError, match=r"adapters_in_compute_dtype: False -> True"):
        check_output_dir(out, parse(smoke_args(out, "--adapters_in_compute_dtype", "true")).resolved, False)


@pytest.mark.parametrize("method", [[], ["--use_dora", "true"]], ids=["qlora", "qdora"])
def test_a_resumed_4bit_run_keeps_its_bf16_adapters(method: list[str], tmp_path: Path) -> None:
    # TRL keeps LoRA A/B of a 4-bit base in bf16 (the DoRA magnitude in fp32); resuming reloads the adapter
    # through PEFT, which casts it to fp32 on load. The resumed run must train on in the dtypes it started
    # with, its optimizer state too.
    from transformers import TrainerCallback

    from finqa_trl.train import parse, prepare

    seen: dict[int, set[tuple[str, str, str]]] = {}

    class Dtypes(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            kinds = {n: "magnitude" if "magnitude" in n else "lora" for n, _ in model.named_parameters()}
            seen[state.global_step] = {
                (kinds[n], str(p.dtype), str(optimizer.state[p]["exp_avg"].dtype))
                for n, p in model.named_parameters()
                if p.requires_grad
            }

    def train(steps: int) -> str | None:
        args = [*Q4, *method, "--dtype", "bfloat16", "--max_steps", str(steps), "--save_steps", "1",
                "--save_strategy", "steps"]  # fmt: skip
        prepared = prepare(parse(smoke_args(tmp_path / "o", *args)))
        prepared.trainer.add_callback(Dtypes())
        prepared.trainer.train(resume_from_checkpoint=prepared.resume)
        return prepared.resume

    assert train(1) is None
    assert train(2) == str(tmp_path / "o" / "checkpoint-1")
    expected = {("lora", "torch.bfloat16", "torch.bfloat16")}
    if method:
        expected.add(("magnitude", "torch.float32", "torch.float32"))
    assert seen == {1: expected, 2: expected}


def test_push_to_hub_needs_a_repo_id(tmp_path: Path, capsys) -> None:
    assert main(smoke_args(tmp_path / "o", "--push_to_hub", "true")) == 2
    assert "push_to_hub needs --hub_model_id" in one_line_error(capsys)


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch):
    """Sets what `accelerate launch` exports for an FSDP/DeepSpeed config; SFTConfig then builds a DeepSpeed
    plugin, which registers a process-wide ZeRO-3 flag in transformers: cleared afterwards."""
    yield lambda **env: [monkeypatch.setenv(k, v) for k, v in env.items()]
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


FSDP = {"ACCELERATE_USE_FSDP": "true"}
ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
Q4 = ["--load_in_4bit", "true"]


@pytest.mark.parametrize(
    "env, extra, expected",
    [
        (FSDP, [*Q4, "--bnb_4bit_quant_storage", "bfloat16"], "set --bnb_4bit_quant_storage float32"),
        (
            FSDP,
            [*Q4, "--bnb_4bit_quant_storage", "bfloat16", "--dtype", "float16"],
            "float16 (it is bfloat16)",
        ),
        ({**ZERO3, "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}, Q4, "set zero3_init_flag: true"),
        (ZERO3, ["--load_in_8bit", "true"], "bitsandbytes issue #1451"),
        (FSDP, [*Q4, "--use_dora", "true"], "QDoRA) under FSDP fails at the first optimizer step"),
    ],
    ids=["fsdp-storage-vs-fp32", "fsdp-storage-vs-fp16", "zero3-init-off", "8bit", "fsdp-qdora"],
)
def test_sharded_quantization_traps_stop_at_launch(
    env: dict[str, str], extra: list[str], expected: str, tmp_path: Path, capsys, launched
) -> None:
    launched(**env)
    assert main(smoke_args(tmp_path / "o", *extra)) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "env, extra",
    [
        (FSDP, [*Q4, "--bnb_4bit_quant_storage", "float32"]),  # smoke computes in fp32
        (FSDP, Q4),  # unset: the model is stored in the compute dtype
        ({**ZERO3, "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, Q4),
        (ZERO3, [*Q4, "--use_dora", "true"]),  # QDoRA under ZeRO-3 (init on by default for stage 3): allowed
        ({**ZERO3, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}, Q4),
        ({}, [*Q4, "--bnb_4bit_quant_storage", "bfloat16"]),  # one process / DDP: no constraint
    ],
    ids=["fsdp-fp32-storage", "fsdp-unset", "zero3-init-on", "zero3-qdora", "zero2", "ddp"],
)
def test_sharded_quantization_settings_that_work_pass(
    env: dict[str, str], extra: list[str], launched
) -> None:
    from finqa_trl.train import _validate, parse

    launched(**env)
    _validate(parse(smoke_args(Path("unused"), *extra)))  # raises UsageError on a trap


@pytest.mark.parametrize("stage", ["2", "3"])
def test_dora_under_deepspeed_in_bf16_stops_at_launch(stage, launched, tmp_path, capsys) -> None:
    from finqa_trl.train import _validate, parse

    launched(**{**ZERO3, "ACCELERATE_DEEPSPEED_ZERO_STAGE": stage})
    bf16 = ["--bf16", "true", "--dtype", "bfloat16"]
    for extra in ([*Q4, "--use_dora", "true"], ["--use_dora", "true"]):  # QDoRA, and DoRA on a bf16 base
        assert main(smoke_args(tmp_path / "o", *extra, *bf16)) == 2
        line = one_line_error(capsys)
        assert "DoRA under DeepSpeed in bf16 does not train like one GPU" in line
        assert "multi_gpu (DDP)" in line
        assert not (tmp_path / "o").exists()
    _validate(parse(smoke_args(Path("unused"), *Q4, *bf16)))  # QLoRA: no magnitude vector
    _validate(parse(smoke_args(Path("unused"), *Q4, "--use_dora", "true")))  # fp32: nothing is cast


def test_dora_in_bf16_without_deepspeed_passes() -> None:
    from finqa_trl.train import _validate, parse

    # one process / DDP keep the magnitude in fp32
    bf16 = ["--bf16", "true", "--dtype", "bfloat16"]
    _validate(parse(smoke_args(Path("unused"), *Q4, "--use_dora", "true", *bf16)))


def test_fsdp_launch_applies_the_adapter_key_fix(launched, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FSDP, train.py makes PEFT find the adapter's weights (tests/test_fsdp.py: else it saves none)."""
    import finqa_trl.train as train_module

    class Applied(Exception):
        pass

    def applied() -> None:
        raise Applied

    monkeypatch.setattr(train_module, "fsdp_safe_adapter_keys", applied)
    launched(**FSDP)
    with pytest.raises(Applied):
        train_module.prepare(train_module.parse(smoke_args(Path("unused"))))


@pytest.mark.parametrize(("missing", "reads"), [("all", "holds 0 of the 28"), ("one", "holds 27 of the 28")])
def test_an_adapter_saved_short_is_one_line_and_kept(
    missing: str, reads: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A run that trained but saved an adapter without some or all of its weights (PEFT under FSDP saved
    none) fails instead of leaving `make eval` to score the bare base or untrained layers; what it saved stays
    for inspection. The smoke model: 2 layers x 7 linears x LoRA A and B = 28 trainable tensors."""
    from finqa_trl import modeling

    real = modeling.saved_adapter_tensors
    monkeypatch.setattr(
        "finqa_trl.train.saved_adapter_tensors", lambda d: 0 if missing == "all" else real(d) - 1
    )
    out = tmp_path / "o"
    assert main(smoke_args(out)) == 1
    assert reads in one_line_error(capsys)
    assert real(out) == 28  # what the run saved, whole: the check counts what it trained
    assert (out / "adapter_config.json").is_file() and (out / "train_results.json").is_file()


def test_single_process_uses_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a launcher, one process would see every GPU and Trainer would wrap the model in DataParallel
    (which SFTTrainer refuses): main() pins it to the first GPU, unless the user or a launcher decided."""
    from finqa_trl.train import _one_gpu_unless_launched

    for env, expected in (({}, "0"), ({"CUDA_VISIBLE_DEVICES": "3"}, "3"), ({"WORLD_SIZE": "2"}, None)):
        for key in ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        _one_gpu_unless_launched()
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == expected, env


def test_missing_config(capsys) -> None:
    assert main(["--learning_rate", "1e-4"]) == 2
    assert "--config recipes/NAME.yaml is required" in one_line_error(capsys)


# ------------------------------------------------------------------------------------------ distributed


ACCELERATE = ["-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_ddp.yaml"]


@pytest.mark.parametrize(
    "launcher, extra",
    [
        (TORCHRUN, []),
        # what `make train ACCELERATE_CONFIG=cpu_ddp NUM_GPUS=2` runs
        ([*ACCELERATE, "--num_processes", "2", "-m", "finqa_trl.train"], []),
        # DDP around compiled layer bodies: what compile_layers and compile_scope auto do on several GPUs
        (TORCHRUN, ["--compile_layers", "true"]),
        # each step's 2 x 2 examples per process in token-budgeted passes, as many on both processes
        (TORCHRUN, ["--gradient_accumulation_steps", "2", "--micro_batch_tokens", "1408"]),
        # QLoRA: DDP around a 4-bit (NF4) base, whose frozen quantized weights it must leave alone
        (TORCHRUN, ["--load_in_4bit", "true"]),
        # what the QDoRA recipes run on several GPUs: compiled parts, passes of 0.92 x auto's budget
        (
            TORCHRUN,
            ["--load_in_4bit", "true", "--use_dora", "true", "--compile_layers", "true"]
            + ["--gradient_accumulation_steps", "2", "--micro_batch_tokens", "auto:0.92"],
        ),
    ],
    ids=[
        "torchrun",
        "accelerate-cpu_ddp",
        "torchrun-compiled",
        "torchrun-micro-batch-tokens",
        "torchrun-qlora",
        "torchrun-qdora-compiled",
    ],
)
def test_two_process_cpu_run(launcher: list[str], extra: list[str], tmp_path: Path) -> None:
    """Two CPU processes (gloo): one process group of 2, the data sharded, one adapter saved; under torchrun
    the group freed by the time main() returns."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, *smoke_args(out, *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    if "--load_in_4bit" in extra:  # what the run loaded (rank 0 logs it)
        method = "QDoRA" if "--use_dora" in extra else "QLoRA"
        assert f"{method} of" in proc.stderr and "(4-bit nf4 linear layers" in proc.stderr
    if "auto:0.92" in extra:
        assert "compiling the parts of 2 decoder layers" in proc.stderr
    assert proc.stderr.count("adapter, tokenizer, recipe.yaml and the training log saved") == 1  # rank 0 only
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    # 2 steps x 2 examples x 2 processes = 8 of the 12 fixture examples: the data is sharded, not repeated
    # (accumulating 2: steps of 8 and of the epoch's other 4, one epoch)
    epoch = 1.0 if "--micro_batch_tokens" in extra else 8 / 12
    assert state["global_step"] == 2 and abs(state["epoch"] - epoch) < 1e-6
    assert (out / "adapter_model.safetensors").is_file()
    # The run's training log, written once: the final state and the summary metrics
    final = json.loads((out / "trainer_state.json").read_text())
    assert final["global_step"] == 2 and final["log_history"][-1]["train_runtime"] > 0
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_runtime"] > 0 and results["liger_kernel"] is False  # what ran (no GPU here)
    assert results["compile_layers"] is ("--compile_layers" in extra)
    # compile_scope auto: LoRA's layers compile as bodies, DoRA's as parts
    scope = None if "--compile_layers" not in extra else "parts" if "--use_dora" in extra else "body"
    assert results["compile_scope"] == scope
    # the recipes' lean_recompute auto: on around DDP where the layers compile over a 16-bit base (both MLPs)
    assert results["lean_recompute"] == (2 if extra == ["--compile_layers", "true"] else 0)
    # auto:0.92: 0.92 x 2 rows x the fixture's longest example (711 tokens)
    budget = {"1408": 1408, "auto:0.92": 1308}
    assert results["micro_batch_tokens"] == next((budget[a] for a in extra if a in budget), None)
    if "--micro_batch_tokens" in extra:  # the processes ran as many passes (they must: see below), > 1 a step
        passes = results["micro_batch_passes"]
        assert len(passes) == 2 and passes[0] == passes[1] > 2


def test_micro_batch_tokens_on_two_processes_trains_as_fixed_micro_batches(tmp_path: Path) -> None:
    """Under DDP each process loads its share of a step as one batch (process 0 the step's first 4 examples
    rather than micro-batches 0 and 2): the same examples per step, and the loss divided by the trained tokens
    of all processes either way, so without dropout the adapters match. A budget of 1,408 tokens (2 x 704)
    splits the first step's batches into 3 passes on process 0 (its longest example pads to 768) and 2 on
    process 1, which then runs 3 as well: they must agree. One step: at an epoch's
    end accelerate completes the processes' last batches with examples from the epoch's start, and batches of
    4 need other completions than batches of 2 (12 examples: 4 repeated against none here)."""
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    adapters = {}
    for budget in ("false", "1408"):
        out = tmp_path / budget
        args = ["--max_steps", "1", "--gradient_accumulation_steps", "2", "--lora_dropout", "0"]
        args += ["--micro_batch_tokens", budget]
        cmd = [sys.executable, *TORCHRUN, *smoke_args(out, *args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        adapters[budget] = load_file(out / "adapter_model.safetensors")
    # 3 passes on both: process 1's 2 raised to process 0's (without the agreement the run hangs)
    assert json.loads((out / "train_results.json").read_text())["micro_batch_passes"] == [3, 3]
    fixed, budgeted = adapters["false"], adapters["1408"]
    assert adapter_gap(budgeted, fixed) < 1e-4


def test_a_run_failing_while_loading_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path, capsys):
    out = tmp_path / "run"
    # eg_k is part of a run's identity; 50 shots cannot be drawn from the 12-example fixture.
    assert main(["--config", "recipes/smoke.yaml", "--output_dir", str(out), "--eg_k", "50"]) == 2
    assert not (out / "recipe.yaml").exists()
    capsys.readouterr()
    assert main(["--config", "recipes/smoke.yaml", "--output_dir", str(out), "--max_steps", "1"]) == 0
    assert (out / "recipe.yaml").is_file()


def test_recorded_recipe_keeps_the_recipes_precision_and_drops_one_off_flags():
    run = parse(["--config", "recipes/lora-1b.yaml", "--overwrite_output_dir", "true"])
    assert run.training.bf16 is False and run.training.use_cpu is True  # this CPU's fallback is applied...
    assert run.resolved["bf16"] is True and run.resolved["dtype"] == "bfloat16"  # ...but not recorded
    assert run.resolved["use_cpu"] is False
    assert "overwrite_output_dir" not in run.resolved
    # A q-recipe leaves the 4-bit storage dtype unset, so it follows the compute dtype wherever that ends up:
    # fp32 here (not bf16 embeddings and norms under fp32 compute), or whatever --dtype says.
    from finqa_trl.modeling import load_model, resolve_source

    q = parse(["--config", "recipes/qlora-1b.yaml"])
    assert q.model.dtype == "float32" and q.model.bnb_4bit_quant_storage is None
    half = parse(["--config", "recipes/qlora-1b.yaml", "--dtype", "float16"])
    assert half.model.bnb_4bit_quant_storage is None
    model = load_model(resolve_source("builtin:smoke-llama"), dtype=q.model.dtype, load_in_4bit=True)
    assert {str(p.dtype) for p in model.parameters()} == {"torch.float32"}  # packed 4-bit storage included


@pytest.mark.parametrize("flag, adapters", [("false", "float32"), ("true", "bfloat16")])
def test_adapters_in_compute_dtype_puts_lora_weights_in_bf16_but_keeps_the_dora_magnitude_fp32(
    flag, adapters, tmp_path
) -> None:
    # PEFT's default for a 16-bit base is fp32 adapters; the lever keeps them in the compute dtype, as TRL
    # does for a 4-bit base, except the DoRA magnitude, whose updates bf16 would lose.
    from finqa_trl.train import parse, prepare

    args = smoke_args(tmp_path / "o", "--dtype", "bfloat16", "--use_dora", "true", "--max_steps", "1")
    trainer = prepare(parse([*args, "--adapters_in_compute_dtype", flag])).trainer
    trainer.train()  # an optimizer step with these weights, and they keep their dtype
    model = trainer.model
    trained = {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.requires_grad}
    lora = {d for n, d in trained.items() if "lora_A" in n or "lora_B" in n}
    assert lora == {adapters}
    assert {d for n, d in trained.items() if "lora_magnitude_vector" in n} == {"float32"}
    assert str(model.get_input_embeddings().weight.dtype) == "torch.bfloat16"  # the base is untouched
    assert trainer.state.global_step == 1


def test_adapter_input_cast_false_keeps_fp32_adapters_and_the_same_loss_and_gradients(tmp_path) -> None:
    # The lever's claim: under bf16 autocast the adapter matmuls run in bf16 whether or not PEFT first copies
    # the input to fp32, so without dropout the loss and every gradient are bit for bit the same, and the
    # adapters stay fp32. A bf16 GPU is faked by setting bf16 after parsing; the CPU has no bf16 training
    # (the Trainer would not autocast here), so one forward + backward runs under CPU autocast instead.
    import torch

    from finqa_trl.train import prepare

    results = {}
    for cast in (True, False):
        run = parse(smoke_args(tmp_path / str(cast), "--dtype", "bfloat16", "--lora_dropout", "0"))
        run.training.bf16 = True
        run.script.adapter_input_cast = str(cast).lower()
        _check_precision_options(run)  # accepted: fp32 adapters of a bf16 base under bf16
        trainer = prepare(run).trainer
        model = trainer.model
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert {layer.cast_input_dtype_enabled for layer in layers} == {cast}
        seen: set = set()  # the dtype each adapter receives: fp32 (PEFT's copy) by default, bf16 without it

        def record(module, args, seen=seen):
            seen.add(args[0].dtype)

        hooks = [layer.lora_A["default"].register_forward_pre_hook(record) for layer in layers]
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        for hook in hooks:
            hook.remove()
        assert seen == {torch.float32 if cast else torch.bfloat16}
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert {p.dtype for p in trained.values()} == {torch.float32}
        results[cast] = loss.item(), {n: p.grad for n, p in trained.items()}
    assert results[True][0] == results[False][0]
    assert all(torch.equal(results[True][1][n], g) for n, g in results[False][1].items())


def _bf16_base_fp32_lora(dropout: float, input_cast: bool = False) -> Any:
    """A tiny Llama as the 16-bit LoRA recipes train it: bf16 base, fp32 adapters (B not zero), PEFT's input
    cast off (or on: its adapters then receive fp32 inputs), the non-reentrant checkpoint."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16), lora)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = input_cast
    model.activation_checkpointing_enable({"use_reentrant": False})
    return model.train()


def _autocast_steps(model: Any, ids: Any, device: str = "cpu") -> tuple[list[float], dict[str, Any]]:
    """Three AdamW steps under bf16 autocast, each with its own dropout seed: the losses, and the last step's
    gradients (also scripts/gpu/check_weight_copies.py's, on a GPU)."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(3):
        opt.zero_grad()
        torch.manual_seed(5 + step)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return losses, grads


@pytest.mark.parametrize(
    "compiled, input_cast",
    [(None, False), (None, True), ("body", False)],
    ids=["eager", "input_cast", "body"],
)
def test_adapter_weight_copies_train_as_autocasts_cast_does(compiled: str | None, input_cast: bool) -> None:
    # Three optimizer steps under bf16 autocast, each adapter computed from its bf16 copy (refreshed at each
    # forward, so after each step) or from autocast's cast at each use: the same losses and gradients bit for
    # bit, dropout included, eager (PEFT's input cast off or on) and compiled as bodies (one graph, no graph
    # break, as without the copies). The copies stay out of the state dict and out of DDP's buffer
    # broadcasts; a call of the base model alone refreshes them too (generate's way).
    import torch
    from torch._dynamo.utils import counters

    from finqa_trl.modeling import compile_decoder_layers, shadow_adapter_weights

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))

    def run(copies: bool) -> tuple[list[float], dict[str, torch.Tensor], list[str]]:
        torch._dynamo.reset()
        counters.clear()
        model = _bf16_base_fp32_lora(dropout=0.2, input_cast=input_cast)
        if copies:
            assert shadow_adapter_weights(model, torch.bfloat16) == 2 * 7 * 2
            shadows = [n for n, _ in model.named_buffers() if n.endswith("weight_shadow")]
            assert len(shadows) == 2 * 7 * 2 and model._ddp_params_and_buffers_to_ignore == shadows
        if compiled:
            assert compile_decoder_layers(model, scope=compiled) == 2
        losses, grads = _autocast_steps(model, ids)
        assert {g.dtype for g in grads.values()} == {torch.float32}
        if compiled:
            assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
        if copies:  # the last step changed the weights: the base model's own forward refreshes the copies
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                model.get_base_model()(input_ids=ids)
            lin = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]
            assert torch.equal(lin.weight_shadow, lin.weight.detach().to(torch.bfloat16))
        return losses, grads, list(model.state_dict())

    losses, grads, keys = run(copies=False)
    copied_losses, copied_grads, copied_keys = run(copies=True)
    assert copied_keys == keys and len(grads) == 2 * 7 * 2
    assert copied_losses == losses
    assert all(torch.equal(grads[k], copied_grads[k]) for k in grads)


def test_adapter_weight_copies_reach_the_trainers_model_and_refuse_where_nothing_is_cast(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import torch

    from finqa_trl.train import prepare

    results = {}
    for copies in (False, True):
        argv = ["--dtype", "bfloat16", *(["--adapter_weight_copies", "true"] if copies else [])]
        run = parse(smoke_args(tmp_path / str(copies), *argv))
        run.training.bf16 = True  # a bf16 GPU faked (as the input cast's test does): autocast below
        _check_precision_options(run)
        prepared = prepare(run)
        assert prepared.weight_copies == (2 * 7 * 2 if copies else 0)
        model = prepared.trainer.model
        batch = next(iter(prepared.trainer.get_train_dataloader()))
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        results[copies] = loss.item(), {n: p.grad for n, p in trained.items()}
    assert results[True][0] == results[False][0]
    assert all(torch.equal(results[True][1][n], g) for n, g in results[False][1].items())
    # refused in one line where autocast casts no adapter weight, for DoRA and under FSDP
    assert main(smoke_args(tmp_path / "o", "--adapter_weight_copies", "true")) == 2  # no bf16 on the CPU
    assert "--adapter_weight_copies true applies to fp32 adapters of a bf16 base" in one_line_error(capsys)
    dora = parse(smoke_args(tmp_path / "d", "--dtype", "bfloat16", "--adapter_weight_copies", "true"))
    dora.training.bf16, dora.model.use_dora = True, True
    with pytest.raises(UsageError, match="is for plain LoRA adapters"):
        _check_precision_options(dora)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    sharded = parse(smoke_args(tmp_path / "f", "--dtype", "bfloat16", "--adapter_weight_copies", "true"))
    sharded.training.bf16 = True
    with pytest.raises(UsageError, match="is for one GPU or DDP"):
        _check_precision_options(sharded)


@pytest.mark.parametrize("upcast, expected", [("true", "float32"), ("false", "bfloat16")])
def test_kbit_fp32_upcast_decides_the_dtype_of_the_unquantized_weights(upcast, expected, tmp_path) -> None:
    # PEFT's k-bit preparation casts embeddings, norms and LM head to fp32 (hidden states then run in fp32);
    # without it they stay in the compute dtype, as plain TRL leaves them. Adapters are TRL's business.
    from finqa_trl.train import parse, prepare

    run = parse(smoke_args(tmp_path / "o", *Q4, "--dtype", "bfloat16", "--kbit_fp32_upcast", upcast))
    model = prepare(run).trainer.model
    unquantized = {
        str(p.dtype).removeprefix("torch.")
        for n, p in model.named_parameters()
        if "lora_" not in n and type(p).__name__ != "Params4bit"  # adapters; packed 4-bit storage
    }
    assert unquantized == {expected}
    assert str(model.get_input_embeddings().weight.dtype) == f"torch.{expected}"


def test_liger_kernels_where_installed_on_a_gpu_not_on_4bit_bases(monkeypatch: pytest.MonkeyPatch) -> None:
    import finqa_trl.modeling as m
    from finqa_trl.train import UsageError

    # The 16-bit recipes say auto: with no GPU (CI) that is off; the record keeps `auto` for another machine
    run = parse(["--config", "recipes/lora-1b.yaml"])
    assert run.script.liger_kernel == "auto" and not run.training.use_liger_kernel
    assert run.resolved["liger_kernel"] == "auto"
    with pytest.raises(UsageError, match=r"--liger_kernel true needs"):
        parse(["--config", "recipes/lora-1b.yaml", "--liger_kernel", "true"])
    # TRL's own flag still works where the recipe says false (QDoRA) or says nothing (smoke)
    assert parse(
        ["--config", "recipes/qdora-1b.yaml", "--use_liger_kernel", "true"]
    ).training.use_liger_kernel
    assert parse(["--config", "recipes/smoke.yaml", "--use_liger_kernel", "true"]).training.use_liger_kernel
    # A GPU with liger-kernel installed: the recipes compile the layers (one process), and inductor fuses what
    # Liger would, so auto leaves them off; --liger_kernel true still asks for them
    monkeypatch.setattr(m, "cuda_available", lambda: True)
    monkeypatch.setattr(m, "triton_gpu_ready", lambda: True)
    monkeypatch.setattr(m, "liger_installed", lambda: True)
    lora = ["--config", "recipes/lora-1b.yaml"]
    assert not parse(lora).training.use_liger_kernel
    assert parse([*lora, "--liger_kernel", "true"]).training.use_liger_kernel
    # Eager layers: on for LoRA and DoRA, off for QLoRA and QDoRA (measured slower there)
    eager = ["--compile_layers", "false"]
    assert parse([*lora, *eager]).training.use_liger_kernel
    assert parse(["--config", "recipes/dora-3b.yaml", *eager]).training.use_liger_kernel
    assert not parse(["--config", "recipes/qlora-3b.yaml", *eager]).training.use_liger_kernel
    off = parse([*lora, *eager, "--liger_kernel", "false"])
    assert not off.training.use_liger_kernel
    assert not parse(["--config", "recipes/qdora-1b.yaml", *eager]).training.use_liger_kernel
    assert not parse(["--config", "recipes/lora-1b.yaml", "--use_cpu", "true"]).training.use_liger_kernel
    monkeypatch.setattr(m, "liger_installed", lambda: False)
    assert not parse(["--config", "recipes/lora-1b.yaml"]).training.use_liger_kernel
    with pytest.raises(UsageError, match="pip install liger-kernel"):
        parse(["--config", "recipes/lora-1b.yaml", "--liger_kernel", "true"])


def test_stock_modeling_code_puts_back_what_a_patch_rebinds() -> None:
    from transformers.models.llama import modeling_llama

    rope, norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    with modeling.stock_modeling_code():
        modeling_llama.apply_rotary_pos_emb = lambda *a: a  # what Liger's apply does to the module
        modeling_llama.LlamaRMSNorm = object
    assert modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaRMSNorm is norm


def test_precision_options_that_would_do_nothing_are_one_line(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(smoke_args(tmp_path / "o", "--kbit_fp32_upcast", "true")) == 2  # a 16-bit base
    assert "--kbit_fp32_upcast true applies to 4-bit bases" in one_line_error(capsys)
    assert main(smoke_args(tmp_path / "o", *Q4, "--adapters_in_compute_dtype", "true")) == 2
    assert "TRL already keeps the adapters of a 4-bit base" in one_line_error(capsys)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with the fsdp config exports
    assert main(smoke_args(tmp_path / "o", "--adapters_in_compute_dtype", "true")) == 2
    assert "does nothing under FSDP" in one_line_error(capsys)
    assert main(smoke_args(tmp_path / "o", "--adapter_input_cast", "false")) == 2  # no bf16 on the CPU
    assert "--adapter_input_cast false applies to fp32 adapters of a bf16 base" in one_line_error(capsys)
    bf16 = ["--dtype", "bfloat16", "--adapter_input_cast", "false"]  # the smoke recipe's base is fp32
    run = parse(smoke_args(tmp_path / "o", *bf16))
    run.training.bf16 = True  # as on a bf16 GPU: FSDP computes the adapters in bf16 itself
    with pytest.raises(UsageError, match="is for one GPU or DDP"):
        _check_precision_options(run)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    # no cast to skip: the adapters already have the input's dtype, or there is no adapter
    run = parse(smoke_args(tmp_path / "o", *bf16, "--dtype", "auto"))  # Llama 3.2's own dtype: bf16
    run.training.bf16 = True
    _check_precision_options(run)
    no_cast = (Q4, ["--adapters_in_compute_dtype", "true"], ["--dtype", "float32"], ["--use_peft", "false"])
    for extra in no_cast:
        run = parse(smoke_args(tmp_path / "o", *bf16, *extra))
        run.training.bf16 = True
        with pytest.raises(UsageError, match="here there is no such cast"):
            _check_precision_options(run)
    assert not (tmp_path / "o").exists()


def test_a_padding_multiple_that_is_not_a_positive_integer_is_one_line(tmp_path: Path, capsys) -> None:
    # The recipes pad to multiples of 64; a negative multiple once broke the collator mid-training.
    assert main(smoke_args(tmp_path / "o", "--pad_to_multiple_of", "-3")) == 2
    assert one_line_error(capsys) == "error: pad_to_multiple_of must be positive (or none), got -3"
    # Not a number: SFTConfig's own conversion said only "invalid literal for int()", naming no option
    for bad in (["--pad_to_multiple_of", "abc"], ["--pad_to_multiple_of=6x4"]):
        assert main(smoke_args(tmp_path / "o", *bad)) == 2
        assert "error: pad_to_multiple_of must be a positive integer or none, got '" in one_line_error(capsys)
    assert (
        parse(smoke_args(tmp_path / "o", "--pad_to_multiple_of", "none")).training.pad_to_multiple_of is None
    )
    assert not (tmp_path / "o").exists()


def test_the_recipes_skip_the_input_cast_only_where_it_applies(tmp_path: Path, monkeypatch) -> None:
    # `adapter_input_cast: auto` (the recipes): off for LoRA's fp32 adapters of a bf16 base under bf16 on one
    # GPU or DDP, PEFT's copy kept elsewhere (a CPU run, a 4-bit base, FSDP/DeepSpeed, DoRA), never refused.
    from finqa_trl.train import skips_input_cast

    for recipe in ("lora-1b", "dora-3b", "qlora-1b", "smollm2-135m-qdora"):
        assert parse(["--config", f"recipes/{recipe}.yaml"]).script.adapter_input_cast == "auto"

    def resolved(*extra: str, bf16: bool = True):
        run = parse(smoke_args(tmp_path / "o", "--dtype", "bfloat16", "--adapter_input_cast", "auto", *extra))
        run.training.bf16 = bf16  # as on a bf16 GPU
        _check_precision_options(run)  # auto is never refused
        return skips_input_cast(run)

    assert resolved()
    assert not resolved(bf16=False)  # no autocast, e.g. a CPU run: nothing to skip
    assert not resolved(*Q4)
    assert not resolved("--adapters_in_compute_dtype", "true")
    assert not resolved("--use_dora", "true")  # DoRA keeps the cast under auto (its forward would change)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not resolved()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    # and prepare() acts on it: PEFT's own per-layer switch, off on every adapted layer
    from finqa_trl.train import prepare

    run = parse(smoke_args(tmp_path / "p", "--dtype", "bfloat16", "--adapter_input_cast", "auto"))
    run.training.bf16 = True
    layers = [m for m in prepare(run).trainer.model.modules() if hasattr(m, "lora_A")]
    assert layers and {layer.cast_input_dtype_enabled for layer in layers} == {False}
    with pytest.raises(UsageError, match="invalid choice: 'sometimes'"):
        parse(smoke_args(tmp_path / "o", "--adapter_input_cast", "sometimes"))
    run = parse(smoke_args(tmp_path / "o"))
    run.script.adapter_input_cast = False  # a YAML `false` may reach the dataclass as a bool: read as "false"
    with pytest.raises(UsageError, match="--adapter_input_cast false applies to fp32 adapters"):
        _check_precision_options(run)  # (and refused here: no bf16 on the CPU)
    run.script.adapter_input_cast = "sometimes"  # set by code, past the parser's choices
    with pytest.raises(UsageError, match="adapter_input_cast must be auto, true or false"):
        _check_precision_options(run)


@pytest.mark.parametrize("method", [[], ["--use_dora", "true"]], ids=["lora", "dora"])
def test_compile_layers_trains_as_eager_with_shared_graphs_and_the_same_saved_adapter(
    method, tmp_path
) -> None:
    # Regional compilation: the attention, MLP and norms of each decoder layer compiled in place, activation
    # checkpointing eager around them. Without dropout the compiled run logs the eager run's losses (to float
    # rounding) and saves the same adapter keys; both layers and all the lengths met share the graphs of the
    # three parts (a first length, then the length dynamic; with the padding mask, attention once more for a
    # batch without padding, where sdpa gets no mask). The eager run compiles nothing. DoRA too: its base
    # weight read without PEFT's class checks (traceable_dora_weights), no graph breaks (32 without).
    import torch
    from torch._dynamo.utils import counters

    graphs, runs, breaks = {}, {}, {}
    # LoRA also with inductor's C++ wrapper (the kernels launched from C++) and compiled as whole layers
    # (their checkpoint inside the graph); both methods with each layer's body one graph beneath its eager
    # checkpoint: the same losses
    for compiled in ("false", "true", "body", *(["cpp-wrapper", "layer"] if not method else [])):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / compiled
        args = ["--lora_dropout", "0", "--pad_to_multiple_of", "none", "--max_steps", "4", *method]
        how = ["--compile_layers", compiled]
        # the compiled parts with sdpa's padding mask too (the recipes run causal only)
        if compiled == "true":
            how += ["--causal_attention", "false", "--compile_scope", "parts"]
        if compiled == "cpp-wrapper":
            how = ["--compile_layers", "true", "--compile_mode", compiled, "--compile_scope", "parts"]
        if compiled in ("layer", "body"):
            how = ["--compile_layers", "true", "--compile_scope", compiled]
        assert main(smoke_args(out, *args, *how)) == 0
        graphs[compiled] = counters["stats"]["unique_graphs"]
        breaks[compiled] = list(counters["graph_break"])
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        runs[compiled] = [h["loss"] for h in history if "loss" in h], adapter_keys(out)
    assert graphs["false"] == 0 and 3 <= graphs["true"] <= 7
    results = {c: json.loads((tmp_path / c / "train_results.json").read_text()) for c in runs}
    assert results["true"]["compile_layers"] is True and results["true"]["compile_mode"] == "default"
    assert results["false"]["compile_layers"] is False and results["false"]["compile_mode"] is None
    (eager, eager_keys), (fused, fused_keys) = runs["false"], runs["true"]
    assert len(eager) == len(fused) == 4
    assert fused == pytest.approx(eager, rel=1e-4)
    assert fused_keys == eager_keys
    assert results["true"]["compile_scope"] == "parts" and results["false"]["compile_scope"] is None
    # one graph per layer call at a first length, then the length dynamic (the parts: 3 of each); no
    # graph break but lean_recompute's (LoRA: the frozen down projection outside the graph splits each
    # body, a graph before it, and the resumed rest of the MLP and of the layer after it)
    assert results["body"]["compile_scope"] == "body" and all("_lean_down" in b for b in breaks["body"])
    assert bool(breaks["body"]) == (results["body"]["lean_recompute"] > 0)
    assert 1 <= graphs["body"] <= (6 if breaks["body"] else 3)
    assert runs["body"][0] == pytest.approx(eager, rel=1e-4)
    assert runs["body"][1] == eager_keys
    if "layer" in runs:
        # one graph per layer call at a first length, then the length dynamic (the parts: 3 of each)
        assert results["layer"]["compile_scope"] == "layer" and 1 <= graphs["layer"] <= 3
        assert runs["layer"][0] == pytest.approx(eager, rel=1e-4)
        assert runs["layer"][1] == eager_keys
    if "cpp-wrapper" in runs:
        assert results["cpp-wrapper"]["compile_mode"] == "cpp-wrapper" and graphs["cpp-wrapper"] >= 3
        assert runs["cpp-wrapper"][0] == pytest.approx(eager, rel=1e-4)
        assert runs["cpp-wrapper"][1] == eager_keys


@pytest.mark.parametrize("base", ["plain", "nf4", "nf4-nested", "fp4-nested"], ids=lambda b: b)
def test_dora_base_weight_is_peft_own_weight_bit_for_bit_and_traces_without_breaks(base: str) -> None:
    # The function PEFT's DoRA is pointed at returns exactly what PEFT's dequantize_module_weight returns,
    # for a 16-bit base and 4-bit ones (the recipes quantize nested NF4); marking twice changes nothing
    # (PEFT's own function stays the fallback: no recursion); an unmarked layer goes to PEFT's function; and
    # a DoRA layer then traces with no graph break and gives eager's output.
    import bitsandbytes as bnb
    import peft.tuners.lora.dora as peft_dora
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils.integrations import dequantize_module_weight as peft_weight
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False)
    if base != "plain":
        quant, nested = base.split("-")[0], base.endswith("nested")
        four = bnb.nn.Linear4bit(
            128, 64, bias=False, compute_dtype=torch.float32, compress_statistics=nested, quant_type=quant
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, compress_statistics=nested, quant_type=quant
        )
        four.weight = weight._quantize("cpu")
        linear = four
    model = get_peft_model(
        torch.nn.Sequential(linear),
        LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False),
    )
    layer = model.base_model.model[0]
    x = torch.randn(3, 128)
    with torch.no_grad():
        eager = layer(x).clone()
    assert modeling.traceable_dora_weights(model) == modeling.traceable_dora_weights(model) == 1
    assert peft_dora.dequantize_module_weight is modeling._dora_base_weight
    assert modeling._PEFT_DORA_WEIGHT is peft_weight  # the fallback is PEFT's own, after marking twice
    marked = layer.get_base_layer()
    assert getattr(marked, modeling._DORA_BASE) == ("weight" if base == "plain" else "4bit")
    assert torch.equal(modeling._dora_base_weight(marked), peft_weight(marked))
    unmarked = torch.nn.Linear(8, 4)
    assert modeling._dora_base_weight(unmarked) is peft_weight(unmarked) is unmarked.weight
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, backend="eager")(x), eager)
    assert sum(counters["graph_break"].values()) == 0


def test_compiled_dora_on_a_4bit_base_traces_whole_and_computes_what_eager_computes(tmp_path) -> None:
    # DoRA on a 4-bit base: PEFT reads the base weight through checks of its class and a `.data` of the 4-bit
    # parameter, which broke the compiled parts into 51 graphs here (32 graph breaks). With the base layers
    # marked, the parts compile into LoRA's few graphs with no break, and eager runs the same numbers with or
    # without the marks. The smoke QDoRA keeps bf16 adapters on the CPU: inductor rounds DoRA's bf16 sums once
    # where eager rounds each op (6e-4 apart at the first step), so the compiled run is held to eager's
    # rounding with inductor's emulate_precision_casts.
    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    qdora = ["--use_dora", "true", "--load_in_4bit", "true", "--lora_dropout", "0", "--max_steps", "3"]
    qdora += ["--pad_to_multiple_of", "none", "--logging_steps", "1"]
    losses, graphs, breaks = {}, {}, {}
    for run in ("eager", "marked", "compiled"):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / run
        args = smoke_args(out, *qdora, "--compile_layers", "false" if run == "eager" else "true")
        # "marked": the layers compiled (so marked), but every compiled call run eager
        stance = torch.compiler.set_stance("force_eager" if run == "marked" else "default")
        with inductor_config.patch(emulate_precision_casts=True), stance:
            assert main(args) == 0
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        losses[run] = [h["loss"] for h in history if "loss" in h]
        graphs[run] = counters["stats"]["unique_graphs"]
        breaks[run] = sum(counters["graph_break"].values())
    assert len(losses["eager"]) == 3 and losses["marked"] == losses["eager"]
    assert graphs["eager"] == graphs["marked"] == 0
    assert 3 <= graphs["compiled"] <= 7 and breaks["compiled"] == 0
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


def test_compile_layers_auto_compiles_on_one_gpu_or_ddp_and_refuses_true_under_fsdp(monkeypatch) -> None:
    import finqa_trl.modeling as m
    from finqa_trl.train import UsageError, _validate, compiles_layers

    def compiles(*extra: str, recipe: str = "lora-1b") -> bool:
        run = parse(["--config", f"recipes/{recipe}.yaml", *extra])
        return compiles_layers(run.script, run.training)

    assert parse(["--config", "recipes/lora-1b.yaml"]).resolved["compile_layers"] == "auto"
    assert not compiles()  # no GPU here (CI): eager, as make demo runs
    assert compiles("--compile_layers", "true")  # asked for: the CPU compiles too
    # a compile mode where nothing compiles would do nothing: refused in one line; fine where layers compile
    graphs = ["--config", "recipes/lora-1b.yaml", "--compile_mode", "reduce-overhead"]
    with pytest.raises(
        UsageError, match="--compile_mode reduce-overhead applies where the layers are compiled"
    ):
        _validate(parse(graphs))
    _validate(parse([*graphs, "--compile_layers", "true"]))
    monkeypatch.setattr(m, "cuda_available", lambda: True)
    monkeypatch.setattr(m, "triton_gpu_ready", lambda: False)
    assert not compiles()  # a GPU Triton cannot compile for: eager rather than a failing first step
    monkeypatch.setattr(m, "triton_gpu_ready", lambda: True)
    assert compiles() and not compiles("--compile_layers", "false") and not compiles("--use_cpu", "true")
    assert compiles(recipe="dora-3b") and compiles(recipe="qlora-1b") and compiles(recipe="smollm2-135m-dora")
    # QDoRA too, since its base weights are read traceably (1.73x eager on an H200)
    assert all(compiles(recipe=r) for r in ("qdora-1b", "qdora-3b", "smollm2-135m-qdora"))
    assert not compiles("--torch_compile", "true")  # the Trainer compiles the whole model instead: not twice
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` with an FSDP config sets it
    assert not compiles()  # FSDP's hooks would be traced with the parts: auto stays eager
    with pytest.raises(UsageError, match="--compile_layers true is for one GPU or DDP"):
        _validate(parse(["--config", "recipes/lora-1b.yaml", "--compile_layers", "true"]))


def test_lora_dropout_kernel_auto_follows_compile_layers_auto(monkeypatch) -> None:
    """The same rule as compile_layers' auto (one helper): a GPU Triton compiles for, one process or DDP."""
    import finqa_trl.modeling as m
    from finqa_trl.train import fuses_lora_dropout

    def fuses(*extra: str) -> bool:
        run = parse(["--config", "recipes/lora-1b.yaml", "--lora_dropout_kernel", "auto", *extra])
        return fuses_lora_dropout(run.script, run.training)

    assert not fuses()  # no GPU here
    monkeypatch.setattr(m, "cuda_available", lambda: True)
    monkeypatch.setattr(m, "triton_gpu_ready", lambda: False)
    assert not fuses()
    monkeypatch.setattr(m, "triton_gpu_ready", lambda: True)
    assert fuses() and not fuses("--use_cpu", "true")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not fuses()


@pytest.mark.parametrize("scope", ["layer", "body"])
def test_compiled_layer_recomputes_with_the_same_dropout_masks_and_keeps_what_the_checkpoint_keeps(
    scope: str,
) -> None:
    # --compile_scope layer: the activation checkpoint goes inside the compiled layer, so the compiler, not
    # Python, recomputes the layer in the backward; body: the layer's own forward is one graph beneath the
    # eager checkpoint, which calls it again. With LoRA dropout on, the recomputation must draw the forward's
    # masks again: the gradients equal those of the same layers compiled without recomputation (which keep
    # the masks). And it keeps for the backward what the eager checkpoint keeps (each layer's inputs), not
    # the layer's activations.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finqa_trl.modeling import compile_decoder_layers

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=False,
    )  # fmt: skip
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0  # a padded row: sdpa gets a mask
    labels = ids.masked_fill(mask == 0, -100)

    def step(checkpoint: bool, scope: str | None) -> tuple[float, dict[str, torch.Tensor], int, list]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear")
        model = get_peft_model(LlamaForCausalLM(cfg), lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would hide A's gradients and the masks
                torch.nn.init.normal_(p, std=0.05)
        if checkpoint:
            model.activation_checkpointing_enable({"use_reentrant": False})
        if scope:
            assert compile_decoder_layers(model, scope=scope) == 2
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, torch.Tensor] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:  # what autograd keeps for the backward, weights aside
            if t.untyped_storage().data_ptr() not in params:
                kept[t.untyped_storage().data_ptr()] = t
            return t

        for _ in range(2):  # the second step: the compiled graphs for these inputs exist
            model.zero_grad()
            kept.clear()
            torch.manual_seed(5)  # the same dropout masks in every model's forward
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        # activations: floating tensors of at least a hidden state's size (the rest: the rotary tables, the
        # padding mask, the generator state the compiled backward replays the masks from)
        big = [t for t in kept.values() if t.is_floating_point() and t.numel() >= ids.numel() * 64]
        return loss.item(), grads, sum(t.untyped_storage().nbytes() for t in kept.values()), big

    kept_loss, kept_grads, kept_bytes, _ = step(checkpoint=False, scope=scope)
    loss, grads, nbytes, big = step(checkpoint=True, scope=scope)
    _, _, _, eager_big = step(checkpoint=True, scope=None)
    assert (
        loss == pytest.approx(kept_loss, rel=1e-6)
        and grads.keys() == kept_grads.keys()
        and len(grads) == 2 * 7 * 2
    )
    for name, grad in grads.items():
        torch.testing.assert_close(grad, kept_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert sorted(t.shape for t in big) == sorted(t.shape for t in eager_big)  # the inputs, head and logits
    assert nbytes < kept_bytes / 2  # not the layers' activations


def test_causal_attention_reads_nothing_on_the_host_and_gives_the_padding_masks_loss() -> None:
    # Right-padded rows under the causal mask alone: the padding sits after every real token, so the loss is
    # the one with the padding mask; and transformers, which builds no mask for this implementation, does not
    # read the padding mask on the host (a wait for the GPU in every pass)
    import torch
    from torch.overrides import TorchFunctionMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from finqa_trl.modeling import CAUSAL_SDPA, use_causal_attention

    class HostReads(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if getattr(func, "__name__", "") in ("item", "tolist", "__bool__", "all", "any"):
                HostReads.count += 1
            return func(*args, **(kwargs or {}))

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa", use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 12:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with HostReads():
        padded = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert HostReads.count > 0  # sdpa with the padding mask checks it on the host
    padded.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    use_causal_attention(model)
    assert model.config._attn_implementation == CAUSAL_SDPA
    HostReads.count = 0
    with HostReads():
        causal = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert HostReads.count == 0
    causal.loss.backward()
    torch.testing.assert_close(causal.loss, padded.loss)
    real = mask.bool()  # the padding positions' logits differ (they see padding), nothing reads them
    torch.testing.assert_close(causal.logits[real], padded.logits[real])
    for grad, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, grad)


def test_causal_attention_leaves_sliding_window_models_their_masks() -> None:
    # transformers builds no mask at all for the causal-only implementation, sliding windows included: such a
    # model keeps sdpa and its masks (auto logs why; true is refused in prepare)
    from transformers import MistralConfig, MistralForCausalLM

    from finqa_trl.modeling import use_causal_attention

    cfg = MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, sliding_window=16, attn_implementation="sdpa",
    )  # fmt: skip
    model = MistralForCausalLM(cfg)
    assert "sliding-window attention" in use_causal_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_causal_attention_and_defer_metrics_train_and_log_as_trl_does(tmp_path) -> None:
    # The recipes' defaults against TRL's own path (both off): the same logged loss, entropy, token accuracy
    # and token count at every log, with several passes per log (token passes of 2 x 2 examples per step); the
    # deferred metrics of every pass read once per log; auto resolves on for sdpa, on the training model
    from finqa_trl.modeling import CAUSAL_SDPA
    from finqa_trl.train import prepare

    def train(out: Path, *how: str) -> tuple[list[dict[str, float]], list[int], object]:
        args = ["--lora_dropout", "0", "--max_steps", "5", "--gradient_accumulation_steps", "2"]
        trainer = prepare(parse(smoke_args(out, *args, "--logging_steps", "2", *how))).trainer
        reads: list[int] = []
        read = trainer.read_pending_metrics

        def spy() -> None:  # how many passes' metrics each read finds
            reads.append(len(trainer.pending_metrics or []))
            read()

        trainer.read_pending_metrics = spy
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h], reads, trainer

    off, off_reads, plain = train(tmp_path / "off", "--causal_attention", "false", "--defer_metrics", "false")
    on, on_reads, deferred = train(tmp_path / "on")  # the recipe: auto, true
    assert len(on) == len(off) == 2
    for a, b in zip(on, off, strict=True):
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert set(off_reads) == {0} and plain.model.config._attn_implementation == "sdpa"
    assert deferred.model.config._attn_implementation == CAUSAL_SDPA
    # every pass read, each log after several (the last read: the end of training's summary log)
    assert sum(on_reads) == deferred.passes > 5 and max(on_reads) > 2 and deferred.pending_metrics is None


def test_defer_metrics_leaves_packed_rows_to_trl(tmp_path) -> None:
    # Packed rows (padding_free: no attention_mask) count their tokens from position_ids in TRL's own path,
    # which defer_metrics leaves them to; causal_attention auto stays off for them
    out = tmp_path / "packed"
    assert main(smoke_args(out, "--packing", "true", "--max_length", "4096")) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["num_tokens"] > 0 for h in history if "loss" in h] == [True, True]
    assert json.loads((out / "train_results.json").read_text())["causal_attention"] is False


def test_causal_attention_is_refused_where_rows_share_a_sequence_or_attention_is_not_sdpa() -> None:
    from finqa_trl.train import UsageError, _validate, causal_attention

    def resolved(*extra: str) -> bool:
        run = parse(["--config", "recipes/lora-1b.yaml", *extra])
        return causal_attention(run.script, run.training, run.model)

    assert parse(["--config", "recipes/lora-1b.yaml"]).resolved["causal_attention"] == "auto"
    assert resolved() and not resolved("--causal_attention", "false")
    assert not resolved("--attn_implementation", "eager") and not resolved("--packing", "true")
    assert not resolved("--padding_free", "true")
    with pytest.raises(UsageError, match="--causal_attention true runs sdpa's causal kernel"):
        _validate(parse(["--config", "recipes/lora-1b.yaml", "--causal_attention", "true",
                         "--attn_implementation", "eager"]))  # fmt: skip
    with pytest.raises(UsageError, match="--packing true needs --max_length N"):
        _validate(parse(["--config", "recipes/lora-1b.yaml", "--packing", "true"]))
    for rows in (["--packing", "true", "--max_length", "4096"], ["--padding_free", "true"]):
        with pytest.raises(UsageError, match="--causal_attention true is for padded rows"):
            _validate(parse(["--config", "recipes/lora-1b.yaml", "--causal_attention", "true", *rows]))


def test_compile_scope_layer_is_refused_where_it_would_do_nothing(monkeypatch) -> None:
    from finqa_trl.train import UsageError, _validate, layer_compile_scope

    # auto compiles nothing without a GPU that Triton compiles for: so here whatever machine runs the test
    monkeypatch.setattr(modeling, "triton_gpu_ready", lambda: False)

    lora = ["--config", "recipes/lora-1b.yaml", "--compile_scope", "layer"]
    with pytest.raises(UsageError, match="--compile_scope layer applies where the layers are compiled"):
        _validate(parse(lora))  # no GPU here: auto compiles nothing
    _validate(parse([*lora, "--compile_layers", "true"]))
    # a DoRA layer would run eager whole (dynamo cannot replay its dict write inside the checkpoint)
    with pytest.raises(UsageError, match="--compile_scope layer is not for DoRA"):
        _validate(parse([*lora, "--compile_layers", "true", "--use_dora", "true"]))
    # body: the checkpoint stays eager around the graph, so DoRA compiles as its parts do
    body = ["--config", "recipes/lora-1b.yaml", "--compile_scope", "body"]
    with pytest.raises(UsageError, match="--compile_scope body applies where the layers are compiled"):
        _validate(parse(body))
    _validate(parse([*body, "--compile_layers", "true", "--use_dora", "true"]))
    # a recipe's scope (qdora-1b: body) applies where its layers compile and reads as auto elsewhere (no GPU
    # here), the record keeping the recipe's value; qdora-3b keeps auto: DoRA's parts
    qdora = ["--config", "recipes/qdora-1b.yaml"]
    here = parse(qdora)
    _validate(here)
    assert (here.script.compile_scope, here.resolved["compile_scope"]) == ("auto", "body")
    compiled = parse([*qdora, "--compile_layers", "true"])
    assert layer_compile_scope(compiled) == "body" and compiled.resolved["compile_scope"] == "body"
    assert (
        layer_compile_scope(parse([*qdora, "--compile_layers", "true", "--compile_scope", "parts"]))
        == "parts"
    )
    assert (
        layer_compile_scope(parse(["--config", "recipes/qdora-3b.yaml", "--compile_layers", "true"]))
        == "parts"
    )


def test_compile_scope_auto_compiles_lora_as_bodies_and_dora_as_parts(monkeypatch, tmp_path, caplog) -> None:
    # auto (the recipes'): bodies for plain LoRA adapters on a 16-bit or 4-bit base, parts for DoRA; an
    # explicit scope as asked. It is not refused where nothing compiles (the CPU's auto): it chooses nothing.
    from finqa_trl.train import _validate, layer_compile_scope, leans_recompute

    for recipe, scope in [
        ("lora-3b", "body"),
        ("qlora-1b", "body"),
        ("dora-1b", "parts"),
        ("qdora-3b", "parts"),
    ]:
        run = parse(["--config", f"recipes/{recipe}.yaml"])
        assert run.script.compile_scope == "auto" and layer_compile_scope(run) == scope
        _validate(run)
    for scope in ("parts", "layer", "body"):
        asked = ["--config", "recipes/lora-1b.yaml", "--compile_layers", "true", "--compile_scope", scope]
        assert layer_compile_scope(parse(asked)) == scope
    run = parse(["--config", "recipes/lora-1b.yaml"])
    run.script.compile_scope = "whole"  # a YAML value skips the parser's choices
    with pytest.raises(UsageError, match="compile_scope must be auto, parts, layer or body, got 'whole'"):
        _validate(run)
    # with bodies, 1B LoRA ran faster without lean_recompute and 3B LoRA with it: lora-1b turns it off
    compiled = ["--compile_layers", "true"]
    assert not leans_recompute(parse(["--config", "recipes/lora-1b.yaml", *compiled]))
    assert leans_recompute(parse(["--config", "recipes/lora-3b.yaml", *compiled]))
    # a layer that cannot compile as a body (modeling.body_blocker: a hook's forward on it, another
    # transformers version's wrapper) compiles as parts under auto, said in the log (body, asked, refuses it)
    compile_ = ["--compile_layers", "true", "--lean_recompute", "false"]
    monkeypatch.setattr(
        "finqa_trl.train.body_blocker", lambda model: "a LlamaDecoderLayer has its own forward"
    )
    with caplog.at_level(logging.INFO, logger="finqa_trl"):
        prepared = prepare(parse(smoke_args(tmp_path / "auto", *compile_)))
    assert prepared.compile_scope == "parts" and prepared.compiled_layers == 2
    assert (
        "compile_scope auto: compiling the layers' parts, not their bodies: a LlamaDecoderLayer"
        in caplog.text
    )

    def layer_classes(prepared) -> set[bool]:  # whether each layer's class is a compiled body's
        layers = [m for m in prepared.trainer.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert len(layers) == 2
        return {getattr(type(layer), "_compiled_body", False) for layer in layers}

    assert layer_classes(prepared) == {False}
    monkeypatch.undo()
    bodies = prepare(parse(smoke_args(tmp_path / "body", *compile_)))
    assert bodies.compile_scope == "body" and layer_classes(bodies) == {True}


def test_compile_decoder_layers_passes_the_compile_mode_to_every_part(monkeypatch) -> None:
    # --compile_mode reaches torch.compile for each part of each layer (CUDA graphs exist only on a GPU, so
    # the mode itself is timed there, by the bench's cudagraphs lever); `default` leaves torch's own default
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finqa_trl.modeling import compile_decoder_layers

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
    )
    model = LlamaForCausalLM(cfg)
    seen: list[tuple[str, str | None]] = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, repr(kw)))
    )
    assert compile_decoder_layers(model, "reduce-overhead") == 2
    parts = ["LlamaAttention", "LlamaMLP", "LlamaRMSNorm", "LlamaRMSNorm"]
    assert sorted(seen) == sorted([(p, "{'mode': 'reduce-overhead'}") for p in parts] * 2)
    seen.clear()
    assert compile_decoder_layers(model) == 2 and {kw for _, kw in seen} == {"{'mode': None}"}
    seen.clear()  # an inductor option, which torch.compile takes instead of a mode
    assert compile_decoder_layers(model, "cpp-wrapper") == 2
    assert {kw for _, kw in seen} == {"{'options': {'cpp_wrapper': True}}"}
    seen.clear()  # whole layers: each layer compiled once, its parts not separately
    assert compile_decoder_layers(model, scope="layer") == 2
    assert seen == [("LlamaDecoderLayer", "{'mode': None}")] * 2


def test_a_model_with_compiled_bodies_pickles_as_its_eager_self(tmp_path: Path) -> None:
    # torch.save of the whole model: each swapped layer pickles as the class it was swapped from (pickle finds
    # classes by name, which names the original), and loads eager with the same weights and outputs. (Without
    # checkpointing: its input-grad hook, a local function, pickles with no layer swapped either.)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from finqa_trl.modeling import compile_decoder_layers, decoder_layers

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=False,
    )  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear")).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    assert compile_decoder_layers(model, scope="body") == 2
    with torch.no_grad():
        compiled = model(input_ids=ids).logits
    assert all(type(layer) is not LlamaDecoderLayer for layer in decoder_layers(model))
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert all(type(layer) is LlamaDecoderLayer for layer in decoder_layers(loaded))
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, compiled)


def test_compile_scope_body_shares_one_compiled_forward_and_refuses_layers_it_cannot_reach(
    monkeypatch,
) -> None:
    # body: every layer of a class gets one subclass (the same name, module and parameter names) whose forward
    # is the class's own forward compiled once, inside transformers' checkpointing wrapper; a second call
    # wraps nothing again. A layer class whose forward is not that wrapper is refused in one line.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from finqa_trl.modeling import ModelError, compile_decoder_layers

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
    )
    model = LlamaForCausalLM(cfg)
    names = [n for n, _ in model.named_parameters()]
    compiled: list[object] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn, kw)) or fn)
    assert compile_decoder_layers(model, "max-autotune-no-cudagraphs", scope="body") == 2
    assert compiled == [(LlamaDecoderLayer.forward.__wrapped__, {"mode": "max-autotune-no-cudagraphs"})]
    classes = {type(layer) for layer in model.model.layers}
    assert len(classes) == 1 and (cls := classes.pop()) is not LlamaDecoderLayer
    assert issubclass(cls, LlamaDecoderLayer) and cls.__name__ == "LlamaDecoderLayer"
    assert (
        cls.forward.__code__.co_name == "forward_with_checkpointing"
        and cls.forward.__wrapped__ is compiled[0][0]
    )
    assert [n for n, _ in model.named_parameters()] == names
    assert compile_decoder_layers(model, scope="body") == 2 and len(compiled) == 1

    class Unwrapped(LlamaDecoderLayer):
        pass

    Unwrapped.forward = LlamaDecoderLayer.forward.__wrapped__  # set after the class: no wrapper around it
    layer = model.model.layers[0]
    layer.__class__ = Unwrapped
    with pytest.raises(ModelError, match="--compile_scope body: Unwrapped.forward is not transformers'"):
        compile_decoder_layers(model, scope="body")
    # a forward set on the layer itself (a hook's wrapper) would hide the compiled class's
    layer.__class__ = LlamaDecoderLayer
    layer.forward = lambda *args, **kwargs: None
    with pytest.raises(ModelError, match="--compile_scope body: a LlamaDecoderLayer has its own forward"):
        compile_decoder_layers(model, scope="body")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no GPU)")
def test_lora_dropout_kernel_trains_with_the_fused_adapters_and_saves_the_same_adapter(
    tmp_path: Path,
) -> None:
    """The kernels run here in Triton's interpreter (conftest), on the smoke model's fp32 inputs; with its
    checkpointed layers the backward draws every mask a second time."""
    import torch

    from finqa_trl.lora_dropout import DropoutLoRAA

    prepared = prepare(parse(smoke_args(tmp_path / "prepared", "--lora_dropout_kernel", "true")))
    layers = [m for m in prepared.trainer.model.modules() if hasattr(m, "lora_dropout")]
    assert prepared.fused_dropouts == len(layers) == 14  # 7 adapted layers x 2 decoder layers
    for layer in layers:  # PEFT's dropout handed to A, which still holds the same weight
        assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
        assert isinstance(layer.lora_A["default"], DropoutLoRAA) and layer.lora_A["default"].dropout_p == 0.05

    fused, plain = tmp_path / "fused-run", tmp_path / "plain-run"
    assert main(smoke_args(fused, "--lora_dropout_kernel", "true")) == 0
    assert main(smoke_args(plain)) == 0
    assert adapter_keys(fused) == adapter_keys(plain)
    assert json.loads((fused / "train_results.json").read_text())["lora_dropout_kernel"] == 14
    assert json.loads((plain / "train_results.json").read_text())["lora_dropout_kernel"] == 0


def test_lora_dropout_kernel_true_without_a_gpu_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from finqa_trl import modeling

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(modeling, "cuda_available", lambda: False)
    out = tmp_path / "run"
    assert main(smoke_args(out, "--lora_dropout_kernel", "true")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "--lora_dropout_kernel true needs a CUDA GPU (its kernels are Triton kernels; auto "
        "leaves CPU runs to PEFT's dropout)"
    )
    assert not out.exists()


def _tiny_lora_llama(layers: int = 2, dropout: float = 0.2) -> object:
    """A tiny Llama with LoRA on every linear layer (B not zero: A's gradients and the masks show), trained
    under the non-reentrant activation checkpoint, as the recipes run it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(LlamaForCausalLM(cfg), lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    return model


def _two_profiled_steps(model: Any, ids: Any) -> tuple[float, dict[str, Any], int]:
    """Two steps (the second with the compiled graphs made), the same dropout seed each: the second's loss,
    its gradients and the matmuls (aten::mm/addmm, which the compiled graphs call too) it ran."""
    import torch
    from torch.profiler import profile

    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(5)
        with profile() as prof:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    mms = sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm"))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, mms


@pytest.mark.parametrize("compiled", [None, "parts", "body"], ids=["eager", "parts", "body"])
def test_lean_recompute_gives_the_same_gradients_with_one_matmul_less_per_layer(compiled: str | None) -> None:
    # Each MLP's down projection computes its adapters first and runs its frozen base layer without keeping
    # a tensor: the checkpoint's recomputation (torch's early stop) ends before that matmul. The loss and
    # every gradient are PEFT's bit for bit (the same operations, the same dropout masks), eager, with the
    # parts compiled as the recipes compile them, and with each layer's body one graph (which the frozen
    # down projection, run outside the graph, splits into three); each step runs exactly one matmul per layer
    # fewer (the profiler's count of aten::mm, which the compiled graphs call too), and never one of the
    # down weight's shape in the recomputation.
    import torch
    from torch._dynamo.utils import counters

    from finqa_trl.modeling import compile_decoder_layers, lean_mlp_recompute

    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))

    def step(lean: bool) -> tuple[float, dict[str, torch.Tensor], int]:
        torch._dynamo.reset()
        counters.clear()
        model = _tiny_lora_llama(layers=3)
        if lean:
            assert lean_mlp_recompute(model) == 3
        if compiled:
            assert compile_decoder_layers(model, scope=compiled) == 3
        result = _two_profiled_steps(model, ids)
        if compiled:  # the only break: the frozen down projection, run outside the graph
            breaks = list(counters["graph_break"])
            assert len(breaks) == (1 if lean else 0) and all("_lean_down" in b for b in breaks)
            # the three layers share their graphs: the parts' attention, MLP and norm; one body, or with
            # the frozen down projection outside it, the layer's up to the MLP, the MLP's up to the down
            # projection, and the layer's rest after it
            assert counters["stats"]["unique_graphs"] == (3 if compiled == "parts" or lean else 1)
        return result

    loss, grads, mms = step(lean=False)
    lean_loss, lean_grads, lean_mms = step(lean=True)
    assert lean_loss == loss
    assert grads.keys() == lean_grads.keys() and len(grads) == 3 * 7 * 2
    assert all(torch.equal(grads[k], lean_grads[k]) for k in grads)
    assert lean_mms == mms - 3


@pytest.mark.parametrize("compiled", [None, "parts", "body"], ids=["eager", "parts", "body"])
def test_uncheckpointed_layers_give_the_same_gradients_without_their_recomputation(
    compiled: str | None,
) -> None:
    # The trainer turns the last N layers' checkpoints off (transformers' layers read the flag at each call):
    # those layers run once per pass, not again in the backward, with the same dropout masks, so the loss and
    # every gradient are the checkpointed model's bit for bit; eager, and compiled (parts or bodies) with
    # lean_recompute (3B LoRA's recipe). Each layer left unchecked takes the same number of matmuls off.
    import torch

    from finqa_trl.modeling import compile_decoder_layers, decoder_layers, lean_mlp_recompute

    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))

    def step(uncheckpointed: int) -> tuple[float, dict[str, torch.Tensor], int]:
        torch._dynamo.reset()
        model = _tiny_lora_llama(layers=3)
        if compiled:
            assert lean_mlp_recompute(model) == 3
            assert compile_decoder_layers(model, scope=compiled) == 3
        layers = decoder_layers(model)
        for layer in layers[len(layers) - uncheckpointed :]:
            layer.gradient_checkpointing = False
        return _two_profiled_steps(model, ids)

    loss, grads, mms = step(0)
    for n in (2, 3):
        kept_loss, kept_grads, kept_mms = step(n)
        assert kept_loss == loss
        assert kept_grads.keys() == grads.keys() and len(grads) == 3 * 7 * 2
        assert all(torch.equal(grads[k], kept_grads[k]) for k in grads)
        assert kept_mms < mms
        if n == 2:
            two = mms - kept_mms
        else:
            assert 2 * (mms - kept_mms) == 3 * two  # the same matmuls off for each layer left unchecked


def test_uncheckpointed_layers_train_the_smoke_recipe_to_the_same_losses_and_refuse_what_they_cannot(
    tmp_path: Path, capsys
) -> None:
    kept, plain = tmp_path / "kept", tmp_path / "plain"
    assert main(smoke_args(kept, "--uncheckpointed_layers", "1")) == 0
    assert main(smoke_args(plain)) == 0

    def losses(out: Path) -> list[float]:
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h]

    assert losses(kept) == losses(plain) and len(losses(kept)) == 2  # dropout 0.05: the same masks
    assert json.loads((kept / "train_results.json").read_text())["uncheckpointed_layers"] == 1
    assert json.loads((plain / "train_results.json").read_text())["uncheckpointed_layers"] == 0
    # through the Trainer, which switches every layer's checkpoint on as training starts: the first layer
    # runs its MLP twice per pass (forward, recomputation), the last once
    from finqa_trl.modeling import decoder_layers

    prepared = prepare(parse(smoke_args(tmp_path / "counted", "--uncheckpointed_layers", "1")))
    first, last = decoder_layers(prepared.trainer.model)
    calls = {id(first.mlp): 0, id(last.mlp): 0}
    for layer in (first, last):
        # before the MLP runs: the recomputation stops inside it, once it has made what the backward keeps
        layer.mlp.register_forward_pre_hook(lambda m, _: calls.__setitem__(id(m), calls[id(m)] + 1))
    prepared.trainer.train()
    assert first.gradient_checkpointing and not last.gradient_checkpointing
    assert calls[id(first.mlp)] == 2 * calls[id(last.mlp)] > 0
    for extra, why in [
        (["--uncheckpointed_layers", "-1"], "uncheckpointed_layers must be 0 or more, got -1"),
        (
            ["--uncheckpointed_layers", "1", "--activation_checkpointing", "false"],
            "--uncheckpointed_layers N needs --activation_checkpointing true",
        ),
        (
            ["--uncheckpointed_layers", "1", "--compile_layers", "true", "--compile_scope", "layer"],
            "--uncheckpointed_layers N is for --compile_scope parts or body",
        ),
        (["--uncheckpointed_layers", "3"], "--uncheckpointed_layers 3: this model has 2 decoder layers"),
    ]:
        out = tmp_path / "refused"
        assert main(smoke_args(out, *extra)) == 2
        assert why in capsys.readouterr().err.strip().splitlines()[-1]
        assert not out.exists() or not any(out.iterdir())  # nothing written (the layer count: after loading)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_lean_recompute_on_a_4bit_base_matches_bitsandbytes_and_skips_what_it_cannot_take(
    compute: str,
) -> None:
    # PEFT's LoRA layer for a bitsandbytes 4-bit down projection (nested NF4, as the 4-bit recipes quantize),
    # fp32 inputs, the 4-bit layer computing in fp32 or in bf16 (its input cast, its product cast back, as
    # under --kbit_fp32_upcast true): the output, the input gradient and the adapters' gradients are those of
    # PEFT's forward over bitsandbytes' own autograd function bit for bit. DoRA, an MLP of another forward, a
    # base layer with a bias and an instance's own forward (Liger's) are left to PEFT; a merged adapter goes
    # back to LlamaMLP's forward.
    import copy

    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as Lora4bit
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from finqa_trl.modeling import lean_mlp_recompute

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    mlp = LlamaMLP(cfg)
    dtype = getattr(torch, compute)
    four = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
    four.weight = bnb.nn.Params4bit(
        mlp.down_proj.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )._quantize("cpu")
    mlp.down_proj = four
    holder = torch.nn.ModuleDict({"mlp": mlp})
    holder.is_loaded_in_4bit = True  # what PEFT reads to give a 4-bit layer its bitsandbytes LoRA layer
    lora = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    plain = get_peft_model(holder, lora)
    assert type(plain.base_model.model["mlp"].down_proj) is Lora4bit
    lean = copy.deepcopy(plain)
    assert lean_mlp_recompute(lean) == 1
    x = torch.randn(2, 5, 64)
    results = []
    for model in (plain, lean):
        xi = x.clone().requires_grad_()
        out = model.base_model.model["mlp"](xi)
        out.square().sum().backward()
        results.append((out, xi.grad, [p.grad for p in model.parameters() if p.requires_grad]))
    (out, grad, adapters), (lean_out, lean_grad, lean_adapters) = results
    assert torch.equal(out, lean_out) and torch.equal(grad, lean_grad)
    assert all(torch.equal(a, b) for a, b in zip(adapters, lean_adapters, strict=True))

    targets = ["gate_proj", "up_proj", "down_proj"]
    dora = get_peft_model(
        torch.nn.ModuleDict({"mlp": LlamaMLP(cfg)}), LoraConfig(r=4, use_dora=True, target_modules=targets)
    )
    assert lean_mlp_recompute(dora) == 0

    class OtherMLP(LlamaMLP):
        def forward(self, x):  # another computation under the same attribute names
            return self.down_proj(self.act_fn(self.gate_proj(x)))

    other = get_peft_model(
        torch.nn.ModuleDict({"mlp": OtherMLP(cfg)}), LoraConfig(r=4, target_modules=targets)
    )
    assert lean_mlp_recompute(other) == 0
    biased = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128, mlp_bias=True))
    assert (
        lean_mlp_recompute(
            get_peft_model(torch.nn.ModuleDict({"mlp": biased}), LoraConfig(r=4, target_modules=targets))
        )
        == 0
    )
    own = get_peft_model(torch.nn.ModuleDict({"mlp": LlamaMLP(cfg)}), LoraConfig(r=4, target_modules=targets))
    own.base_model.model["mlp"].forward = lambda x: x  # an instance's own forward, as Liger sets one
    assert lean_mlp_recompute(own) == 0
    merged = get_peft_model(
        torch.nn.ModuleDict({"mlp": LlamaMLP(cfg)}),
        LoraConfig(r=4, target_modules=targets, init_lora_weights=False),
    )
    assert lean_mlp_recompute(merged) == 1
    layer = merged.base_model.model["mlp"]
    before = layer(x)
    merged.merge_adapter()  # the lean forward hands a merged layer back to LlamaMLP's own forward
    assert torch.allclose(layer(x), before, atol=1e-5)


def test_lean_recompute_trains_the_smoke_recipe_to_the_same_losses_and_refuses_what_it_cannot_take(
    tmp_path: Path, capsys
) -> None:
    lean, plain = tmp_path / "lean", tmp_path / "plain"
    assert main(smoke_args(lean, "--lean_recompute", "true")) == 0
    assert main(smoke_args(plain, "--lean_recompute", "false")) == 0

    def losses(out: Path) -> list[float]:
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h]

    assert losses(lean) == losses(plain) and len(losses(lean)) == 2  # dropout 0.05: the same masks
    assert adapter_keys(lean) == adapter_keys(plain)
    four_bit = ["--load_in_4bit", "true"]  # PEFT's bitsandbytes LoRA layer over a 4-bit down projection
    assert main(smoke_args(tmp_path / "lean4", "--lean_recompute", "true", *four_bit)) == 0
    assert main(smoke_args(tmp_path / "plain4", "--lean_recompute", "false", *four_bit)) == 0
    assert losses(tmp_path / "lean4") == losses(tmp_path / "plain4")
    assert json.loads((tmp_path / "lean4" / "train_results.json").read_text())["lean_recompute"] == 2
    assert json.loads((lean / "train_results.json").read_text())["lean_recompute"] == 2
    assert json.loads((plain / "train_results.json").read_text())["lean_recompute"] == 0
    # auto: where it applies, the layers compile and the base is 16-bit (DoRA: not, and no refusal; eager:
    # not; a 4-bit base: not, though true applies there)
    auto = ["--lean_recompute", "auto", "--compile_layers", "true"]
    compiled = prepare(parse(smoke_args(tmp_path / "auto", *auto)))  # as bodies (compile_scope auto)
    assert compiled.lean_mlps == 2 and compiled.compile_scope == "body"
    assert prepare(parse(smoke_args(tmp_path / "eager", "--lean_recompute", "auto"))).lean_mlps == 0
    assert prepare(parse(smoke_args(tmp_path / "dora", *auto, "--use_dora", "true"))).lean_mlps == 0
    assert prepare(parse(smoke_args(tmp_path / "auto4", *auto, *four_bit))).lean_mlps == 0
    parts = prepare(parse(smoke_args(tmp_path / "parts", *auto, "--compile_scope", "parts")))
    assert parts.lean_mlps == 2 and parts.compile_scope == "parts"
    for extra, why in [
        (["--use_dora", "true"], "is for plain LoRA adapters: DoRA's forward reads the base weight"),
        (["--activation_checkpointing", "false"], "needs --activation_checkpointing true"),
        (
            ["--activation_checkpointing_kwargs", '{"use_reentrant": true}'],
            "needs the non-reentrant checkpoint",
        ),
        (["--compile_layers", "true", "--compile_scope", "layer"], "is for --compile_scope parts or body"),
    ]:
        out = tmp_path / "refused"
        assert main(smoke_args(out, "--lean_recompute", "true", *extra)) == 2
        assert f"--lean_recompute true {why}" in capsys.readouterr().err.strip().splitlines()[-1]
        assert not out.exists()
    # adapters that leave down_proj out: no MLP applies; true is refused (after loading the model, before any
    # training or saving), auto runs without it
    no_down = ["--lora_target_modules", "q_proj", "v_proj"]
    out = tmp_path / "no_down"
    assert main(smoke_args(out, "--lean_recompute", "true", *no_down)) == 2
    assert (
        "--lean_recompute true: no MLP of this model applies"
        in capsys.readouterr().err.strip().splitlines()[-1]
    )
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()
    assert prepare(parse(smoke_args(tmp_path / "no_down_auto", *auto, *no_down))).lean_mlps == 0


def test_lean_recompute_computes_the_base_input_gradient_after_the_recomputation(monkeypatch) -> None:
    # The base layer's input gradient (tokens x intermediate) is computed only once the checkpoint has
    # recomputed the layer: computed before it, it waits beside the recomputed layer (the first version did
    # so: 0.07 GiB more at 3b's worst step on an H200). The backward of each layer: its MLP recomputed, then
    # the gradient; and the recomputation never runs the base layer.
    import torch

    from finqa_trl import modeling

    model = _tiny_lora_llama(layers=2)
    assert modeling.lean_mlp_recompute(model) == 2
    events: list[tuple[str, int]] = []
    mlps = [layer.mlp for layer in model.base_model.model.model.layers]

    def in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    for i, mlp in enumerate(mlps):
        mlp.register_forward_pre_hook(
            lambda *_, i=i: events.append(("recompute" if in_backward() else "mlp", i))
        )
        base = mlp.down_proj.get_base_layer()
        base.register_forward_hook(lambda *_, i=i: events.append(("base", i)))
    weight = modeling._dense_weight
    owner = {id(mlp.down_proj.get_base_layer()): i for i, mlp in enumerate(mlps)}
    monkeypatch.setattr(
        modeling, "_dense_weight", lambda b, kind: events.append(("grad", owner[id(b)])) or weight(b, kind)
    )
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    forward = [("mlp", 0), ("base", 0), ("mlp", 1), ("base", 1)]
    assert events == [*forward, ("recompute", 1), ("grad", 1), ("recompute", 0), ("grad", 0)]
