"""Generate FinQA programs with a base model, a merged fine-tune or a PEFT adapter, then score them.

    python -m finqa_trl.predict --model PATH_OR_ID [--base BASE] [--split test] [--data_dir D]
        [--output_dir DIR] [--eg_k 0] [--context full|gold] [--load_in_4bit [true|false]]
        [--batch_size N|auto] [--max_new_tokens 64] [--do_sample --temperature T --top_p P --seed S]
        [--num_samples N] [--limit N] [--max_prompt_tokens N] [--overwrite]

`--model` is a Hub id, `builtin:smoke-llama`, a saved (merged) model directory, a `.gguf` file, or an
unmerged adapter directory (`adapter_config.json`), whose base comes from the `recipe.yaml` training saved
beside it (or one level up, for `<run>/checkpoint-N`), else from the adapter config; `--base` overrides it
and must name the same model (`--force`).
Adapters are merged in memory before generating (faster) unless the base is 4-bit.

Writes, in `--output_dir` (default: the model directory for runs of this project, else
`outputs/<model name>-<k>shot`), files tagged
`<split>[_<k>shot][_gold][_4bit|_bf16][_first<N>][_sc<N>|_sample]` (`_first<N>`: `--limit N`, when the
split holds more examples):
  predictions_<tag>.json  official format [{"id", "predicted": [tokens..., "EOF"], "raw"}] (+ "samples")
  metrics_<tag>.json      finqa_trl.score's metrics + model / settings / timing fields
  details_<tag>.json      per example: question, gold and predicted program, values, invalid reason
Resumable: ids already in predictions_<tag>.json are skipped; the file is rewritten atomically after every
`--save_every` batches. Predictions made with other generation settings than those recorded in
metrics_<tag>.json (or, for a run interrupted before its metrics, in settings_<tag>.json, written when it
started) are not resumed or rescored (pass --overwrite). Bad input: one line on stderr, exit code 2,
nothing written.

Several processes (`torchrun --nproc_per_node N -m finqa_trl.predict ...`, or `accelerate launch`): every
rank plans the batches one process would generate, and whole batches are dealt out to the ranks, so each
example is generated in the same batch (same padding, same shared prefix) as by one process; each rank writes
its share into predictions_<tag>.shard<rank>.json, and rank 0 merges the shards into the one
predictions_<tag>.json (same order and format as one process writes) and scores it. Leftover shards of an
interrupted run are resumed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import OneLineError, one_line
from .data import load_split, resolve_data_dir
from .dsl import Execution, execute, parse_generation
from .recipes import (
    RecipeError,
    checkpoint_step,
    known_quant,
    quantization_name,
    read_run_recipe,
    run_recipe_file,
)
from .score import score, write_json_atomic

if TYPE_CHECKING:  # torch/transformers load only once a model is needed, after every input check
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("finqa_trl.predict")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see train.py: offline advice

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DEFAULT_MAX_PROMPT_TOKENS = 3072  # the training default (recipes/_base.yaml)
SHOT_TOKENS = 512  # budget added per few-shot example, so shots never crowd out the question's context
CPU_TOKEN_BUDGET = 8192
# Memory held outside this process's allocator beyond this (meant to exceed what a CUDA context takes; not
# measured): the GPU is shared with another process, and batches are sized from what is free.
SHARED_GPU_SLACK = 2 * 2**30
# --shared_prefix: fewer shared tokens are not worth a forward, a cache copy and a longer mask of their own (a
# guess, not timed; FinQA's Llama 3 prompts share their 289-token system prompt)
MIN_SHARED_PREFIX = 16
MAX_BATCH_ROWS = 256  # past this, decoding is bound by KV-cache reads and bigger batches stop paying
# --generation continuous: prompts per generate_batch call (one scheduler and cache each). Big, so that the
# scheduler keeps its slots full; finished chunks are saved, so an interruption loses one chunk at most.
CONTINUOUS_CHUNK = 512


class PredictError(OneLineError):
    """Bad input for a prediction run; `str()` is one line."""


@dataclass
class PredictArguments:
    model: str = field(metadata={"help": "Hub id, builtin:smoke-llama, model dir, .gguf, or adapter dir."})
    base: str | None = field(default=None, metadata={"help": "Base model of an adapter (default: recorded)."})
    force: bool = field(
        default=False, metadata={"help": "Accept a --base that differs from the recorded one."}
    )
    split: str = field(default="test", metadata={"help": "Split to predict: train, dev, test, private_test."})
    data_dir: str | None = field(
        default=None, metadata={"help": "FinQA folder (default: the run's recipe, $FINQA_DIR, the fixture)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where predictions/metrics go."})
    eg_k: int | None = field(
        default=None, metadata={"help": "Few-shot examples (default: recipe's, else 0)."}
    )
    context: str | None = field(
        default=None,
        metadata={"help": "full or gold (default: recipe's, else full).", "choices": ["full", "gold"]},
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={
            "help": f"Trim context to fit (default: recipe's, else {DEFAULT_MAX_PROMPT_TOKENS} + "
            f"{SHOT_TOKENS} per few-shot example)."
        },
    )
    load_in_4bit: bool | None = field(
        default=None,
        metadata={
            "help": "NF4 base (default: as trained for adapters, else no).",
            "nargs": "?",
            "const": True,
        },
    )
    dtype: str | None = field(
        default=None, metadata={"help": "bfloat16/float16/float32 (default: bf16 on GPU)."}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model (or the base)."})
    merge_in_memory: bool = field(
        default=True, metadata={"help": "Merge an adapter into a non-4-bit base before generating (faster)."}
    )
    batch_size: str = field(
        default="auto",
        metadata={"help": "Prompts per batch, or auto (token budget); continuous: per call (auto: 512)."},
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "auto: tokens (prompt + new, x samples) per batch; default from memory."},
    )
    memory_fraction: float | None = field(
        default=None,
        metadata={
            "help": "auto on a GPU: the share of the memory the model leaves (of free memory on a GPU shared "
            "with another process) that one batch's KV cache and prefill activations may take (default 0.5). "
            "Smaller: more batches, each padded less (prompts are length-sorted); larger: fewer batches, so "
            "fewer decoding loops, and the logits and decoding may no longer fit (an out-of-memory halves "
            "the batch)."
        },
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Longest program generated, in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling."})
    seed: int = field(default=42, metadata={"help": "Seed (sampling is reseeded per batch from it)."})
    num_samples: int = field(default=1, metadata={"help": "Self-consistency: N samples, majority vote."})
    limit: int | None = field(
        default=None, metadata={"help": "Only the first N examples of the split (files tagged _first<N>)."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, flash_attention_2."})
    generation: str = field(
        default="batched",
        metadata={
            "help": "batched: length-sorted, left-padded batches through generate; continuous: transformers' "
            "continuous batching (paged KV cache, no padding, finished rows replaced at once; greedy only).",
            "choices": ["batched", "continuous"],
        },
    )
    cache_implementation: str | None = field(
        default=None,
        metadata={
            "help": "KV cache for generate, e.g. static (transformers then compiles the decoding step)."
        },
    )
    compile_decoding: bool = field(
        default=True,
        metadata={
            "help": "With a static cache, let transformers compile the decoding step (false: a static cache "
            "without compiling: no per-step cache concatenation, no compile time)."
        },
    )
    cudnn_attention: str = field(
        default="prefill",
        metadata={
            "help": "Where sdpa may use cuDNN's attention kernel on CUDA: prefill (the default: its fastest "
            "kernel for the long masked prompts), always, or never. cuDNN pays a one-time cost per new "
            "shape, and every decoding step has a new key length, so decoding uses flash/memory-efficient "
            "kernels. Batched generation only (--generation continuous keeps torch's choice).",
            "choices": ["prefill", "always", "never"],
        },
    )
    liger_kernel: str = field(
        default="auto",
        metadata={
            "help": "Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (pip install liger-kernel): they "
            "fuse the elementwise work, about a third of prefill on an H100. auto: on CUDA when "
            "liger-kernel is installed and supports the model, except on 4-bit bases (not timed there); "
            "true: required; false: off.",
            "choices": ["auto", "true", "false"],
        },
    )
    shared_prefix: str = field(
        default="auto",
        metadata={
            "help": "Run the tokens that every prompt of a batch starts with (the system prompt, about a "
            "quarter of a FinQA prompt's tokens) once and give their KV cache to generate, instead of "
            "running them once per row (H100, 1,147 prompts, random-weight shapes: 3B 1.6-3.5 s less than "
            "25.1 s, 1B 0.45-1.65 s less than 11.9, the same predictions). auto: with batched generation and "
            "the default cache, unless the model's generation config brings a cache of its own; true: "
            "required; false: off. In bf16 a greedy prediction could differ (the prefix is computed in a "
            "batch of one). The metrics record whether it was enabled.",
            "choices": ["auto", "true", "false"],
        },
    )
    save_every: int = field(default=1, metadata={"help": "Checkpoint predictions every N batches."})
    overwrite: bool = field(default=False, metadata={"help": "Ignore (and replace) existing predictions."})


# ------------------------------------------------------------------------------------------- model source


@dataclass(frozen=True)
class ModelSpec:
    """What `--model` names, resolved before anything heavy is loaded."""

    kind: str  # "adapter" | "model"
    model: str  # as given
    load_from: str  # what modeling.load gets: the base for adapters
    gguf_file: str | None
    recipe: dict[str, Any]  # recipe.yaml of the run this model came from ({} for other models)
    run_dir: Path | None  # the local directory of a run of this project (default output_dir)

    @property
    def adapter(self) -> str | None:
        return self.model if self.kind == "adapter" else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PredictError(f"{path}: cannot read ({err})") from None


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def same_model(a: str, b: str) -> bool:
    """Two names of one base: equal, the same local path, or a local copy of a Hub model (same last name)."""

    def norm(x: str) -> str:
        return str(Path(x).expanduser().resolve()) if _is_local(x) else x.strip().rstrip("/")

    if norm(a) == norm(b):
        return True
    # `/models/Llama-3.2-1B-Instruct` vs `meta-llama/Llama-3.2-1B-Instruct`; two local dirs must be equal.
    if _is_local(a) != _is_local(b):
        return Path(norm(a)).name.lower() == Path(norm(b)).name.lower()
    return False


def inspect_model(
    model: str, base: str | None = None, force: bool = False, gguf_file: str | None = None
) -> ModelSpec:
    """Classify `--model` and find an adapter's base, without loading anything. PredictError on bad input."""
    path = Path(model).expanduser()
    if not path.is_dir():
        if base is not None:
            raise PredictError(f"--base applies to adapter directories only; {model} is not one")
        if path.exists() and not path.name.endswith(".gguf"):
            raise PredictError(f"{model} is a file, not a model directory, adapter directory or .gguf file")
        if not path.exists() and "/" in model and path.parent.is_dir() and str(path.parent) != ".":
            raise PredictError(f"model path not found: {model}")  # `outputs/typo`, not a Hub id
        from .modeling import ModelError, resolve_source

        try:
            resolve_source(model, gguf_file)  # classifies (and builds the smoke model); loads nothing
        except ModelError as err:
            raise PredictError(str(err)) from None
        return ModelSpec("model", model, model, gguf_file, {}, None)

    # outputs/<run>, or outputs/<run>/merged and outputs/<run>/checkpoint-N with the run's recipe one level up
    try:
        recipe = read_run_recipe(path)
    except RecipeError as err:
        raise PredictError(str(err)) from None
    run_dir = path if run_recipe_file(path) else None
    if (path / ADAPTER_CONFIG).is_file():
        config = _read_json(path / ADAPTER_CONFIG)
        recorded = [n for n in (recipe.get("model_name_or_path"), config.get("base_model_name_or_path")) if n]
        if base is not None and recorded and not force and not any(same_model(base, r) for r in recorded):
            raise PredictError(
                f"--base {base} does not match the base {recorded[0]} that the adapter in {model} was "
                "trained on; pass --force to load it anyway"
            )
        chosen = base or (recorded[0] if recorded else None)
        if not chosen:
            raise PredictError(f"{path / ADAPTER_CONFIG} names no base model: pass --base")
        gguf = gguf_file or (recipe.get("gguf_file") if chosen == recipe.get("model_name_or_path") else None)
        return ModelSpec("adapter", str(path), chosen, gguf, recipe, path)
    weights = [f for f in ADAPTER_WEIGHTS if (path / f).is_file()]
    if weights:
        raise PredictError(
            f"{model} holds {weights[0]} but no {ADAPTER_CONFIG}: an incomplete adapter (copy its "
            f"{ADAPTER_CONFIG} from the training output_dir)"
        )
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if (path / "config.json").is_file() or gguf_file or ggufs:
        if base is not None:
            raise PredictError(f"--base applies to adapter directories only; {model} is a full model")
        if not (path / "config.json").is_file() and not gguf_file:
            if len(ggufs) > 1:
                found = ", ".join(ggufs)
                raise PredictError(
                    f"{model} holds several GGUF files: pass --gguf_file NAME (found: {found})"
                )
            gguf_file = ggufs[0]
        return ModelSpec("model", str(path), str(path), gguf_file, recipe, run_dir)
    checkpoints = sorted(path.glob("checkpoint-*"), key=checkpoint_step)
    hint = f" (training has not finished? its last checkpoint is {checkpoints[-1]})" if checkpoints else ""
    raise PredictError(
        f"{model} is neither a saved model (config.json) nor a PEFT adapter ({ADAPTER_CONFIG}){hint}"
    )


