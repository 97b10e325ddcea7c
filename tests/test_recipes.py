"""Recipes: every YAML in recipes/ resolves (base chain) and parses into the three TrlParser dataclasses with
the stated defaults; the `recipes` CLI lists them and rejects unknown names in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finqa_trl import recipes as R
from finqa_trl.train import FinQAArguments, UsageError, known_settings, parse

ROOT = Path(__file__).resolve().parents[1]
RECIPES = R.available()
MODELS = {
    "1b": "meta-llama/Llama-3.2-1B-Instruct",
    "3b": "meta-llama/Llama-3.2-3B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
EXPECTED = sorted(
    [f"{m}-{s}" for s in ("1b", "3b") for m in ("lora", "dora", "qlora", "qdora")]
    + [f"smollm2-135m-{m}" for m in ("lora", "dora", "qlora", "qdora")]
    + ["smoke"]
)


def test_the_recipe_set() -> None:
    assert RECIPES == EXPECTED
    assert all(not n.startswith("_") for n in RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_into_the_three_dataclasses(name: str, tmp_path: Path) -> None:
    from trl import ModelConfig, SFTConfig

    recipe = R.resolve(name)
    R.check_keys(recipe, known_settings())
    run = parse(["--config", str(ROOT / "recipes" / f"{name}.yaml"), "--output_dir", str(tmp_path)])
    script, training, model = run.script, run.training, run.model
    assert isinstance(script, FinQAArguments) and isinstance(training, SFTConfig)
    assert isinstance(model, ModelConfig)
    assert script.recipe == name and run.resolved["recipe"] == name
    v = recipe.values  # the recipe as written (CPU runs switch bf16 off at parse time)

    # LoRA everywhere: r 16, alpha 32, dropout 0.05 on all linear layers
    assert (model.use_peft, model.lora_r, model.lora_alpha, model.lora_dropout) == (True, 16, 32, 0.05)
    assert model.lora_target_modules == "all-linear"
    assert model.use_dora is ("dora" in name)
    # completion-only loss, non-reentrant checkpointing, checkpoints each epoch, hub/tracking off
    assert training.completion_only_loss is True
    assert training.activation_checkpointing is True and training.gradient_checkpointing is True
    assert training.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert str(training.save_strategy.value) == "epoch"
    assert training.push_to_hub is False and training.report_to == []
    assert training.weight_decay == 0.0
    assert script.train_splits == ["train"] and script.context == "full" and script.eg_k == 0

    if name == "smoke":
        assert model.model_name_or_path == "builtin:smoke-llama"
        assert v["dtype"] == "float32" and v["bf16"] is False
        return
    assert v["bf16"] is True and v["dtype"] == "bfloat16"
    assert training.learning_rate == 1e-4 and training.num_train_epochs == 3
    assert training.per_device_train_batch_size == 4 and training.gradient_accumulation_steps == 4
    assert training.logging_steps == 20
    quantized = name.startswith("q") or "-q" in name
    assert model.load_in_4bit is quantized
    if quantized:
        assert model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant is True
        # storage unset: the packed weights follow the compute dtype (one float dtype, for FSDP/ZeRO-3),
        # also where bf16 falls back to fp32; and no fp32 upcast of the rest
        assert "bnb_4bit_quant_storage" not in v and model.bnb_4bit_quant_storage is None
        assert script.kbit_fp32_upcast is False and v["kbit_fp32_upcast"] is False


def test_model_names_per_recipe() -> None:
    for name in RECIPES:
        model = R.resolve(name).values["model_name_or_path"]
        if name.startswith("smollm2-135m-"):
            assert model == MODELS["smollm2-135m"]
        elif name != "smoke":
            assert model == MODELS[name.split("-")[1]], name


def test_methods_and_quantization_columns() -> None:
    assert [R.resolve(n).method for n in ("lora-1b", "dora-1b", "qlora-1b", "qdora-1b")] == [
        "LoRA",
        "DoRA",
        "QLoRA",
        "QDoRA",
    ]
    assert R.resolve("qdora-3b").quantization == "4-bit NF4+DQ"
    assert R.resolve("lora-3b").quantization == "-"


# Settings one recipe alone sets, because they were timed faster for that shape alone: lora-1b runs without
# lean_recompute, which 3B LoRA keeps (machine TT, results/speed-notes.md Next 27); qdora-1b compiles bodies,
# where qdora-3b's came out 0.06 GiB above its parts (machine VV, Next 31)
TUNED_FOR_ONE_RECIPE = {"lora-1b": {"lean_recompute"}, "qdora-1b": {"compile_scope"}}


def test_shared_settings_are_written_once() -> None:
    """Per-recipe files hold only overrides; the shared defaults live in the `_` fragments."""
    for name in RECIPES:
        own = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
        assert own["base"].startswith("_")
        if name != "smoke":
            allowed = {"base", "model_name_or_path", "use_dora", *TUNED_FOR_ONE_RECIPE.get(name, ())}
            assert set(own) <= allowed, name
    assert R.resolve("lora-1b").values["lean_recompute"] is False  # the parser makes it "false"
    assert R.resolve("lora-3b").values["lean_recompute"] == "auto"
    assert R.resolve("qdora-1b").values["compile_scope"] == "body"
    assert R.resolve("qdora-3b").values["compile_scope"] == "auto"


def test_cpu_precision_fallback(capsys: pytest.CaptureFixture) -> None:
    from finqa_trl.modeling import bf16_supported
    from finqa_trl.train import _setup_logging

    if bf16_supported():
        pytest.skip("this machine has a bf16 GPU")
    _setup_logging()  # what main() does
    run = parse(["--config", "recipes/lora-1b.yaml"])
    assert run.training.bf16 is False and run.model.dtype == "float32"
    # The recorded recipe keeps the recipe's own precision: the fallback is re-derived on every run.
    assert run.resolved["bf16"] is True and run.training.output_dir == "outputs/lora-1b"
    assert "training in fp32" in capsys.readouterr().err


def test_command_line_overrides(tmp_path: Path) -> None:
    run = parse(
        [
            "--config",
            "recipes/qdora-3b.yaml",
            "--model_name_or_path",
            "/models/x",
            "--data_dir",
            str(tmp_path),
            "--learning_rate",
            "5e-5",
            "--lora_r",
            "8",
            "--train_splits",
            "train",
            "dev",
            "--merge",
        ]
    )
    assert run.model.model_name_or_path == "/models/x" and run.script.data_dir == str(tmp_path)
    assert run.training.learning_rate == 5e-5 and run.model.lora_r == 8 and run.script.merge is True
    assert run.script.train_splits == ["train", "dev"]
    assert run.resolved["learning_rate"] == 5e-5 and run.resolved["merge"] is True
    assert run.resolved["model_name_or_path"] == "/models/x" and run.method == "QDoRA"


# ------------------------------------------------------------------------------------ base chain


def _write(d: Path, name: str, data: dict | str) -> Path:
    p = d / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_chain_merges_child_over_parent(tmp_path: Path) -> None:
    _write(tmp_path, "_a.yaml", {"learning_rate": 1.0, "lora_r": 4, "seed": 1})
    _write(tmp_path, "_b.yaml", {"base": "_a.yaml", "lora_r": 8})
    _write(tmp_path, "c.yaml", {"base": "_b.yaml", "seed": 3})
    r = R.resolve("c", tmp_path)
    assert r.values == {"learning_rate": 1.0, "lora_r": 8, "seed": 3}
    assert r.sources["learning_rate"].name == "_a.yaml" and r.sources["seed"].name == "c.yaml"
    assert R.available(tmp_path) == ["c"]


@pytest.mark.parametrize(
    "files, message",
    [
        ({"c.yaml": {"base": "_x.yaml"}}, "base file _x.yaml not found"),
        ({"c.yaml": {"base": "_a.yaml"}, "_a.yaml": {"base": "c.yaml"}}, "loops"),
        ({"c.yaml": "- just\n- a list\n"}, "must be a YAML mapping"),
        ({"c.yaml": "lr: [1,\n"}, "invalid YAML"),
        ({"c.yaml": {"base": ["_a.yaml"]}}, "must be one file name"),
    ],
)
def test_chain_errors(tmp_path: Path, files: dict, message: str) -> None:
    for name, data in files.items():
        _write(tmp_path, name, data)
    with pytest.raises(R.RecipeError, match=message):
        R.resolve("c", tmp_path)


def test_unknown_and_fragment_names(tmp_path: Path) -> None:
    with pytest.raises(
        R.RecipeError, match=r"unknown recipe 'qdora-4b' \(did you mean qdora-3b\?\); available: "
    ):
        R.resolve("qdora-4b")
    with pytest.raises(R.RecipeError, match="unknown recipe '_base'"):
        R.resolve("_base")
    with pytest.raises(R.RecipeError, match="shared fragment"):
        R.resolve(ROOT / "recipes" / "_base.yaml")


def test_misspelled_key_is_named_with_its_file(tmp_path: Path) -> None:
    bad = _write(tmp_path, "mine.yaml", {"base": str(ROOT / "recipes" / "_base.yaml"), "lerning_rate": 1e-3})
    recipe = R.resolve(bad)
    with pytest.raises(
        R.RecipeError, match=r"mine.yaml: unknown setting 'lerning_rate' \(did you mean learning_rate\?\)"
    ):
        R.check_keys(recipe, known_settings())
    with pytest.raises(R.RecipeError, match="lerning_rate"):
        parse(["--config", str(bad)])


def test_unknown_command_line_option() -> None:
    with pytest.raises(UsageError, match=r"unknown option --lerning_rate \(did you mean --learning_rate\?\)"):
        parse(["--config", "recipes/lora-1b.yaml", "--lerning_rate", "1e-3"])
    with pytest.raises(UsageError, match="invalid float value"):
        parse(["--config", "recipes/lora-1b.yaml", "--learning_rate", "fast"])
    with pytest.raises(UsageError, match="--config recipes/NAME.yaml is required; available: dora-1b"):
        parse(["--learning_rate", "1e-3"])


# ------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finqa_trl.recipes", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_cli_list() -> None:
    out = _cli("list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["recipe", "model", "method", "quantization"]
    assert len(lines) == 2 + len(EXPECTED)
    assert any(line.split()[:4] == ["qdora-3b", MODELS["3b"], "QDoRA", "4-bit"] for line in lines)
    assert any(line.split()[:3] == ["smoke", "builtin:smoke-llama", "LoRA"] for line in lines)


def test_cli_check() -> None:
    assert _cli("check", "qlora-1b").returncode == 0
    out = _cli("check", "qlora-2b")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "available: dora-1b, dora-3b" in out.stderr
