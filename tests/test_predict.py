"""Inference end to end on the CPU with the smoke model: base, adapter, merged and 4-bit runs, resuming,
self-consistency voting, and the one-line errors for bad input.

One tiny adapter is trained per module through the real entry point; every prediction run generates only a
few tokens per example (the smoke model writes noise, which must count as invalid, never crash).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from finqa_trl import merge, predict
from finqa_trl.data import FIXTURE_DIR, load_split
from finqa_trl.dsl import Execution
from finqa_trl.modeling import SMOKE_MODEL

ROOT = Path(__file__).resolve().parents[1]
N_TEST = len(load_split(FIXTURE_DIR, "test"))
FAST = ["--max_new_tokens", "6", "--data_dir", str(FIXTURE_DIR)]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "smoke"
    cmd = [sys.executable, "-m", "finqa_trl.train", "--config", "recipes/smoke.yaml", "--output_dir",
           str(out), "--max_steps", "2", "--save_strategy", "no", "--data_dir", str(FIXTURE_DIR)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "recipe.yaml").is_file()
    return out


def run(*argv: str) -> int:
    return predict.main([*argv, *FAST])


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory) -> Path:
    """A finished greedy run of the smoke model on the whole test split (copy it before changing it)."""
    out = tmp_path_factory.mktemp("greedy")
    assert run("--model", SMOKE_MODEL, "--output_dir", str(out)) == 0
    return out


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, dirs_exist_ok=True)
    return dest


def snapshot(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(out.iterdir())}


def read(path: Path):
    return json.loads(path.read_text())


def check_outputs(out: Path, tag: str = "test") -> dict:
    preds = read(out / f"predictions_{tag}.json")
    metrics = read(out / f"metrics_{tag}.json")
    details = read(out / f"details_{tag}.json")
    assert len(preds) == metrics["n"] == len(details) == N_TEST
    assert {p["id"] for p in preds} == {e["id"] for e in load_split(FIXTURE_DIR, "test")}
    for p in preds:
        assert p["predicted"][-1] == "EOF" and isinstance(p["raw"], str)
    assert {"question", "gold_program", "predicted_program", "value", "gold_value", "invalid_reason"} <= set(
        details[0]
    )
    assert {"by_steps", "by_op", "examples_per_s", "generation_seconds", "quant", "eg_k", "context"} <= set(
        metrics
    )
    return metrics


# ------------------------------------------------------------------------------------------ model kinds


def test_base_model_greedy_then_self_consistency(tmp_path, capsys):
    assert run("--model", SMOKE_MODEL, "--output_dir", str(tmp_path)) == 0
    m = check_outputs(tmp_path)
    assert m["method"] == "base (0-shot)" and m["adapter"] is None and m["decoding"] == "greedy"
    assert m["n_generated"] == N_TEST and m["invalid"] == 1.0  # random weights: noise, scored as invalid

    assert run("--model", SMOKE_MODEL, "--output_dir", str(tmp_path), "--num_samples", "2") == 0
    sc = check_outputs(tmp_path, "test_sc2")
    assert sc["num_samples"] == 2 and sc["decoding"] == "sample"
    for p in read(tmp_path / "predictions_test_sc2.json"):
        assert len(p["samples"]) == 2 and p["raw"] in p["samples"]
    out = capsys.readouterr().out
    assert "| greedy |" in out and "| self-consistency x2 |" in out  # side by side


def test_continuous_batching_writes_what_batched_generation_writes(greedy_run, tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "CONTINUOUS_CHUNK", 2)  # 6 prompts: three calls, each with its own scheduler
    assert run("--model", SMOKE_MODEL, "--output_dir", str(tmp_path), "--generation", "continuous") == 0
    m = check_outputs(tmp_path)
    assert m["generation"] == "continuous"
    assert read(greedy_run / "metrics_test.json")["generation"] == "batched"
    ours, theirs = read(tmp_path / "predictions_test.json"), read(greedy_run / "predictions_test.json")
    assert ours == theirs  # greedy either way: the same programs, in the same order


@pytest.mark.parametrize(
    "flags",
    [
        ("--cudnn_attention", "never"),
        ("--cudnn_attention", "always"),
        ("--cache_implementation", "static", "--compile_decoding", "false"),
        ("--shared_prefix", "false"),  # the default runs the shared system prompt once per batch
    ],
)
def test_speed_options_write_what_the_default_writes(flags, greedy_run, tmp_path):
    # Kernel choice and cache layout are speed options: greedy decoding must produce the same programs.
    assert run("--model", SMOKE_MODEL, "--output_dir", str(tmp_path), *flags) == 0
    ours, theirs = read(tmp_path / "predictions_test.json"), read(greedy_run / "predictions_test.json")
    assert ours == theirs


def test_shared_prefix_is_computed_once_and_serves_every_batch(greedy_run, tmp_path, monkeypatch):
    """--shared_prefix (auto, the default, runs it): the system prompt's KV cache comes from one forward of a
    single row, is copied into each batch (2 rows, or 2 x 2 samples for self-consistency), and the programs
    are those of every prompt token run per row (--shared_prefix false)."""
    forwards: list[tuple[int, int]] = []  # (rows, tokens) of every forward of the model
    init = predict.Generator.__init__

    def counting(self, model, *args, **kwargs):
        init(self, model, *args, **kwargs)
        model.register_forward_pre_hook(
            lambda _m, a, kw: forwards.append(tuple((kw.get("input_ids") if kw else a[0]).shape)),
            with_kwargs=True,
        )

    monkeypatch.setattr(predict.Generator, "__init__", counting)
    base = ["--model", SMOKE_MODEL, "--batch_size", "2"]
    assert run(*base, "--output_dir", str(tmp_path)) == 0
    prefixes = [tokens for rows, tokens in forwards if rows == 1]
    assert len(prefixes) == 1 and prefixes[0] >= predict.MIN_SHARED_PREFIX  # one prefix forward for 3 batches
    assert sum(rows == 2 and tokens > 1 for rows, tokens in forwards) == N_TEST // 2  # each batch's prefill
    assert read(tmp_path / "metrics_test.json")["shared_prefix"] is True
    off = tmp_path / "off"
    forwards.clear()
    assert run(*base, "--output_dir", str(off), "--shared_prefix", "false") == 0
    assert not [tokens for rows, tokens in forwards if rows == 1]  # no prefix forward
    assert read(tmp_path / "predictions_test.json") == read(off / "predictions_test.json")
    assert read(off / "metrics_test.json")["shared_prefix"] is False

    forwards.clear()
    sc = ["--num_samples", "2", "--batch_size", "2"]
    assert run(*base, "--output_dir", str(tmp_path), "--num_samples", "2") == 0
    assert sum(rows == 4 and tokens > 1 for rows, tokens in forwards) == N_TEST // 2  # 2 samples per prompt
    assert run("--model", SMOKE_MODEL, "--output_dir", str(off), *sc, "--shared_prefix", "false") == 0
    ours, theirs = (read(d / "predictions_test_sc2.json") for d in (tmp_path, off))
    assert [p["samples"] for p in ours] == [p["samples"] for p in theirs]  # same seeds, same samples


def test_shared_prefix_refuses_a_model_that_brings_its_own_cache():
    from finqa_trl.modeling import load

    model, tok = load(SMOKE_MODEL)
    spec = predict.ModelSpec("model", "m", "m", None, {}, None)
    settings = predict.Settings(spec, "test", Path(), 0, "full", 100, False, 1, False, Path(), "test")
    model.generation_config.cache_implementation = "hybrid"  # as Gemma's generation configs ask
    shared = predict.parse_args(["--model", "m", "--shared_prefix", "true"])
    with pytest.raises(predict.PredictError, match="asks for cache_implementation='hybrid'"):
        predict.Generator(model, tok, shared, settings)
    # auto leaves such a model its own cache
    assert not predict.Generator(model, tok, predict.parse_args(["--model", "m"]), settings).shared_prefix


def test_shared_prefix_auto_applies_to_batched_generation_with_the_default_cache(tmp_path):
    """auto runs the shared prefix where generate takes the cache it is handed, and records whether it did;
    continuous batching and a static cache go on without it (`true` is refused there: see below)."""
    base = ["--model", SMOKE_MODEL, "--limit", "2"]
    for name, flags, used in [
        ("batched", [], True),
        ("continuous", ["--generation", "continuous"], False),
        ("static", ["--cache_implementation", "static", "--compile_decoding", "false"], False),
    ]:
        assert run(*base, "--output_dir", str(tmp_path / name), *flags) == 0
        assert read(tmp_path / name / "metrics_test_first2.json")["shared_prefix"] is used, name


def test_shared_prefix_layout():
    shared = list(range(1, 21))
    prompts = [[*shared, 30, 31], [*shared, 40], [*shared, 50, 51, 52]]
    assert predict.shared_prefix_length(prompts) == 20
    assert predict.shared_prefix_length([shared, shared]) == 19  # each row keeps a token to run
    assert predict.shared_prefix_length([shared[:10] + [7], shared[:10] + [8]]) == 0  # too short to pay
    enc = predict.prefix_and_left_pad(prompts, 20, 0, "cpu")
    assert enc["input_ids"].tolist() == [[*shared, 0, 30, 31], [*shared, 0, 0, 40], [*shared, 50, 51, 52]]
    assert enc["attention_mask"].tolist() == [[1] * 20 + m for m in ([0, 1, 1], [0, 0, 1], [1, 1, 1])]


def test_cudnn_attention_is_allowed_in_prefill_only_and_restored_after():
    import torch

    from finqa_trl.modeling import load

    model, tok = load(SMOKE_MODEL)
    seen = []  # (new tokens in this forward, cuDNN sdpa allowed) at the first layer's attention
    attn = model.model.layers[0].self_attn
    allowed = torch.backends.cuda.cudnn_sdp_enabled
    attn.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append((kw["hidden_states"].shape[1], allowed())), with_kwargs=True
    )
    enc = predict.left_pad([[5, 6, 7, 8], [9, 10]], tok.pad_token_id, "cpu")
    kwargs = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": tok.pad_token_id}
    cases = (("prefill", [True, False, False]), ("never", [False] * 3), ("always", [True] * 3))
    for where, expected in cases:
        seen.clear()
        with torch.inference_mode(), predict.cudnn_attention(model, where):
            model.generate(**enc, **kwargs)
        assert [n for n, _ in seen] == [4, 1, 1] and [on for _, on in seen] == expected, where
        assert torch.backends.cuda.cudnn_sdp_enabled()  # the global switch is put back


def test_liger_kernels_patch_inside_and_put_the_modeling_module_back(monkeypatch):
    import sys

    import torch

    from finqa_trl.modeling import load

    model, _ = load(SMOKE_MODEL)
    module = sys.modules[type(model).__module__]
    rope, norm_forward = module.apply_rotary_pos_emb, model.model.norm.forward
    calls = []

    def fake_apply(model, **kernels):  # what Liger does: module globals and the instance's modules
        calls.append(kernels)
        module.apply_rotary_pos_emb = lambda *a, **k: None
        model.model.norm.forward = lambda x: x

    with predict.liger_kernels(model, apply=fake_apply):
        assert module.apply_rotary_pos_emb is not rope and model.model.norm.forward is not norm_forward
    assert calls == [{"rope": True, "rms_norm": True, "swiglu": True,
                      "cross_entropy": False, "fused_linear_cross_entropy": False}]  # fmt: skip
    assert module.apply_rotary_pos_emb is rope  # a model loaded later is the stock one
    assert model.model.norm.forward is not norm_forward  # this instance keeps its kernels
    # Where the kernels cannot run: auto is off, true is one line of error
    assert not predict.use_liger(model, "auto") and not predict.use_liger(model, "false")
    # auto leaves a 4-bit base alone even where Liger could run (not timed there)
    monkeypatch.setattr("finqa_trl.modeling.liger_installed", lambda: True)
    monkeypatch.setattr(predict, "_liger_supports", lambda m: True)
    cuda_model = type("M", (), {"device": torch.device("cuda"), "is_loaded_in_4bit": False})()
    assert predict.use_liger(cuda_model, "auto")
    cuda_model.is_loaded_in_4bit = True
    assert not predict.use_liger(cuda_model, "auto") and predict.use_liger(cuda_model, "true")
    monkeypatch.setattr(predict, "_liger_supports", lambda m: False)
    with pytest.raises(predict.PredictError, match="no kernels for model type"):
        predict.use_liger(cuda_model, "true")
    # `true` where liger-kernel or a GPU is missing: refused before anything loads
    args = predict.parse_args(["--model", SMOKE_MODEL, "--liger_kernel", "true"])
    with pytest.raises(predict.PredictError, match="needs a CUDA GPU"):
        predict.resolve_settings(args)
    monkeypatch.setattr("finqa_trl.modeling.liger_installed", lambda: False)
    with pytest.raises(predict.PredictError, match="pip install liger-kernel"):
        predict.resolve_settings(args)


def test_liger_kernels_as_liger_applies_them(monkeypatch):
    liger = pytest.importorskip("liger_kernel.transformers")
    import sys

    from finqa_trl.modeling import load

    model, _ = load(SMOKE_MODEL)
    module = sys.modules[type(model).__module__]
    rope, norm_class = module.apply_rotary_pos_emb, module.LlamaRMSNorm
    with predict.liger_kernels(model):
        assert module.apply_rotary_pos_emb is liger.liger_rotary_pos_emb
    assert module.apply_rotary_pos_emb is rope and module.LlamaRMSNorm is norm_class
    assert predict._liger_supports(model)


def test_continuous_batching_stops_where_batched_generation_stops():
    from finqa_trl.modeling import load

    model, tok = load(SMOKE_MODEL)
    model.eval()
    chats = [[{"role": "user", "content": f"what is {i} plus {3 * i}? " * (1 + i % 3)}] for i in range(5)]
    prompts = [list(tok.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"])
               for c in chats]  # fmt: skip
    spec = predict.ModelSpec("model", "m", "m", None, {}, None)
    settings = predict.Settings(spec, "test", Path(), 0, "full", 100, False, 1, False, Path(), "test")
    batched = predict.parse_args(["--model", "m", "--max_new_tokens", "12"])
    continuous = predict.parse_args(["--model", "m", "--max_new_tokens", "12", "--generation", "continuous"])
    # An end-of-sequence token that the random model writes early for some prompts (its 4th for the first).
    enc = predict.left_pad(prompts, tok.pad_token_id, "cpu")
    out = model.generate(**enc, **predict.Generator(model, tok, batched, settings).kwargs)
    model.generation_config.eos_token_id = [int(out[0, enc["input_ids"].shape[1] + 3])]
    ids = [str(i) for i in range(5)]
    lengths = [len(g) for g in predict.Generator(model, tok, continuous, settings).continuous(prompts)]
    assert lengths[0] <= 4 and min(lengths) < 12  # stopped at that token (kept), at the latest the 4th
    assert predict.Generator(model, tok, continuous, settings)(prompts, ids) == predict.Generator(
        model, tok, batched, settings
    )(prompts, ids)


def test_continuous_batching_of_an_adapter_on_a_4bit_base(adapter, tmp_path):
    from finqa_trl.modeling import ModelError, check_4bit_supported

    try:
        check_4bit_supported()
    except ModelError as err:
        pytest.skip(str(err))
    base = ["--model", str(adapter), "--load_in_4bit", "--limit", "3"]
    assert run(*base, "--output_dir", str(tmp_path / "b")) == 0
    assert run(*base, "--output_dir", str(tmp_path / "c"), "--generation", "continuous") == 0
    tag = "predictions_test_4bit_first3.json"
    assert read(tmp_path / "c" / tag) == read(tmp_path / "b" / tag)


def test_adapter_writes_into_its_run_dir(adapter):
    assert run("--model", str(adapter)) == 0
    m = check_outputs(adapter)
    assert m["adapter"] == str(adapter) and m["base"] == SMOKE_MODEL and m["method"] == "LoRA"
    assert m["recipe"] == "smoke"


def test_merged_model(adapter, tmp_path):
    merged = tmp_path / "merged"
    assert merge.main([str(adapter), "--output", str(merged)]) == 0
    assert (merged / "config.json").is_file() and (merged / "recipe.yaml").is_file()
    assert run("--model", str(merged)) == 0  # a run's copy: evaluated in place
    m = check_outputs(merged)
    assert m["adapter"] is None and m["method"] == "LoRA (merged)"


def test_adapter_on_4bit_base(adapter, tmp_path):
    from finqa_trl.modeling import ModelError, check_4bit_supported

    try:
        check_4bit_supported()
    except ModelError as err:
        pytest.skip(str(err))
    assert run("--model", str(adapter), "--load_in_4bit", "--output_dir", str(tmp_path)) == 0
    m = check_outputs(tmp_path, "test_4bit")
    assert m["quant"] == "4-bit NF4+DQ"  # not trained in 4-bit: NF4 with double quantization


def test_adapter_loads_only_its_own_tokenizer(adapter, tmp_path, monkeypatch):
    from finqa_trl import modeling

    loaded: list[str] = []
    original = modeling.load_tokenizer

    def recording(source, **kwargs):
        loaded.append(source.path)
        return original(source, **kwargs)

    monkeypatch.setattr(modeling, "load_tokenizer", recording)
    assert run("--model", str(adapter), "--output_dir", str(tmp_path), "--limit", "1") == 0
    assert loaded == [str(adapter)]  # not the base's as well


def test_checkpoint_of_a_run_uses_the_run_recipe(adapter, tmp_path):
    import yaml

    recipe = yaml.safe_load((adapter / "recipe.yaml").read_text())
    recipe.update(
        eg_k=2, context="gold", max_prompt_tokens=1000, load_in_4bit=True, data_dir=str(FIXTURE_DIR)
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ckpt = tmp_path / "checkpoint-2"  # what training saves mid-run: the adapter, without recipe.yaml
    ckpt.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter / name, ckpt)
    s = predict.resolve_settings(predict.parse_args(["--model", str(ckpt)]))
    assert s.spec.kind == "adapter" and s.spec.load_from == SMOKE_MODEL and s.spec.recipe["eg_k"] == 2
    assert (s.eg_k, s.context, s.load_in_4bit, s.data_dir) == (2, "gold", True, FIXTURE_DIR)
    assert s.max_prompt_tokens == 1000  # the run's own budget, which training trimmed to: no per-shot extra
    assert s.output_dir == ckpt and s.tag == "test_2shot_gold"  # 4-bit as trained: no _4bit in the tag
    s = predict.resolve_settings(predict.parse_args(["--model", str(ckpt), "--max_prompt_tokens", "500"]))
    assert s.max_prompt_tokens == 500
    # Only the built-in default grows with the shots.
    s = predict.resolve_settings(predict.parse_args(["--model", SMOKE_MODEL, "--eg_k", "2"]))
    assert s.max_prompt_tokens == predict.DEFAULT_MAX_PROMPT_TOKENS + 2 * predict.SHOT_TOKENS


def test_folder_of_gguf_files(tmp_path, capsys):
    (tmp_path / "a.gguf").write_bytes(b"")
    assert predict.inspect_model(str(tmp_path)).gguf_file == "a.gguf"  # the only one: picked
    assert predict.inspect_model(str(tmp_path), gguf_file="x.gguf").gguf_file == "x.gguf"
    (tmp_path / "b.gguf").write_bytes(b"")
    expect_error(capsys, ["--model", str(tmp_path)], "pass --gguf_file NAME (found: a.gguf, b.gguf)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]


def test_default_output_dir_for_hub_and_builtin_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = predict.resolve_settings(predict.parse_args(["--model", SMOKE_MODEL, "--eg_k", "2"]))
    assert s.output_dir == Path("outputs/smoke-llama-2shot") and s.tag == "test_2shot"
    s = predict.resolve_settings(predict.parse_args(["--model", "meta-llama/Llama-3.2-1B-Instruct",
                                                     "--load_in_4bit", "--split", "dev"]))  # fmt: skip
    assert s.output_dir == Path("outputs/Llama-3.2-1B-Instruct-4bit-0shot") and s.tag == "dev_4bit"


# -------------------------------------------------------------------------------------------- resuming


def test_resume_generates_only_missing_ids(tmp_path, monkeypatch):
    ids = [e["id"] for e in load_split(FIXTURE_DIR, "test")]
    done = [{"id": i, "predicted": ["EOF"], "raw": "PREWRITTEN"} for i in ids[:2]]
    (tmp_path / "predictions_test.json").write_text(json.dumps(done))
    generated: list[str] = []
    original = predict.Generator.__call__

    def counting(self, prompts, batch_ids):
        generated.extend(batch_ids)
        return original(self, prompts, batch_ids)

    monkeypatch.setattr(predict.Generator, "__call__", counting)
    assert run("--model", SMOKE_MODEL, "--output_dir", str(tmp_path), "--batch_size", "2") == 0
    assert sorted(generated) == sorted(ids[2:])
    preds = {p["id"]: p for p in read(tmp_path / "predictions_test.json")}
    assert [preds[i]["raw"] for i in ids[:2]] == ["PREWRITTEN"] * 2
    m = check_outputs(tmp_path)
    assert m["n_generated"] == N_TEST - 2

    generated.clear()  # everything done: nothing is generated, metrics are rewritten
    assert run("--model", SMOKE_MODEL, "--output_dir", str(tmp_path)) == 0
    assert generated == []


def test_limited_run_writes_files_of_its_own(greedy_run, tmp_path):
    out = copy_run(greedy_run, tmp_path)
    full = snapshot(out)
    assert run("--model", SMOKE_MODEL, "--output_dir", str(out), "--limit", "2") == 0
    m = read(out / "metrics_test_first2.json")
    assert m["n"] == m["n_generated"] == 2 and m["tag"] == "test_first2"
    assert len(read(out / "predictions_test_first2.json")) == len(read(out / "details_test_first2.json")) == 2
    assert {k: v for k, v in snapshot(out).items() if "first2" not in k} == full  # the full run is intact
    # A limit that covers the split is the full run: it rescores the full files.
    assert run("--model", SMOKE_MODEL, "--output_dir", str(out), "--limit", str(N_TEST)) == 0
    assert read(out / "metrics_test.json")["n"] == N_TEST
    # The limit goes before the sampling part, so that self-consistency still finds its greedy run.
    s = predict.resolve_settings(predict.parse_args(["--model", SMOKE_MODEL, "--num_samples", "4"]))
    assert (
        s.first(2).tag == "test_first2_sc4"
        and s.first(2).path("metrics").name == "metrics_test_first2_sc4.json"
    )


def test_resume_with_other_generation_settings_is_refused(greedy_run, tmp_path, capsys):
    out = copy_run(greedy_run, tmp_path)
    before = snapshot(out)
    base = ["--model", SMOKE_MODEL, "--output_dir", str(out), "--data_dir", str(FIXTURE_DIR)]
    argv = [*base, "--max_new_tokens", "3", "--max_prompt_tokens", "100000"]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in ("max_new_tokens 6 (now 3)", "max_prompt_tokens 3072 (now 100000)", "--overwrite"):
        assert fragment in err, err
    assert predict.main([*base, "--max_new_tokens", "6", "--dtype", "bfloat16"]) == 2  # ran in float32
    assert "quant float32 (now bfloat16)" in capsys.readouterr().err
    assert snapshot(out) == before  # nothing written
    # Greedy decoding does not depend on the seed: a rescore with another one is the same run.
    assert run("--model", SMOKE_MODEL, "--output_dir", str(out), "--seed", "7") == 0
    # No metrics to compare with: resumed as before; --overwrite: generated again, with the new settings.
    (out / "metrics_test.json").unlink()
    assert predict.main([*base, "--max_new_tokens", "3"]) == 0
    assert predict.main([*base, "--max_new_tokens", "2", "--overwrite"]) == 0
    m = read(out / "metrics_test.json")
    assert m["max_new_tokens"] == 2 and m["n_generated"] == N_TEST


def interrupt_generation_at(monkeypatch, batch: int) -> None:
    """Ctrl-C while generating the `batch`-th batch (1-based)."""
    calls = 0
    original = predict.Generator.__call__

    def generate(self, prompts, batch_ids):
        nonlocal calls
        calls += 1
        if calls == batch:
            raise KeyboardInterrupt
        return original(self, prompts, batch_ids)

    monkeypatch.setattr(predict.Generator, "__call__", generate)


def test_interrupted_overwrite_is_resumed_with_its_own_settings(greedy_run, tmp_path, monkeypatch, capsys):
    out = copy_run(greedy_run, tmp_path)
    interrupt_generation_at(monkeypatch, 2)
    base = [
        "--model",
        SMOKE_MODEL,
        "--output_dir",
        str(out),
        "--data_dir",
        str(FIXTURE_DIR),
        "--batch_size",
        "1",
    ]
    assert predict.main([*base, "--max_new_tokens", "3", "--overwrite"]) == 130
    # The old run's metrics went with its predictions: they cannot vouch for a resume with the old settings.
    assert len(read(out / "predictions_test.json")) == 1 and not (out / "metrics_test.json").exists()
    # The interrupted run's own settings file does: a resume with other settings would mix two runs.
    assert read(out / "settings_test.json")["max_new_tokens"] == 3
    monkeypatch.undo()
    before = snapshot(out)
    assert predict.main([*base, "--max_new_tokens", "6"]) == 2
    assert "max_new_tokens 3 (now 6)" in capsys.readouterr().err and snapshot(out) == before
    assert predict.main([*base, "--max_new_tokens", "3"]) == 0
    assert read(out / "metrics_test.json")["max_new_tokens"] == 3
    assert not (out / "settings_test.json").exists()  # the metrics record the settings now
    assert predict.main([*base, "--max_new_tokens", "6"]) == 2  # from now on, checked against the new run
    assert "max_new_tokens 3 (now 6)" in capsys.readouterr().err


def test_an_interrupted_run_keeps_its_precision_and_an_overwrite_its_own_predictions(
    greedy_run, tmp_path, monkeypatch, capsys
):
    out = copy_run(greedy_run, tmp_path)
    base = ["--model", SMOKE_MODEL, "--output_dir", str(out), "--data_dir", str(FIXTURE_DIR)]
    base += ["--batch_size", "1"]
    interrupt_generation_at(monkeypatch, 1)  # before this run saved anything
    assert predict.main([*base, "--max_new_tokens", "3", "--overwrite"]) == 130
    assert read(out / "predictions_test.json") == []  # not the old run's beside this run's settings
    monkeypatch.undo()
    interrupt_generation_at(monkeypatch, 2)
    assert predict.main([*base, "--max_new_tokens", "3", "--dtype", "float32", "--overwrite"]) == 130
    monkeypatch.undo()
    assert predict.main([*base, "--max_new_tokens", "3", "--dtype", "bfloat16"]) == 2
    assert "quant float32 (now bfloat16)" in capsys.readouterr().err


def test_rescore_keeps_the_precision_it_was_generated_in(greedy_run, tmp_path):
    out = copy_run(greedy_run, tmp_path)
    first = read(out / "metrics_test.json")
    assert first["quant"] == first["dtype"] == "float32"  # CPU: the smoke model runs in float32
    assert run("--model", SMOKE_MODEL, "--output_dir", str(out)) == 0  # nothing to generate: a rescore
    again = read(out / "metrics_test.json")
    assert (again["quant"], again["dtype"], again["n_generated"]) == ("float32", "float32", N_TEST)
    # A metrics file from before the dtype was recorded: its quant is carried over all the same.
    (out / "metrics_test.json").write_text(json.dumps({k: v for k, v in again.items() if k != "dtype"}))
    assert run("--model", SMOKE_MODEL, "--output_dir", str(out)) == 0
    assert read(out / "metrics_test.json")["quant"] == "float32"


def test_interrupted_run_keeps_finished_batches(tmp_path, monkeypatch):
    interrupt_generation_at(monkeypatch, 3)
    assert run("--model", SMOKE_MODEL, "--output_dir", str(tmp_path), "--batch_size", "1") == 130
    assert len(read(tmp_path / "predictions_test.json")) == 2  # complete JSON, the two finished batches
    assert not list(tmp_path.glob(".*tmp"))


def test_batches_longest_first_within_budget_and_halved_on_oom():
    import torch

    prompts = [[1] * n for n in (5, 30, 10, 20, 40, 15, 12, 8)]
    seen: list[list[int]] = []

    def fake_generate(batch, batch_ids):
        if len(batch) * (len(batch[0]) + 4) > 100:  # a GPU that holds 100 tokens
            raise torch.OutOfMemoryError("CUDA out of memory")
        seen.append([len(p) for p in batch])
        return [[f"add({len(p)}, 1)"] for p in batch]

    done: list[str] = []
    plan = dict(rows_cap=None, max_new_tokens=4, num_samples=1)
    batches = predict.plan_batches(prompts, budget=200, **plan)
    # Longest first, each batch's rows x (its longest prompt + new tokens) within the budget
    assert [[len(prompts[i]) for i in b] for b in batches] == [[40, 30, 20, 15], [12, 10, 8, 5]]

    def run_all(batches):
        seen.clear()
        done.clear()
        predict.generate_all(
            fake_generate, prompts, [str(i) for i in range(8)], batches, max_new_tokens=4, num_samples=1,
            on_batch=lambda chunk, texts: done.extend(str(i) for i in chunk), progress=False,
        )  # fmt: skip
        assert sorted(done) == sorted(str(i) for i in range(8))
        return seen

    # The first batch (4 x 44 tokens) ran out of memory: halved to 2 x 44, which fits; the later batch
    # (4 x 16) is within that and runs whole.
    halved = [[40, 30], [20, 15], [12, 10, 8, 5]]
    assert run_all(batches) == halved
    # One batch of all 8 (8 x 44): halved to 4 x 44, out of memory again, then 2 x 44; the rest of that batch
    # goes in pieces of at most 2 x 44 tokens.
    assert predict.plan_batches(prompts, budget=10_000, **plan) == [predict.longest_first(prompts)]
    assert run_all(predict.plan_batches(prompts, budget=10_000, **plan)) == halved
    capped = predict.plan_batches(prompts, budget=10_000, **{**plan, "rows_cap": 3})
    assert capped == [[4, 1, 3], [5, 6, 2], [7, 0]]
    # After an OOM, a later planned batch above the halved one's tokens is split before it runs, not run
    # out of memory again: 10 x 14 tokens in pieces of at most 88.
    prompts[:] = [[1] * n for n in (40, 30, 20, 20, *[10] * 10)]
    ooms = 0

    def oom_counting(batch, batch_ids):
        nonlocal ooms
        ooms += len(batch) * (len(batch[0]) + 4) > 100
        return fake_generate(batch, batch_ids)

    seen.clear()
    batches = predict.plan_batches(prompts, budget=200, **plan)
    assert [len(b) for b in batches] == [4, 10]
    predict.generate_all(
        oom_counting, prompts, [str(i) for i in range(14)], batches, max_new_tokens=4, num_samples=1,
        on_batch=lambda chunk, texts: None, progress=False,
    )  # fmt: skip
    assert seen == [[40, 30], [20, 20], [10] * 6, [10] * 4] and ooms == 1
    # The token budget bounds rows x (longest prompt + new tokens) x samples.
    assert predict.next_batch([4, 1, 3], [5, 30, 10, 20, 40], rows_cap=None, budget=100, max_new_tokens=10,
                              num_samples=1) == 2  # fmt: skip
    assert predict.next_batch([4, 1, 3], [5, 30, 10, 20, 40], rows_cap=None, budget=100, max_new_tokens=10,
                              num_samples=2) == 1  # fmt: skip


def test_ranks_get_whole_batches_of_the_one_process_plan():
    prompts = [[1] * n for n in (90, 10, 50, 30, 70, 20, 60, 40, 80)]
    batches = predict.plan_batches(prompts, rows_cap=None, budget=250, max_new_tokens=10, num_samples=1)
    lengths = [[len(prompts[i]) for i in b] for b in batches]
    assert lengths == [[90, 80], [70, 60, 50], [40, 30, 20, 10]]
    for world in (1, 2, 3, 5):
        hands = predict.deal_batches(batches, prompts, world, 10)
        assert len(hands) == world
        # every batch goes whole to one rank, in the plan's order within that rank
        dealt = [b for hand in hands for b in hand]
        assert sorted(dealt) == sorted(batches)
        for hand in hands:
            assert hand == [b for b in batches if b in hand]
    # each batch to the rank with the fewest padded tokens so far: 200, then 240 to rank 1, then 200 to rank 0
    assert predict.deal_batches(batches, prompts, 2, 10) == [[batches[0], batches[2]], [batches[1]]]
    assert predict.deal_batches(batches, prompts, 5, 10)[3:] == [[], []]  # fewer batches than ranks


@pytest.mark.parametrize(
    ("kind", "recipe", "expected"),
    [
        ("adapter", {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "FP4"),
        ("adapter", {"load_in_4bit": True, "use_bnb_nested_quant": True}, "NF4+DQ"),
        ("adapter", {"load_in_4bit": True}, "NF4"),  # a key the run lacked had TRL's default: no nesting
        ("adapter", {}, "NF4+DQ"),  # trained in bf16, evaluated in 4-bit
        ("model", {}, "NF4+DQ"),
    ],
)
def test_4bit_evaluation_quantizes_as_the_run_was_trained(kind, recipe, expected, tmp_path):
    spec = predict.ModelSpec(kind, "m", "base", None, recipe, None)
    settings = predict.Settings(spec, "test", tmp_path, 0, "full", 100, True, 1, False, tmp_path, "test")
    assert predict.quant_label(settings, None) == f"4-bit {expected}"
    assert predict.quant_label(replace(settings, load_in_4bit=False), "torch.bfloat16") == "bfloat16"


def test_old_metrics_name_4bit_evaluations_as_today():
    from finqa_trl.recipes import known_quant

    # Before the "generation" field, every 4-bit evaluation was called "4-bit NF4" and loaded NF4+DQ.
    assert known_quant({"quant": "4-bit NF4"}) == "4-bit NF4+DQ"
    assert known_quant({"quant": "bfloat16"}) == "bfloat16" and known_quant({}) is None
    # Today "4-bit NF4" is NF4 without double quantization, and stays so.
    assert known_quant({"quant": "4-bit NF4", "generation": "batched"}) == "4-bit NF4"


def test_a_no_double_quant_evaluation_resumes_with_its_own_name(tmp_path):
    spec = predict.ModelSpec("adapter", "m", "base", None, {"load_in_4bit": True}, tmp_path)
    settings = predict.Settings(spec, "test", tmp_path, 0, "full", 100, True, 1, False, tmp_path, "test")
    args = predict.parse_args(["--model", "m"])
    recorded = {**predict.recorded_settings(settings, args), "quant": predict.quant_label(settings, None)}
    (tmp_path / "metrics_test.json").write_text(json.dumps(recorded))
    predict._check_same_settings(settings, args)  # "4-bit NF4" written today is not read as NF4+DQ


def test_left_pad_matches_the_tokenizers_left_padding():
    from finqa_trl.modeling import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source(SMOKE_MODEL))
    tok.padding_side = "left"
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    mine = predict.left_pad(prompts, tok.pad_token_id, "cpu")
    theirs = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert mine["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert mine["input_ids"][1].tolist() == [tok.pad_token_id] * 4 + [8]


# ------------------------------------------------------------------------------------ self-consistency


def ok(value) -> Execution:
    return Execution(False, value)


BAD = Execution(True, None, "malformed program")


@pytest.mark.parametrize(
    ("runs", "chosen"),
    [
        ([ok(1.0), ok(2.0), ok(2.0)], 1),  # majority; the first sample carrying it
        ([ok(1.0), ok(2.0), ok(2.0), ok(1.0)], 0),  # tie: the answer seen first
        ([BAD, BAD, ok(3.0)], 2),  # invalid samples do not vote...
        ([BAD, ok(5.0), BAD, BAD, ok(6.0)], 1),  # ...even when they are the majority
        ([BAD, BAD], 0),  # all invalid: the first sample
        ([ok("yes"), ok("no"), ok("no")], 1),
        ([ok(float("nan")), ok(float("nan")), ok(1.0)], 0),  # nan agrees with nan
    ],
)
def test_vote(runs, chosen):
    assert predict.vote(runs) == chosen


def test_make_entry_votes_on_executed_answers():
    table = [["revenue", "100", "200"]]
    texts = ["divide(1, 0)", "add(1, 2)", "garbage ((( no program", "subtract(5, 2)", "add(2, 2)"]
    entry = predict.make_entry("x", texts, table)
    # 3 wins (twice); the first sample answering 3 is the one kept
    assert entry["predicted"] == ["add(", "1", "2", ")", "EOF"] and entry["raw"] == "add(1, 2)"
    assert entry["samples"] == texts and entry["answers"] == [None, 3.0, None, 3.0, 4.0]
    single = predict.make_entry("y", ["Sure! )))( divide("], table)
    assert single == {"id": "y", "predicted": ["EOF"], "raw": "Sure! )))( divide("}


# ------------------------------------------------------------------------------------------- bad input


def expect_error(capsys, argv, *fragments: str) -> None:
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    for f in fragments:
        assert f in err[-1], err[-1]


def test_adapter_dir_without_config(adapter, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(adapter / "adapter_model.safetensors", broken)
    expect_error(capsys, ["--model", str(broken)], "adapter_config.json", "adapter_model.safetensors")
    assert sorted(p.name for p in broken.iterdir()) == ["adapter_model.safetensors"]  # nothing written


def test_directory_that_is_no_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    expect_error(capsys, ["--model", str(tmp_path)], "neither a saved model", "nor a PEFT adapter")
    expect_error(capsys, ["--model", str(tmp_path / "notes.txt")], "is a file")
    expect_error(capsys, ["--model", str(tmp_path / "missing")], "not found")


def test_too_many_shots_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(predict, "load_model", no_loading)
    argv = ["--model", SMOKE_MODEL, "--eg_k", "20", "--output_dir", str(tmp_path)]
    expect_error(capsys, argv, "eg_k=20", "asked for 20 shots", "--eg_k")
    assert not any(tmp_path.iterdir())


def test_base_mismatch(adapter, tmp_path, capsys):
    other = "meta-llama/Llama-3.2-1B-Instruct"
    argv = ["--model", str(adapter), "--base", other, "--output_dir", str(tmp_path)]
    expect_error(capsys, argv, "does not match", "--force")
    assert not any(tmp_path.iterdir())
    assert predict.same_model("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B-Instruct/")


def test_unknown_cache_implementation_is_one_line_before_loading(tmp_path, capsys):
    argv = ["--model", SMOKE_MODEL, "--output_dir", str(tmp_path / "o"), "--cache_implementation", "bogus"]
    expect_error(capsys, argv, "--cache_implementation", "bogus", "static")
    assert not (tmp_path / "o").exists()


def test_continuous_batching_is_greedy_only(tmp_path, capsys):
    assert run("--model", SMOKE_MODEL, "--output_dir", str(tmp_path), "--generation", "continuous",
               "--num_samples", "3") == 2  # fmt: skip
    assert "--generation continuous decodes greedily" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_generation_flags_that_would_do_nothing_are_one_line(tmp_path, capsys, monkeypatch):
    base = ["--model", SMOKE_MODEL, "--output_dir", str(tmp_path / "o")]
    expect_error(capsys, [*base, "--compile_decoding", "false"], "--compile_decoding false applies to")
    expect_error(capsys, [*base, "--compile_decoding", "false", "--cache_implementation", "dynamic"],
                 "--compile_decoding false applies to")  # fmt: skip
    assert "static" in predict._static_caches()
    monkeypatch.setattr("finqa_trl.modeling.liger_installed", lambda: False)
    expect_error(capsys, [*base, "--liger_kernel", "true"], "--liger_kernel true needs liger-kernel")
    for where in ("never", "always"):
        expect_error(capsys, [*base, "--generation", "continuous", "--cudnn_attention", where],
                     f"--cudnn_attention {where} applies to --generation batched")  # fmt: skip
    for other in (["--generation", "continuous"], ["--cache_implementation", "static"]):
        expect_error(capsys, [*base, "--shared_prefix", "true", *other], "--shared_prefix true hands")
    assert not (tmp_path / "o").exists()


def test_unknown_and_empty_split(tmp_path, capsys):
    expect_error(capsys, ["--model", SMOKE_MODEL, "--split", "validation", "--output_dir", str(tmp_path)],
                 "no FinQA split 'validation'")  # fmt: skip
    expect_error(capsys, ["--model", SMOKE_MODEL, "--split", "", "--output_dir", str(tmp_path)], "--split")
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.json").write_text("[]")
    assert predict.main(["--model", SMOKE_MODEL, "--data_dir", str(data), "--output_dir", str(tmp_path)]) == 2
    assert "has no examples" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_predictions_of_another_split_are_not_mixed(tmp_path, capsys):
    dev_id = load_split(FIXTURE_DIR, "dev")[0]["id"]
    path = tmp_path / "predictions_test.json"
    path.write_text(json.dumps([{"id": dev_id, "predicted": ["EOF"]}]))
    before = path.read_text()
    expect_error(
        capsys, ["--model", SMOKE_MODEL, "--output_dir", str(tmp_path)], "not in split 'test'", dev_id
    )
    assert path.read_text() == before and not (tmp_path / "metrics_test.json").exists()


def test_predictions_of_older_weights_are_not_resumed(adapter, tmp_path, capsys):
    import os

    ids = [e["id"] for e in load_split(FIXTURE_DIR, "test")]
    path = tmp_path / "predictions_test.json"
    path.write_text(json.dumps([{"id": ids[0], "predicted": ["EOF"], "raw": "old"}]))
    weights = adapter / "adapter_model.safetensors"
    os.utime(path, (weights.stat().st_mtime - 60, weights.stat().st_mtime - 60))  # written before training
    expect_error(capsys, ["--model", str(adapter), "--output_dir", str(tmp_path)], "retrained", "--overwrite")
    assert json.loads(path.read_text())[0]["raw"] == "old"


def test_merge_rejects_a_full_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert merge.main([str(tmp_path)]) == 2
    assert "not an adapter" in capsys.readouterr().err


def test_cli_exit_code_and_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "finqa_trl.predict", "--model", str(tmp_path), "--bogus_flag", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--bogus_flag" in proc.stderr


def test_token_budget_takes_the_given_share_of_what_the_model_leaves(monkeypatch, tmp_path, capsys, caplog):
    from types import SimpleNamespace

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 3 * 2**30)  # the model
    reserved = {"now": 3.5 * 2**30}  # the model and the allocator's cache
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: reserved["now"])
    free = {"now": 76 * 2**30}  # of 80: this process's allocator and the CUDA context hold the rest
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free["now"], 80 * 2**30))
    cfg = SimpleNamespace(
        num_attention_heads=32,
        hidden_size=2048,
        num_hidden_layers=16,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
    )  # Llama-3.2-1B
    model = SimpleNamespace(config=cfg, dtype=torch.bfloat16)
    per_token = (2 * 16 * 8 * 64 + 4 * 2048 + 3 * 8192) * 2  # KV cache + one layer's prefill peak, bf16
    half = predict.token_budget(model, predict.parse_args(["--model", "m"]))
    assert half == int(0.5 * 77 * 2**30 / per_token)
    free["now"] = 75.5 * 2**30  # another run's CUDA context: the same budget, so the same batches
    assert predict.token_budget(model, predict.parse_args(["--model", "m"])) == half
    reserved["now"], free["now"] = 10 * 2**30, 69.5 * 2**30  # a big cache left by loading: ours to reuse
    assert predict.token_budget(model, predict.parse_args(["--model", "m"])) == half
    reserved["now"], free["now"] = 3.5 * 2**30, 76 * 2**30
    quarter = predict.token_budget(model, predict.parse_args(["--model", "m", "--memory_fraction", "0.25"]))
    assert abs(quarter - half / 2) <= 1
    assert not caplog.records
    free["now"] = 40 * 2**30  # another process holds 35 GiB: sized from what is free, and said so
    shared = predict.token_budget(model, predict.parse_args(["--model", "m"]))
    assert shared == int(0.5 * 40 * 2**30 / per_token)
    assert "the GPU is shared" in caplog.text
    base = ["--model", SMOKE_MODEL, "--output_dir", str(tmp_path / "o")]
    expect_error(capsys, [*base, "--memory_fraction", "1.5"], "--memory_fraction must be in (0, 0.9]")
    for fixed in (["--max_batch_tokens", "5000"], ["--batch_size", "8"], ["--generation", "continuous"]):
        expect_error(
            capsys, [*base, "--memory_fraction", "0.25", *fixed], "--memory_fraction sizes the automatic"
        )
    monkeypatch.setattr(
        "finqa_trl.modeling.cuda_available", lambda: False
    )  # no GPU: nothing to take a share of
    expect_error(capsys, [*base, "--memory_fraction", "0.25"], "--memory_fraction sizes the automatic")
    assert not (tmp_path / "o").exists()