def quant_label(settings: Settings, dtype: Any) -> str:
    """E.g. "4-bit NF4+DQ" (named as recipes name a training run's quantization) or "bfloat16"."""
    if settings.load_in_4bit:
        return quantization_name(settings.quantization())
    return str(dtype).replace("torch.", "")


def method_label(spec: ModelSpec, eg_k: int) -> str:
    """LoRA/DoRA/QLoRA/QDoRA (as trained) for fine-tunes, "base (k-shot)" for everything else."""
    if spec.recipe:
        from .recipes import method_name

        method = spec.recipe.get("method") or method_name(spec.recipe)
        return method if spec.kind == "adapter" else f"{method} (merged)"
    return f"base ({eg_k}-shot)"


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The command line with every default resolved (recipe values, data dir, output files)."""

    spec: ModelSpec
    split: str
    data_dir: Path
    eg_k: int
    context: str
    max_prompt_tokens: int
    load_in_4bit: bool
    num_samples: int
    do_sample: bool
    output_dir: Path
    tag: str

    def path(self, kind: str) -> Path:
        return self.output_dir / f"{kind}_{self.tag}.json"

    def quantization(self) -> dict[str, Any]:
        """How a 4-bit load quantizes: as the run was trained (its recipe.yaml; a key it lacks had TRL's
        default, off), else NF4 with double quantization."""
        recipe = self.spec.recipe
        if self.spec.kind == "adapter" and recipe.get("load_in_4bit"):
            kind = recipe.get("bnb_4bit_quant_type") or "nf4"
            nested = bool(recipe.get("use_bnb_nested_quant"))
        else:
            kind, nested = "nf4", True
        return {"load_in_4bit": True, "bnb_4bit_quant_type": kind, "use_bnb_nested_quant": nested}

    def first(self, n: int) -> Settings:
        """These settings for the first `n` examples only (`--limit`): files of their own, tagged `_first<n>`
        before the sampling part, never those of the whole split."""
        parts = self.tag.split("_")
        at = len(parts) - 1 if len(parts) > 1 and re.fullmatch(r"sc\d+|sample", parts[-1]) else len(parts)
        parts.insert(at, f"first{n}")
        return replace(self, tag="_".join(parts))

    def shard(self, rank: int) -> Path:
        """A rank's predictions in a multi-process run, until rank 0 merges them into path("predictions")."""
        return self.output_dir / f"predictions_{self.tag}.shard{rank}.json"

    def shards(self) -> list[Path]:
        """Shards on disk (an interrupted multi-process run leaves them), by rank."""
        pattern = re.compile(rf"predictions_{re.escape(self.tag)}\.shard(\d+)\.json")
        found = {}
        for p in self.output_dir.glob(f"predictions_{self.tag}.shard*.json"):
            m = pattern.fullmatch(p.name)
            if m:
                found[int(m.group(1))] = p
        return [found[r] for r in sorted(found)]


def _sanitize(name: str) -> str:
    name = name.removeprefix("builtin:").rstrip("/")
    stem = Path(name).name.removesuffix(".gguf") or name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "model"


def resolve_settings(args: PredictArguments) -> Settings:
    spec = inspect_model(args.model, args.base, args.force, args.gguf_file)
    recipe = spec.recipe
    eg_k = args.eg_k if args.eg_k is not None else int(recipe.get("eg_k") or 0)
    context = args.context or recipe.get("context") or "full"
    if eg_k < 0:
        raise PredictError(f"--eg_k must be >= 0, got {eg_k}")
    if context not in ("full", "gold"):
        raise PredictError(f"--context must be full or gold, got {context!r}")
    # A run's budget is what training trimmed to, shots included; only the built-in default grows with k.
    max_prompt = args.max_prompt_tokens or recipe.get("max_prompt_tokens")
    max_prompt = int(max_prompt) if max_prompt else DEFAULT_MAX_PROMPT_TOKENS + SHOT_TOKENS * eg_k
    trained_4bit = spec.kind == "adapter" and bool(recipe.get("load_in_4bit"))
    load_in_4bit = trained_4bit if args.load_in_4bit is None else bool(args.load_in_4bit)
    if args.num_samples < 1:
        raise PredictError(f"--num_samples must be >= 1, got {args.num_samples}")
    do_sample = args.do_sample or args.num_samples > 1  # N greedy samples would all be the same
    if args.max_new_tokens < 1 or args.save_every < 1 or (args.limit is not None and args.limit < 1):
        raise PredictError("--max_new_tokens, --save_every and --limit must be >= 1")
    if args.memory_fraction is not None:
        from .modeling import cuda_available

        # the memory the model leaves is measured after loading: the rest is for the logits, decoding, the
        # allocator and the CUDA context
        if not 0 < args.memory_fraction <= 0.9:
            raise PredictError(f"--memory_fraction must be in (0, 0.9], got {args.memory_fraction}")
        fixed = args.max_batch_tokens is not None or args.batch_size != "auto"
        if fixed or args.generation == "continuous" or not cuda_available():
            raise PredictError(
                "--memory_fraction sizes the automatic batches of --generation batched on a GPU: drop it, or "
                "drop --max_batch_tokens / --batch_size N / --generation continuous"
            )
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
        raise PredictError(f"--batch_size must be a positive integer or auto, got {args.batch_size!r}")
    if not args.split.strip():
        raise PredictError("--split is empty: use train, dev, test or private_test")
    if args.generation == "continuous" and (do_sample or args.cache_implementation):
        raise PredictError(
            "--generation continuous decodes greedily with its own paged KV cache: drop --do_sample, "
            "--num_samples and --cache_implementation, or use --generation batched"
        )
    # Flags that would do nothing here are refused rather than ignored: a timing taken with them would be
    # reported as something it is not.
    if not args.compile_decoding and args.cache_implementation not in _static_caches():
        raise PredictError(
            "--compile_decoding false applies to a static cache (--cache_implementation static); "
            "without one, nothing is compiled"
        )
    if args.generation == "continuous" and args.cudnn_attention != "prefill":
        raise PredictError(
            f"--cudnn_attention {args.cudnn_attention} applies to --generation batched; continuous "
            "batching keeps torch's own choice of attention kernel"
        )
    if args.shared_prefix == "true" and (args.generation == "continuous" or args.cache_implementation):
        raise PredictError(
            "--shared_prefix true hands generate a dynamic KV cache: it applies to --generation batched "
            "without --cache_implementation"
        )
    if args.liger_kernel == "true":
        from .modeling import cuda_available, liger_unavailable

        why_not = liger_unavailable(on_gpu=cuda_available())
        if why_not:
            raise PredictError(why_not)
    if args.cache_implementation:  # transformers' own check, before a model is loaded rather than after
        from transformers import GenerationConfig

        try:
            GenerationConfig(cache_implementation=args.cache_implementation).validate()
        except ValueError as err:
            raise PredictError(f"--cache_implementation: {one_line(err)}") from None

    data_dir = args.data_dir or recipe.get("data_dir")  # evaluate on the data the run was trained on
    data_dir = resolve_data_dir(data_dir)
    if eg_k:  # before any model loads: enough training examples to draw the shots from?
        from .prompts import select_shots

        try:
            select_shots(load_split(data_dir, "train"), eg_k)
        except ValueError as err:
            raise PredictError(f"eg_k={eg_k}: {one_line(err)}; pass a smaller --eg_k") from None

    if args.output_dir:
        output_dir = Path(args.output_dir)
    elif spec.run_dir is not None:
        output_dir = spec.run_dir
    else:
        name = _sanitize(spec.model) + ("-4bit" if load_in_4bit else "")
        output_dir = Path("outputs") / f"{name}-{eg_k}shot"

    parts = [args.split]
    if eg_k:
        parts.append(f"{eg_k}shot")
    if context != "full":
        parts.append(context)
    if load_in_4bit != trained_4bit:  # evaluated unlike it was trained / unlike the plain model
        parts.append("4bit" if load_in_4bit else "bf16")
    if args.num_samples > 1:
        parts.append(f"sc{args.num_samples}")
    elif do_sample:
        parts.append("sample")
    return Settings(
        spec,
        args.split,
        data_dir,
        eg_k,
        context,
        max_prompt,
        load_in_4bit,
        args.num_samples,
        do_sample,
        output_dir,
        "_".join(parts),
    )


# ------------------------------------------------------------------------------------------- predictions


def load_existing(path: Path, split_ids: set[str], split: str) -> list[dict[str, Any]]:
    """Predictions already made (to resume from); refuse a file of another split instead of mixing."""
    if not path.is_file():
        return []
    data = _read_json(path)
    if not isinstance(data, list) or not all(
        isinstance(p, dict) and "id" in p and "predicted" in p for p in data
    ):
        raise PredictError(f"{path} is not a predictions list: delete it or pass --overwrite")
    foreign = [p["id"] for p in data if p["id"] not in split_ids]
    if foreign:
        raise PredictError(
            f"{path} holds {len(foreign)} id(s) not in split {split!r} (e.g. {foreign[0]!r}): it belongs to "
            "another split or data set; pick another --output_dir or pass --overwrite"
        )
    return first_per_id(data)


def first_per_id(predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for p in predictions:
        seen.setdefault(p["id"], p)
    return list(seen.values())


def _check_not_stale(pred_path: Path, spec: ModelSpec) -> None:
    """Refuse to resume predictions of weights that have changed since (a retrained run in the same dir)."""
    model_dir = Path(spec.model)
    if not model_dir.is_dir():
        return
    weights = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]
    newer = [p for p in weights if p.stat().st_mtime > pred_path.stat().st_mtime]
    if newer:
        raise PredictError(
            f"{pred_path} is older than {newer[0]} (retrained since?): pass --overwrite to predict again "
            "instead of mixing two models' predictions"
        )


def _answer_key(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"  # nan != nan: would never agree with itself
    return value


def vote(runs: Sequence[Execution]) -> int:
    """Self-consistency: the index of the first sample carrying the most frequent executed answer.

    Invalid samples do not vote; ties go to the answer seen first; when every sample is invalid, sample 0.
    """
    counts: dict[Any, int] = {}
    first: dict[Any, int] = {}
    for i, run in enumerate(runs):
        if run.invalid or run.value is None:
            continue
        key = _answer_key(run.value)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return 0
    best = max(counts, key=lambda k: (counts[k], -first[k]))
    return first[best]


def make_entry(example_id: str, texts: Sequence[str], table: Sequence[Sequence[str]]) -> dict[str, Any]:
    """One official-format prediction from the generated text(s); several texts are voted on."""
    programs = [parse_generation(t) for t in texts]
    if len(texts) == 1:
        return {"id": example_id, "predicted": programs[0], "raw": texts[0]}
    runs = [execute(p, table) for p in programs]
    chosen = vote(runs)
    answers = [None if r.invalid else _answer_key(r.value) for r in runs]
    return {
        "id": example_id,
        "predicted": programs[chosen],
        "raw": texts[chosen],
        "samples": list(texts),
        "answers": answers,
    }


# --------------------------------------------------------------------------------------------- generation


def load_model(settings: Settings, args: PredictArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch

    from . import modeling

    spec = settings.spec
    kwargs: dict[str, Any] = {"dtype": args.dtype, "load_in_4bit": settings.load_in_4bit}
    if settings.load_in_4bit:  # as the adapter was trained (a 4-bit base differs with the quantization)
        quant = settings.quantization()
        kwargs.update(quant_type=quant["bnb_4bit_quant_type"], double_quant=quant["use_bnb_nested_quant"])
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    source = modeling.resolve_source(spec.load_from, spec.gguf_file)
    adapter_dir = Path(spec.model) if spec.kind == "adapter" else None
    # Training saves the tokenizer it used (chat template, pad token) beside the adapter: only that one loads.
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = modeling.load_tokenizer(modeling.ModelSource("local", str(adapter_dir)))
    else:
        tokenizer = modeling.load_tokenizer(source)
    model = modeling.load_model(source, **kwargs)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if args.merge_in_memory and not settings.load_in_4bit:  # merging into NF4 would round the weights
            model = model.merge_and_unload()
    modeling.sync_special_tokens(_base_model(model), tokenizer)
    model.eval()
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    return model, tokenizer


def build_prompts(examples: Sequence[dict], tokenizer: Any, settings: Settings) -> list[list[int]]:
    """Chat-templated prompt token ids (assistant header appended), one list per example."""
    from .prompts import format_split, prompt_token_ids

    train = load_split(settings.data_dir, "train") if settings.eg_k else None
    try:
        records = format_split(
            examples,
            context=settings.context,
            eg_k=settings.eg_k,
            train_examples=train,
            tokenizer=tokenizer,
            max_prompt_tokens=settings.max_prompt_tokens,
            trim="question",  # never trim by the gold facts
            return_ids=True,  # measuring the prompts tokenized them: keep those ids
        )
    except ValueError as err:
        raise PredictError(err) from None
    # Only trimmed prompts (or all, without a budget) still need tokenizing.
    todo = [i for i, r in enumerate(records) if r["prompt_ids"] is None]
    for i, ids in zip(todo, prompt_token_ids(tokenizer, [records[i]["prompt"] for i in todo]), strict=True):
        records[i]["prompt_ids"] = ids
    return [r["prompt_ids"] for r in records]


def token_budget(model: Any, args: PredictArguments) -> int:
    """Tokens (rows x (prompt + new)) per batch: a share of the GPU memory the model leaves, over (KV cache +
    prefill activations) per token.

    The memory the model leaves (total less this process's tensors) is the same for every run of a model on a
    kind of GPU, where free memory also varies with the CUDA context and the allocator's cache; so one GPU and
    several plan the same batches (see `plan_batches`). Only on a GPU that another process shares is the
    budget taken from free memory."""
    import torch

    if args.max_batch_tokens:
        return args.max_batch_tokens
    if not torch.cuda.is_available():
        return CPU_TOKEN_BUDGET
    free, total = torch.cuda.mem_get_info()
    room = total - torch.cuda.memory_allocated()  # the allocator's cache (from loading) is ours to reuse
    others = total - free - torch.cuda.memory_reserved()  # the CUDA context, and any other process
    if others > SHARED_GPU_SLACK:
        logger.warning(
            "the GPU is shared (%.1f GiB held outside this process's tensors): batches are sized from free "
            "memory, so another run may batch, and round, differently",
            others / 2**30,
        )
        room = free
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = 2 * cfg.num_hidden_layers * getattr(cfg, "num_key_value_heads", heads) * head_dim
    activations = 4 * cfg.hidden_size + 3 * cfg.intermediate_size  # one layer's prefill peak, per token
    elem = 2 if model.dtype in (torch.bfloat16, torch.float16) else 4
    share = 0.5 if args.memory_fraction is None else args.memory_fraction
    return max(1024, int(share * room / ((kv + activations) * elem)))


def rows_per_call(args: PredictArguments) -> int | None:
    """--batch_size; for auto, None (rows from the token budget) in batched mode, and a chunk of prompts in
    continuous mode, which sizes its own cache: the chunks are where predictions are saved (resume)."""
    if args.batch_size != "auto":
        return int(args.batch_size)
    return CONTINUOUS_CHUNK if args.generation == "continuous" else None


def row_tokens(longest_prompt: int, max_new_tokens: int, num_samples: int) -> int:
    """What one row of a batch costs in tokens: left padding makes every row as long as the batch's longest
    prompt, plus the new tokens, once per sample."""
    return (longest_prompt + max_new_tokens) * num_samples


def next_batch(
    pending: Sequence[int],
    lengths: Sequence[int],
    *,
    rows_cap: int | None,
    budget: int,
    max_new_tokens: int,
    num_samples: int,
) -> int:
    """How many of `pending` (longest first) go into the next batch; at least one."""
    if rows_cap is not None:
        return min(rows_cap, len(pending))
    n = max(1, budget // row_tokens(lengths[pending[0]], max_new_tokens, num_samples))
    return min(n, len(pending), max(1, MAX_BATCH_ROWS // num_samples))


class Generator:
    """Batched, left-padded generation that stops at the end-of-turn token."""

    def __init__(self, model: Any, tokenizer: Any, args: PredictArguments, settings: Settings) -> None:
        from .modeling import end_of_turn_token

        self.model, self.tokenizer, self.args = model, tokenizer, args
        eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.kwargs: dict[str, Any] = {
            "max_new_tokens": args.max_new_tokens,
            "do_sample": settings.do_sample,
            "num_return_sequences": settings.num_samples,
            "eos_token_id": list(dict.fromkeys([eot, *eos])),
            "pad_token_id": tokenizer.pad_token_id,
            "use_cache": True,
        }
        if args.cache_implementation:
            self.kwargs["cache_implementation"] = args.cache_implementation
        if not args.compile_decoding:
            self.kwargs["disable_compile"] = True
        self._prefix: tuple[tuple[int, ...], Any] | None = None  # (shared prefix, its KV cache)
        own = getattr(model.generation_config, "cache_implementation", None)
        if args.shared_prefix == "true" and own:  # e.g. Gemma's hybrid cache: generate refuses a dynamic one
            raise PredictError(
                f"--shared_prefix true hands generate a dynamic KV cache, but this model's generation config "
                f"asks for cache_implementation={own!r}: pass --shared_prefix false"
            )
        # auto: wherever generate takes the dynamic cache it is handed (validate() refused `true` elsewhere)
        batched = args.generation == "batched" and not args.cache_implementation and not own
        self.shared_prefix = args.shared_prefix == "true" or (args.shared_prefix == "auto" and batched)
        if settings.do_sample:
            self.kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=None)
        else:  # instruct models ship sampling defaults (Llama 3: T=0.6, p=0.9) that greedy must not inherit
            self.kwargs.update(temperature=None, top_p=None, top_k=None)

    def __call__(self, prompts: Sequence[Sequence[int]], ids: Sequence[str]) -> list[list[str]]:
        import torch

        if self.kwargs["do_sample"]:
            # Seeded from the batch's ids: a batch samples the same programs whatever ran before it (resume).
            # torch.manual_seed seeds every device; generate draws from torch alone. (transformers.set_seed
            # would do the same and more, but importing it pulls in the trainer stack: 1.5 s on a cold start.)
            torch.manual_seed(self.args.seed + zlib.crc32("\n".join(ids).encode()) % 1_000_003)
        if self.args.generation == "continuous":
            texts = self.tokenizer.batch_decode(self.continuous(prompts), skip_special_tokens=True)
            return [[t.strip()] for t in texts]
        n = self.kwargs["num_return_sequences"]
        start = self.shared_start(prompts) if self.shared_prefix else 0
        with torch.inference_mode(), cudnn_attention(self.model, self.args.cudnn_attention):
            if start:
                enc = prefix_and_left_pad(prompts, start, self.tokenizer.pad_token_id, self.model.device)
                cache = self.prefix_cache(prompts[0][:start], rows=len(prompts) * n)
                out = self.model.generate(**enc, cache=cache, **self.kwargs)
            else:
                enc = left_pad(prompts, self.tokenizer.pad_token_id, self.model.device)
                out = self.model.generate(**enc, **self.kwargs)
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return [[t.strip() for t in texts[i * n : (i + 1) * n]] for i in range(len(prompts))]

    def shared_start(self, prompts: Sequence[Sequence[int]]) -> int:
        """How many leading tokens of this batch's prompts come from a prefix cache: the one already cached
        when every prompt starts with it and it is not much shorter than what they share (no new forward for
        a few more shared tokens), else what they share; a lone prompt only reuses the cached one."""
        shared = shared_prefix_length(prompts)
        if self._prefix is not None:
            cached = self._prefix[0]
            fits = all(len(p) > len(cached) and tuple(p[: len(cached)]) == cached for p in prompts)
            if fits and len(cached) >= shared - MIN_SHARED_PREFIX:
                return len(cached)
        return shared if len(prompts) > 1 else 0

    def prefix_cache(self, prefix: Sequence[int], rows: int) -> Any:
        """The KV cache of `prefix`, computed once (a batch of one) and kept while the batches share it, as a
        fresh cache of `rows` identical rows: generate extends the cache it is given."""
        import torch

        key = tuple(prefix)
        if self._prefix is None or self._prefix[0] != key:
            ids = torch.tensor([prefix], dtype=torch.long, device=self.model.device)
            # logits_to_keep=1: only the cache is wanted, not a vocabulary-wide row per prefix token
            self._prefix = (key, self.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache)
        cache = copy.deepcopy(self._prefix[1])
        cache.batch_repeat_interleave(rows)
        return cache

    def continuous(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """The generated ids of each prompt through transformers' continuous batching: one scheduler over all
        the prompts, a paged KV cache with no padding, and a finished row's place taken by the next prompt."""
        import torch
        from transformers import GenerationConfig

        keys = ("max_new_tokens", "eos_token_id", "pad_token_id", "do_sample")
        config = GenerationConfig(**{k: self.kwargs[k] for k in keys})
        with torch.inference_mode():
            out = self.model.generate_batch([list(p) for p in prompts], generation_config=config)
        # Results arrive as they finish; request ids ("req_<n>") count up in the order the prompts were added.
        results = sorted(out.values(), key=lambda r: int(r.request_id.rsplit("_", 1)[-1]))
        failed = [r.error for r in results if r.error]
        if len(results) != len(prompts) or failed:
            why = failed[0] if failed else f"{len(results)} results for {len(prompts)} prompts"
            raise PredictError(f"continuous batching failed: {why}")
        return [list(r.generated_tokens) for r in results]


def _static_caches() -> tuple[str, ...]:
    """The cache implementations whose decoding step transformers compiles (only these)."""
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

    return tuple(ALL_STATIC_CACHE_IMPLEMENTATIONS)


@contextmanager
def cudnn_attention(model: Any, where: str) -> Iterator[None]:
    """Allow sdpa's cuDNN kernel always, never, or only in the forwards of more than one new token (prefill).
    Measured on an H100 (results/speed-notes.md): with cuDNN, each decoding step of a fresh process paid a
    one-time cost for its new key length (most likely cuDNN building a plan; 1B bench: 4.6 s of 22.2 s);
    without cuDNN, prefill was 1.8 s slower."""
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    hook = None
    if where == "never":
        torch.backends.cuda.enable_cudnn_sdp(False)
    elif where == "prefill":
        # A global switch flipped by the model's own forward: generate runs prefill and decoding steps
        # through it, and the context (not a per-layer check) keeps the attention code untouched.
        inner = _base_model(model)

        def switch(_module: Any, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            torch.backends.cuda.enable_cudnn_sdp(before and ids is not None and ids.shape[1] > 1)

        hook = inner.register_forward_pre_hook(switch, with_kwargs=True)
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        torch.backends.cuda.enable_cudnn_sdp(before)


def _liger_supports(model: Any) -> bool:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return getattr(getattr(model, "config", None), "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN


def _base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_liger(model: Any, setting: str) -> bool:
    """Whether --liger_kernel (auto/true/false) puts Liger's kernels into this loaded model. `true` was
    checked before loading (liger-kernel installed, a GPU there); the model's family is known only now.
    `auto` leaves 4-bit bases alone, as training does until it is timed there."""
    from .modeling import liger_installed

    if setting == "false":
        return False
    base = _base_model(model)
    if setting == "auto":
        on_cuda = getattr(getattr(base, "device", None), "type", None) == "cuda"
        four_bit = getattr(base, "is_loaded_in_4bit", False)
        return on_cuda and not four_bit and liger_installed() and _liger_supports(base)
    if not _liger_supports(base):
        kind = getattr(getattr(base, "config", None), "model_type", None)
        raise PredictError(f"--liger_kernel true: liger-kernel has no kernels for model type {kind!r}")
    return True


@contextmanager
def liger_kernels(model: Any, apply: Any = None) -> Iterator[None]:
    """Swap the model's RMSNorm, RoPE and SwiGLU for Liger's fused Triton kernels while inside. In an H100
    profile of 1B prefill (results/bench-2026-11-26-h100-profile-1b-prefill.txt), the unfused elementwise
    ops (mul, copy_, cat, add, pow, silu, mean, neg) took about 4 s of the GPU's 11 s, as much as the matrix
    products. The modeling module's globals that Liger rebinds are put back on exit."""
    from .modeling import stock_modeling_code

    base = _base_model(model)
    with stock_modeling_code():
        no_loss = {"cross_entropy": False, "fused_linear_cross_entropy": False}  # generation computes no loss
        if apply is None:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance as apply  # picks the family

        apply(model=base, rope=True, rms_norm=True, swiglu=True, **no_loss)
        yield


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: Any) -> dict[str, Any]:
    """input_ids / attention_mask, padded on the left to the longest prompt. tokenizer.pad does the same
    through Python lists of lists: 0.1 s per batch of 256 long prompts, against milliseconds here."""
    import torch

    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, longest - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[row, longest - len(p) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `prompts` share, leaving each at least one of its own (generate must run
    something per row); 0 when under MIN_SHARED_PREFIX, too few to be worth a forward of their own."""
    n = min(len(os.path.commonprefix([list(p) for p in prompts])), min(len(p) for p in prompts) - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def prefix_and_left_pad(
    prompts: Sequence[Sequence[int]], start: int, pad_id: int, device: Any
) -> dict[str, Any]:
    """input_ids / attention_mask of prompts sharing their first `start` tokens: those tokens, then each rest
    left-padded to the longest rest. The padding sits between the prefix and the rest; the mask hides it and
    the positions count unmasked tokens, so every row is computed as it would be unpadded."""
    import torch

    rest = left_pad([p[start:] for p in prompts], pad_id, device)
    rows = len(prompts)
    prefix = torch.tensor(prompts[0][:start], dtype=torch.long, device=device).expand(rows, start)
    ones = torch.ones((rows, start), dtype=torch.long, device=device)
    return {
        "input_ids": torch.cat([prefix, rest["input_ids"]], dim=1),
        "attention_mask": torch.cat([ones, rest["attention_mask"]], dim=1),
    }


def longest_first(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The generation order: longest prompt first (an OOM shows at once), ties in input order."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def plan_batches(
    prompts: Sequence[Sequence[int]],
    *,
    rows_cap: int | None,
    budget: int,
    max_new_tokens: int,
    num_samples: int,
) -> list[list[int]]:
    """The batches one process generates, in order: longest prompts first, each batch within the budget."""
    lengths = [len(p) for p in prompts]
    pending = longest_first(prompts)
    batches = []
    while pending:
        n = next_batch(
            pending,
            lengths,
            rows_cap=rows_cap,
            budget=budget,
            max_new_tokens=max_new_tokens,
            num_samples=num_samples,
        )
        batches.append(pending[:n])
        pending = pending[n:]
    return batches


def deal_batches(
    batches: Sequence[list[int]], prompts: Sequence[Sequence[int]], world: int, max_new_tokens: int
) -> list[list[list[int]]]:
    """Whole batches to `world` ranks, each to the rank with the fewest padded tokens so far (ties: lowest).

    Whole batches rather than every world-th example: a row's numbers depend on its batch (its padding, its
    shared prefix, the kernels chosen for its shape), so only the same batches make several GPUs write what
    one writes. The price: a run with fewer batches than ranks leaves ranks idle."""
    hands: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0] * world
    for batch in batches:
        rank = min(range(world), key=lambda r: load[r])
        hands[rank].append(batch)
        load[rank] += len(batch) * row_tokens(len(prompts[batch[0]]), max_new_tokens, 1)  # longest first
    return hands


def generate_all(
    generate: Any,
    prompts: Sequence[Sequence[int]],
    ids: Sequence[str],
    batches: Sequence[list[int]],
    *,
    max_new_tokens: int,
    num_samples: int,
    on_batch: Any,
    progress: bool = True,
) -> None:
    """Generate `batches` (lists of indices, longest prompt first) in order. On CUDA OOM, halve the batch and
    retry, and split every later batch that is bigger than the halved one's tokens."""
    import torch
    from tqdm.auto import tqdm

    def tokens(chunk: list[int], rows: int) -> int:
        return rows * row_tokens(len(prompts[chunk[0]]), max_new_tokens, num_samples)

    queue = [list(b) for b in reversed(batches)]  # popped from the end: the first batch first
    ceiling: int | None = None  # after an OOM: half the tokens of the batch that did not fit
    bar = tqdm(total=sum(map(len, batches)), desc="generating", unit="ex", disable=None if progress else True)
    try:
        while queue:
            chunk = queue.pop()
            if ceiling is not None and tokens(chunk, len(chunk)) > ceiling and len(chunk) > 1:
                n = max(1, ceiling // tokens(chunk, 1))
                queue.append(chunk[n:])
                chunk = chunk[:n]
            try:
                texts = generate([prompts[i] for i in chunk], [ids[i] for i in chunk])
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                texts = None  # free the failed batch's tensors (held by the traceback) before retrying
            if texts is None:
                torch.cuda.empty_cache()
                half = len(chunk) // 2
                ceiling = tokens(chunk, half)
                logger.warning("out of memory at %d prompts per batch: retrying with %d", len(chunk), half)
                queue.append(chunk)
                continue
            on_batch(chunk, texts)
            bar.update(len(chunk))
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Ranks:
    """This process's place among those torchrun / accelerate launch started (they set these variables)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """torch.distributed among the ranks, each on its own GPU; nothing for a single process."""
    if ranks.world == 1:
        yield
        return
    import torch
    import torch.distributed as dist

    from .modeling import import_before_process_group

    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)  # load_model puts the model on the current device
    # first, or the group outlives destroy_process_group (import_before_process_group says why); DeepSpeed
    # is left out: predict never loads it
    import_before_process_group(deepspeed=False)
    # Only barriers and a few small objects cross processes, which gloo does on GPU machines too (no NCCL
    # communicator or watchdog). Ranks wait for the slowest one, hence the long timeout; a rank that fails
    # does not leave the others hanging: the launcher ends them.
    dist.init_process_group("gloo", timeout=timedelta(hours=6))
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may never reach it
        raise
    # Every rank is done with the group before any tears it down. (The aborts at exit seen before this barrier
    # was added, 1 CPU run in ~17, most likely came from the group outliving destroy_process_group: see
    # import_before_process_group.)
    dist.barrier()
    dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def smallest(ranks: Ranks, value: int) -> int:
    """The smallest of every rank's `value`, on every rank."""
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return min(values)


def gather(ranks: Ranks, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on rank 0 ([] elsewhere); rank 0 has waited for all of them."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * ranks.world if ranks.main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


# ------------------------------------------------------------------------------------------------- run


def select_examples(args: PredictArguments) -> tuple[Settings, list[dict], list[dict]]:
    """The run's settings, its split, and what is evaluated: the split or its first --limit examples (then
    the settings name files `*_first<N>`, so a partial run never replaces the whole split's files)."""
    settings = resolve_settings(args)
    all_examples = load_split(settings.data_dir, settings.split)
    if not all_examples:
        raise PredictError(f"split {settings.split!r} in {settings.data_dir} has no examples")
    examples = all_examples[: args.limit] if args.limit else all_examples
    if len(examples) < len(all_examples):
        settings = settings.first(len(examples))
    return settings, all_examples, examples


def predict(args: PredictArguments, ranks: Ranks | None = None) -> tuple[Settings, dict[str, Any] | None]:
    """The whole run; returns the settings and metrics (None for an unlabelled split, and on ranks other
    than 0). Raises PredictError."""
    ranks = ranks or Ranks.from_env()
    settings, all_examples, examples = select_examples(args)
    pred_path = settings.path("predictions")
    shards = settings.shards()
    existing: list[dict[str, Any]] = []
    if not args.overwrite:  # the merged predictions, then what the shards of an interrupted run hold
        split_ids = {e["id"] for e in all_examples}
        for path in [pred_path, *shards]:
            found = load_existing(path, split_ids, settings.split)
            if found:
                _check_not_stale(path, settings.spec)
            existing.extend(found)
        existing = first_per_id(existing)
    if existing:
        _check_same_settings(settings, args)
    done = {p["id"] for p in existing}
    todo = [e for e in examples if e["id"] not in done]
    logger.info(
        "%s on %s/%s: %d examples, %d already in %s%s",
        settings.spec.model,
        settings.data_dir,
        settings.split,
        len(examples),
        len(examples) - len(todo),
        pred_path,
        f" and {len(shards)} shard(s)" if shards else "",
    )

    # Every rank has checked its input by now, so bad input stops each of them before any waits for another.
    with process_group(ranks):
        predictions, run_info = _predict_pending(settings, args, ranks, todo, existing, shards)
    if predictions is None:  # not rank 0: its share is in rank 0's hands
        return settings, None

    if not all("program" in e.get("qa", {}) and "exe_ans" in e.get("qa", {}) for e in examples):
        logger.info("split %r is unlabelled: predictions in %s, nothing to score", settings.split, pred_path)
        return settings, None
    wanted = {e["id"]: i for i, e in enumerate(examples)}
    scored = sorted((p for p in predictions if p["id"] in wanted), key=lambda p: wanted[p["id"]])
    metrics, details = score(scored, examples)
    raw = {p["id"]: p.get("raw") for p in scored}
    for d in details:
        d["raw"] = raw.get(d["id"])
    if not todo and settings.path("metrics").is_file():  # nothing generated now: keep the last run's info
        old = _read_json(settings.path("metrics"))
        run_info = {k: old[k] for k in RUN_INFO_KEYS if isinstance(old, dict) and k in old}
        run_info["quant"] = known_quant(old) if isinstance(old, dict) else None
    quant = run_info.get("quant") or quant_label(settings, run_info.get("dtype", args.dtype or "auto"))
    metrics.update(
        **recorded_settings(settings, args),
        batch_size=args.batch_size,
        tag=settings.tag,
        quant=quant,
        **{k: run_info.get(k) for k in RUN_INFO_KEYS},
    )
    write_json_atomic(settings.path("details"), details)
    write_json_atomic(settings.path("metrics"), metrics)
    settings.path("settings").unlink(missing_ok=True)  # the metrics record them now
    return settings, metrics


def recorded_settings(settings: Settings, args: PredictArguments) -> dict[str, Any]:
    """The setup that metrics record: model, data and the settings the predictions were generated with."""
    spec = settings.spec
    return {
        "model": spec.model,
        "adapter": spec.adapter,
        "base": spec.load_from if spec.kind == "adapter" else spec.recipe.get("model_name_or_path"),
        "recipe": spec.recipe.get("recipe"),
        "method": method_label(spec, settings.eg_k),
        "split": settings.split,
        "data_dir": str(settings.data_dir),
        "eg_k": settings.eg_k,
        "context": settings.context,
        "max_prompt_tokens": settings.max_prompt_tokens,
        "decoding": "sample" if settings.do_sample else "greedy",
        "num_samples": settings.num_samples,
        "temperature": args.temperature if settings.do_sample else None,
        "top_p": args.top_p if settings.do_sample else None,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "generation": args.generation,
    }


# Recorded settings that change what is generated (the seed only when sampling); quant is compared apart.
GENERATION_KEYS = (
    "model",
    "base",
    "eg_k",
    "context",
    "max_prompt_tokens",
    "decoding",
    "num_samples",
    "temperature",
    "top_p",
    "seed",
    "max_new_tokens",
)


def _check_same_settings(settings: Settings, args: PredictArguments) -> None:
    """Refuse to resume or rescore predictions that other generation settings made, as metrics_<tag>.json
    records them, or settings_<tag>.json for a run interrupted before its metrics (neither: nothing to
    compare). The dtype is compared when --dtype names one."""
    path = next((p for p in (settings.path("metrics"), settings.path("settings")) if p.is_file()), None)
    old = _read_json(path) if path is not None else None
    if not isinstance(old, dict):
        return
    new = recorded_settings(settings, args)
    differ = []
    for key in GENERATION_KEYS:
        if key not in old or (key == "seed" and not settings.do_sample):
            continue
        was, now = old[key], new[key]
        if key in ("model", "base") and was and now:
            same = same_model(str(was), str(now))
        else:
            same = was == now
        if not same:
            differ.append(f"{key} {was} (now {now})")
    was = known_quant(old)
    if was and was != "auto":  # "auto": a rescore wrote it before the dtype was recorded
        if settings.load_in_4bit:
            now = quant_label(settings, None)
        elif args.dtype and args.dtype != "auto":
            from .modeling import to_dtype

            now = quant_label(settings, to_dtype(args.dtype))
        else:
            now = None  # the default dtype is known once loaded; whether 4-bit is known now
        if now != was and (now is not None or was.startswith("4-bit")):
            differ.append(f"quant {was} (now {now or 'not 4-bit'})")
    if differ:
        raise PredictError(
            f"the predictions in {settings.path('predictions')} were generated with other settings than now "
            f"({'; '.join(differ)}; see {path}): rerun with those, or pass --overwrite to predict again"
        )


RUN_INFO_KEYS = (
    "dtype",
    "device",
    "num_processes",
    "n_generated",
    "load_seconds",
    "generation_seconds",
    "examples_per_s",
    "seconds_per_example",
    "max_batch_tokens",
    "batches",
    "largest_batch",
    "liger_kernel",
    "shared_prefix",
    "peak_gpu_memory_gib",
)


def _predict_pending(
    settings: Settings,
    args: PredictArguments,
    ranks: Ranks,
    todo: list[dict],
    existing: list[dict],
    shards: list[Path],
) -> tuple[list[dict] | None, dict[str, Any]]:
    """Generate `todo` on all ranks. Rank 0 returns every prediction (`existing` first) in the one file, and
    the run's device/timing info; other ranks return (None, {})."""
    pred_path = settings.path("predictions")
    barrier(ranks)  # every rank has read the old predictions before rank 0 rewrites them
    loaded = _load(settings, args, todo) if todo else None
    if ranks.main and (shards or args.overwrite):
        # Fold an interrupted run's shards into the one file (or, with --overwrite, drop the old predictions)
        # before this run writes shards of the same names, and so that a crash cannot mix the two runs (nor
        # leave the old predictions beside the new run's settings file).
        write_json_atomic(pred_path, existing)
        for path in shards:
            path.unlink()
    if ranks.main and not existing:  # a new run: the old metrics no longer describe the predictions on disk
        settings.path("metrics").unlink(missing_ok=True)
        if loaded is not None:
            # Until its metrics exist, this file is what vouches for the settings of an interrupted run.
            model = loaded[0]
            recorded = {**recorded_settings(settings, args), "quant": quant_label(settings, model.dtype)}
            write_json_atomic(settings.path("settings"), recorded)
    barrier(ranks)
    predictions = list(existing)
    if loaded is None:  # all done before: `existing` came from pred_path, or rank 0 just wrote it there
        return (predictions if ranks.main else None), {}

    model, tokenizer, prompts, load_s = loaded
    rows_cap = rows_per_call(args)
    # every rank plans with the same budget (none is needed for a fixed number of rows)
    budget = 0 if rows_cap is not None else smallest(ranks, token_budget(model, args))
    batches = plan_batches(
        prompts,
        rows_cap=rows_cap,
        budget=budget,
        max_new_tokens=args.max_new_tokens,
        num_samples=settings.num_samples,
    )
    order = [i for batch in batches for i in batch]  # the order one process generates (and writes) them in
    alone = ranks.world == 1
    info = _generate(
        settings,
        args,
        model,
        tokenizer,
        todo,
        prompts,
        deal_batches(batches, prompts, ranks.world, args.max_new_tokens)[ranks.rank],
        budget,
        predictions if alone else [],
        pred_path if alone else settings.shard(ranks.rank),
        progress=ranks.main,
    )
    info["load_seconds"] = round(load_s, 2)
    infos = gather(ranks, info)  # once rank 0 has every rank's info, every shard is complete
    if not ranks.main:
        return None, {}
    if not alone:
        new: dict[str, dict] = {}
        for rank in range(ranks.world):
            if settings.shard(rank).is_file():  # a rank with nothing to do writes none
                new.update((p["id"], p) for p in _read_json(settings.shard(rank)))
        predictions += [new[todo[i]["id"]] for i in order]
        write_json_atomic(pred_path, predictions)
        for rank in range(ranks.world):
            settings.shard(rank).unlink(missing_ok=True)
    return predictions, _combine_run_info(infos)


def _combine_run_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's info from each rank's: the ranks ran side by side, so the run took the slowest one's time."""
    if len(infos) == 1:
        return infos[0]
    n = sum(i["n_generated"] for i in infos)
    gen_s = max(i["generation_seconds"] for i in infos)
    peaks = [i["peak_gpu_memory_gib"] for i in infos if i["peak_gpu_memory_gib"] is not None]
    return {
        **infos[0],
        "device": ", ".join(dict.fromkeys(i["device"] for i in infos)),
        "num_processes": len(infos),
        "n_generated": n,
        "batches": sum(i["batches"] for i in infos),
        "largest_batch": max(i["largest_batch"] for i in infos),
        "load_seconds": max(i["load_seconds"] for i in infos),
        "generation_seconds": gen_s,
        "examples_per_s": round(n / gen_s, 3) if gen_s > 0 else None,
        "seconds_per_example": round(gen_s / n, 4) if n else None,
        "peak_gpu_memory_gib": max(peaks) if peaks else None,
    }


def _load(
    settings: Settings, args: PredictArguments, todo: list[dict]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[list[int]], float]:
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_model(settings, args)
    except (OSError, ValueError) as err:  # e.g. a Hub id that does not exist, or no network to fetch it
        raise PredictError(f"cannot load {settings.spec.load_from}: {one_line(err)}") from None
    load_s = time.perf_counter() - t0
    return model, tokenizer, build_prompts(todo, tokenizer, settings), load_s


def _generate(
    settings: Settings,
    args: PredictArguments,
    model: Any,
    tokenizer: Any,
    todo: list[dict],
    prompts: list[list[int]],
    batches: list[list[int]],
    budget: int,
    predictions: list[dict],
    out_path: Path,
    *,
    progress: bool,
) -> dict[str, Any]:
    """Generate `batches` (indices into `todo`), appending to `predictions` and checkpointing them to
    `out_path`; returns device/timing info."""
    generate = Generator(model, tokenizer, args, settings)
    ids = [e["id"] for e in todo]
    tables = {e["id"]: e.get("table", []) for e in todo}
    n_before = len(predictions)
    done_batches = 0
    largest = 0

    def on_batch(chunk: list[int], texts: list[list[str]]) -> None:
        nonlocal done_batches, largest
        largest = max(largest, len(chunk))
        predictions.extend(make_entry(ids[i], t, tables[ids[i]]) for i, t in zip(chunk, texts, strict=True))
        done_batches += 1
        if done_batches % args.save_every == 0:
            write_json_atomic(out_path, predictions)

    t0 = time.perf_counter()
    try:
        liger = use_liger(model, args.liger_kernel)
        with liger_kernels(model) if liger else nullcontext():
            generate_all(
                generate,
                prompts,
                ids,
                batches,
                max_new_tokens=args.max_new_tokens,
                num_samples=settings.num_samples,
                on_batch=on_batch,
                progress=progress,
            )
    finally:  # Ctrl-C or a crash: keep every finished batch
        if len(predictions) > n_before:
            write_json_atomic(out_path, predictions)
    gen_s = time.perf_counter() - t0
    n = len(predictions) - n_before
    from .modeling import peak_gpu_memory_gib

    return {
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "num_processes": 1,
        "n_generated": n,
        "generation_seconds": round(gen_s, 3),
        "examples_per_s": round(n / gen_s, 3) if gen_s > 0 else None,
        "seconds_per_example": round(gen_s / n, 4) if n else None,
        "max_batch_tokens": budget if args.batch_size == "auto" and args.generation == "batched" else None,
        "batches": done_batches,
        "largest_batch": largest,
        "liger_kernel": liger,
        "shared_prefix": generate.shared_prefix,
        "peak_gpu_memory_gib": peak_gpu_memory_gib(),
    }


def _summary(metrics: dict[str, Any], path: Path) -> str:
    speed = f", {metrics['examples_per_s']} ex/s" if metrics.get("examples_per_s") else ""
    return (
        f"{metrics['split']}: exe_acc {metrics['exe_acc']:.4f}  prog_acc {metrics['prog_acc']:.4f}  "
        f"invalid {metrics['invalid']:.4f}  (n={metrics['n']}{speed}) -> {path}"
    )


def compare_with_greedy(settings: Settings, metrics: dict[str, Any]) -> str | None:
    """Greedy vs self-consistency, side by side, when the greedy run of the same setup exists."""
    greedy_tag = re.sub(r"_(sc\d+|sample)$", "", settings.tag)
    greedy_file = settings.output_dir / f"metrics_{greedy_tag}.json"
    if greedy_tag == settings.tag or not greedy_file.is_file():
        return None
    try:
        greedy = json.loads(greedy_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    rows = [("greedy", greedy), (f"self-consistency x{settings.num_samples}", metrics)]
    lines = ["| decoding | exe_acc | prog_acc | invalid | n |", "| --- | --- | --- | --- | --- |"]
    for name, m in rows:
        lines.append(
            f"| {name} | {m.get('exe_acc', 0):.4f} | {m.get('prog_acc', 0):.4f} | "
            f"{m.get('invalid', 0):.4f} | {m.get('n')} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> PredictArguments:
    from transformers import HfArgumentParser

    class _Parser(HfArgumentParser):
        def error(self, message: str):  # noqa: ANN201 - argparse: one line + exit code 2
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    parser = _Parser(
        PredictArguments, prog="python -m finqa_trl.predict", description=__doc__.split("\n\n")[0]
    )
    args, rest = parser.parse_args_into_dataclasses(
        list(argv) if argv is not None else None, return_remaining_strings=True
    )
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    ranks = Ranks.from_env()
    # Rank 0 reports for all: the other ranks print errors only, not N copies of every log line.
    level = logging.INFO if ranks.main else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)

    if not ranks.main:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        settings, metrics = predict(args, ranks)
    except OneLineError as err:  # every error the user can fix (DataError, ModelError, PredictError, ...)
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every finished batch is already on disk
        print(
            "interrupted: finished predictions are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    if metrics is not None:
        print(_summary(metrics, settings.path("metrics")))
        table = compare_with_greedy(settings, metrics)
        if table:
            print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
