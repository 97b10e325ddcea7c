"""Training and evaluation throughput on Llama-3.2-1B/3B-shaped models: this project's recipes vs plain TRL.

    python -m finqa_trl.bench --data_dir FINQA_DIR --tokenizer LLAMA3_TOKENIZER_DIR
        [--shapes 1b 3b] [--methods lora dora qlora qdora] [--variants trl recipe] [--examples 192]
        [--warmup_examples 48] [--eval] [--out results]

Weights are random (built from the Llama 3.2 configs: the real weights are not needed to time a step), the
tokenizer is Llama 3's and the prompts are real FinQA examples, so every tensor has its real shape. Each
(shape, method, variant) runs in a fresh Python process, as `make train` does (`--same_process`: all in this
one; a later variant then meets batch lengths whose cuDNN attention plans an earlier one built, and runs
faster for that alone: 8,260 first against 15,066 last, the same 1b LoRA recipe on one H100). Its trainer
first trains on `--warmup_examples` untimed (CUDA/cuBLAS start-up, kernel autotuning, allocator growth),
then on `--examples` timed ones. Windows are counted in examples, not optimizer
steps, because a plain-TRL step (batch 4) is a quarter of a recipe step (4 x 4 accumulated): every variant is
timed on about the same amount of data. Tokens/s counts the non-padding tokens of the timed steps only; peak
memory is `torch.cuda.max_memory_allocated` over the whole run (model included), and again over one extra
forward + backward on the variant's longest micro-batch (its worst step in an epoch: the number that compares
two variants' memory, since a short window meets different batches).

* `trl`: plain TRL as a user would write it — `SFTTrainer` defaults on the same prompt/completion data,
  padded batches of 4, gradient checkpointing on, sdpa, the same LoRA/DoRA config and 4-bit base.
* `recipe`: `recipes/<method>-<shape>.yaml` through this project's own training code, exactly as
  `make train` builds it (the data, the model and the trainer), timed the same way.

`--eval` also times `finqa_trl.predict` on 1,147 real prompts (the size of the official test split), 20 new
tokens each (random weights rarely stop earlier), generation plus scoring. Writes
`<out>/bench-<date>-<time>.json` and prints a markdown table. Needs a CUDA GPU, except `--shapes tiny` (a
CPU dry run of every code path).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import json
import lzma
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import OneLineError, one_line
from .report import bench_chart, bench_table
from .score import write_json_atomic

METHODS = ("lora", "dora", "qlora", "qdora")
# Llama-3.2-1B/3B-Instruct's config.json, minus the weights.
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
    },
    # Not a Llama 3.2 size: runs the whole benchmark end to end on a CPU (tests, dry runs before a GPU lease).
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
LLAMA32 = {
    "num_key_value_heads": 8,
    "head_dim": None,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "pad_token_id": 128004,
}
EVAL_EXAMPLES = 1147
BENCH_SPLITS = ("train", "dev", "test")  # every real prompt of the sample trains in the benchmark
# Candidate speed levers, each a set of overrides on top of a recipe, timed as `recipe:<lever>[+<lever>]`
# (results/speed-notes.md holds the prediction and the measured effect of each). None changes the objective:
# same examples, same loss normalisation (TRL divides by the trained tokens of the whole accumulated batch),
# same effective batch of 16. No fused-AdamW lever: it is already transformers 5.24's default optimizer.
LEVERS: dict[str, list[str]] = {
    # The recipes batch by length since 2026-11-25 (8-27% faster in short windows); this times the random
    # batches they had before, and plain TRL has.
    "random_batches": ["--train_sampling_strategy", "random"],
    "no_ckpt": ["--activation_checkpointing", "false"],  # no recomputation in the backward pass
    "bs8": ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2"],
    "bs16": ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1"],
    # Liger's layer kernels (needs liger-kernel): the LoRA and DoRA recipes use them where installed and the
    # layers run eager (FSDP, DeepSpeed, no_compile)
    "liger": ["--liger_kernel", "true"],
    "no_liger": ["--liger_kernel", "false"],
    # torch.compile of each decoder layer's parts (bodies for LoRA since TT) in place (regional: the layers
    # share the graphs); the micro-step is bound by launching kernels (1b LoRA: ~5,000 launches, 146 ms of
    # kernels in ~320 ms per pass). The recipes' default on one GPU or DDP since 2026-11-26 (`compile_layers:
    # auto`), for QDoRA too since machine BB (2026-11-27, with 0.92 of auto's token budget);
    # `no_compile` times eager.
    "compile": ["--compile_layers", "true"],
    "no_compile": ["--compile_layers", "false"],
    # each step's 16 examples in passes of at most 4 x the longest example's unpadded length (each pass
    # counted with its padding: plain TRL's worst batch on the same data), instead of 4 passes of 4: fewer,
    # larger passes where examples are short. The recipes' default on one GPU or DDP since 2026-11-27
    # (`micro_batch_tokens: auto`; padded to 64 until machine W); `no_tokens` times the fixed micro-batches
    "tokens": ["--micro_batch_tokens", "auto"],
    "no_tokens": ["--micro_batch_tokens", "false"],
    # (`tokens<N>`, e.g. `tokens12544`: a budget of N tokens; lever_args reads the number. `keep<N>`: the last
    # N decoder layers without their activation checkpoint, e.g. `tokens4096+keep8`.)
    # The Trainer's check of each training_step's loss for NaN/inf (once a step with the recipes' token
    # passes), which only decides what the logged loss shows (the last good one instead), reads the loss on
    # the host after the backward: a wait for the GPU
    "no_nan_filter": ["--logging_nan_inf_filter", "false"],
    # torch.compile modes for the compiled parts: CUDA graphs per batch shape (failed on an H200 with the
    # recipes' checkpointing and token passes, 2026-11-27: results/speed-notes.md), tuned kernels (not timed)
    "cudagraphs": ["--compile_mode", "reduce-overhead"],
    "autotune": ["--compile_mode", "max-autotune-no-cudagraphs"],
    # inductor's C++ wrapper: the compiled parts launch their kernels from C++, not Python (failed in torch
    # 2.11's inductor on an H200, session 17)
    "cpp_wrapper": ["--compile_mode", "cpp-wrapper"],
    # each whole decoder layer compiled with its activation checkpoint inside the graph: the recomputation
    # runs in the compiled backward instead of calling the compiled parts again from Python (torch 2.11 fails
    # to partition it once the lengths are dynamic: speed-notes Next 9)
    "whole_layer": ["--compile_scope", "layer"],
    # each decoder layer's own forward compiled as one graph beneath its checkpoint (eager around it, as
    # with the parts): one compiled call per layer call instead of four (three with lean_recompute, whose
    # frozen down projection runs outside the graph). The LoRA and QLoRA recipes' default since machine TT
    # (compile_scope auto), so `body` matters for DoRA; `parts` times the four compiled parts (lora-1b's
    # recipe as before TT: `recipe:parts+lean`, lora-1b having lean_recompute off since)
    "body": ["--compile_scope", "body"],
    "parts": ["--compile_scope", "parts"],
    # host waits for the GPU inside each pass: transformers' check of the padding mask before the forward
    # (causal_attention: right-padded rows need only the causal mask), TRL's metric reads between the forward
    # and the backward (defer_metrics: read once per log). The recipes' defaults since machine AA (session 17:
    # 1.04-1.12x with both, results/speed-notes.md), which ran them as the positive levers; the no_ ones time
    # without
    "causal_attention": ["--causal_attention", "true"],
    "defer_metrics": ["--defer_metrics", "true"],
    "no_causal_attention": ["--causal_attention", "false"],
    "no_defer_metrics": ["--defer_metrics", "false"],
    # the Trainer's torch_compile: the whole model as one graph (was `compile` until 2026-11-26; machine D was
    # cut off while it compiled)
    "compile_model": ["--torch_compile", "true"],
    # 4-bit bases: embeddings/norms/LM head kept in bf16 (plain TRL's choice) rather than PEFT's fp32 upcast.
    # The 4-bit recipes' default since 2026-11-26 (so `no_upcast` = `recipe` now, kept so that machine D's
    # commands rerun as written); `upcast` times the fp32 upcast they had before.
    "no_upcast": ["--kbit_fp32_upcast", "false"],
    "upcast": ["--kbit_fp32_upcast", "true"],
    # 16-bit bases: LoRA A/B in bf16 like TRL's 4-bit adapters (on the H100, 1b QLoRA ran at 1.5x 1b LoRA)
    "bf16_adapters": ["--adapters_in_compute_dtype", "true"],
    # 16-bit bases: fp32 adapters, the input not copied to fp32 (autocast computes the same matmuls): what
    # the recipes' `adapter_input_cast: auto` does since 2026-11-26; `input_cast` times PEFT's copy as before
    "no_input_cast": ["--adapter_input_cast", "false"],
    "input_cast": ["--adapter_input_cast", "true"],
    # Fewer distinct batch shapes (at most one per 64 tokens of length): cuDNN's attention builds a plan per
    # new shape, and a first epoch of length-grouped batches meets a new one at most steps. Padding is masked.
    "pad64": ["--pad_to_multiple_of", "64"],
    "no_pad64": ["--pad_to_multiple_of", "none"],  # the recipes pad to multiples of 64 since 2026-11-26
    "no_cudnn": ["--cudnn_attention", "false"],  # sdpa's flash kernel: no plans to build
    # LoRA's dropout inside A's matmul (a Triton kernel: no dropped-out copy of each adapted layer's input)
    "fused_dropout": ["--lora_dropout_kernel", "true"],
    "no_fused_dropout": ["--lora_dropout_kernel", "false"],
    # each MLP's frozen down projection left out of the checkpoint's recomputation (one matmul per layer and
    # pass fewer: modeling.lean_mlp_recompute); the 16-bit LoRA recipes' default since cc37261
    # (`recipe:no_lean` times without) but lora-1b's, off since machine TT (`lean` times it there and on
    # 4-bit bases, which auto leaves out)
    # fp32 adapters of a bf16 base: A and B from bf16 copies refreshed before each forward, not autocast's
    # cast at each use (one kernel fewer per use: modeling.shadow_adapter_weights); not timed yet
    "weight_copies": ["--adapter_weight_copies", "true"],
    "lean": ["--lean_recompute", "true"],
    "no_lean": ["--lean_recompute", "false"],
}


# Plain TRL as its defaults have it, and with max_length=None: the same examples as the recipes (the "no more
# peak memory" comparison needs equal data).
TRL_VARIANTS = ("trl", "trl:full_length")

# Ways to run the evaluation, each a set of `finqa_trl.predict` flags (`auto`: what `make eval` does).
EVAL_VARIANTS: dict[str, list[str]] = {
    "auto": [],  # length-sorted batches sized from the GPU memory the model leaves, dynamic KV cache
    "static": ["--cache_implementation", "static"],  # static KV cache: transformers compiles the decode step
    # transformers' continuous batching: paged KV cache, no padding, CUDA graphs; chunks of 512 prompts (each
    # call builds its scheduler and cache, and warms up), or all 1,147 in one call
    "continuous": ["--generation", "continuous"],
    "continuous_one_call": ["--generation", "continuous", "--batch_size", str(EVAL_EXAMPLES)],
    # Diagnostic, not a way to evaluate: one new token, so generation_seconds is the prefill (+ one step);
    # `auto` minus this is what the decoding loop costs.
    "prefill": ["--max_new_tokens", "1"],
    # sdpa without cuDNN's attention kernel (flash or memory-efficient): no plan to build per decoding step
    "no_cudnn": ["--cudnn_attention", "never"],
    "prefill_no_cudnn": ["--max_new_tokens", "1", "--cudnn_attention", "never"],
    "cudnn_always": ["--cudnn_attention", "always"],  # the default before 2026-11-26
    # static KV cache (no per-step concatenation) without transformers' automatic compile of the decoding step
    "static_eager": ["--cache_implementation", "static", "--compile_decoding", "false"],
    # Liger's fused RMSNorm/RoPE/SwiGLU kernels (`auto` uses them when liger-kernel is installed), and without
    "liger": ["--liger_kernel", "true"],
    "no_liger": ["--liger_kernel", "false"],
    "prefill_liger": ["--max_new_tokens", "1", "--liger_kernel", "true"],
    "prefill_no_liger": ["--max_new_tokens", "1", "--liger_kernel", "false"],
    # smaller token budgets than the default half of what the model leaves: more batches, each padded less
    "memory_quarter": ["--memory_fraction", "0.25"],
    "memory_eighth": ["--memory_fraction", "0.125"],
    # the prompts' shared system prompt (about a quarter of their tokens) run once per batch, not once per
    # row (`auto` does so since 2026-11-26; H100: 3B 1.6-3.5 s less than 25.1 s), and every token per row
    "shared_prefix": ["--shared_prefix", "true"],
    "no_shared_prefix": ["--shared_prefix", "false"],
    "prefill_shared_prefix": ["--max_new_tokens", "1", "--shared_prefix", "true"],
    "prefill_no_shared_prefix": ["--max_new_tokens", "1", "--shared_prefix", "false"],
    "shared_prefix_memory_quarter": ["--shared_prefix", "true", "--memory_fraction", "0.25"],
}


def _error_text(err: BaseException) -> str:
    """What a failed variant records: "out of memory", else the exception in one line."""
    if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        return "out of memory"
    return f"{type(err).__name__}: {one_line(err, 300)}"


def lever_args(variant: str) -> list[str]:
    """`recipe:liger+bs16` -> the overrides of both levers; `recipe` -> none."""
    _, _, levers = variant.partition(":")
    out: list[str] = []
    for name in filter(None, levers.split("+")):
        budget = re.fullmatch(r"tokens([1-9][0-9]*)", name)
        if budget:
            out += ["--micro_batch_tokens", budget[1]]
            continue
        keep = re.fullmatch(r"keep([1-9][0-9]*)", name)
        if keep:
            out += ["--uncheckpointed_layers", keep[1]]
            continue
        if name not in LEVERS:
            raise SystemExit(f"error: unknown lever {name!r}; known: {', '.join(LEVERS)}, tokens<N>, keep<N>")
        out += LEVERS[name]
    return out


def tokenizer_dir(src: Path, dest: Path) -> Path:
    """The shared Llama 3 tokenizer (tokenizer.json.xz + tokenizer_config.json) as a loadable folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.endswith(".xz"):
            with lzma.open(f) as fin:
                (dest / f.name[:-3]).write_bytes(fin.read())
        elif f.suffix == ".json":
            shutil.copy(f, dest / f.name)
    return dest


def build_shape(shape: str, tok_dir: Path, dest: Path) -> Path:
    """A random-weight Llama-3.2-<shape>-Instruct-shaped model saved in bf16, with the Llama 3 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (dest / "config.json").is_file():
        return dest
    cfg = {**LLAMA32, **SHAPES[shape]}
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = min(cfg["num_key_value_heads"], cfg["num_attention_heads"])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # GPU init: seconds, not minutes
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(dest)
    del model
    _empty_cache()
    return dest


def _cuda() -> bool:
    from .modeling import cuda_available

    return cuda_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def window_steps(examples: int, per_step: int) -> int:
    """Optimizer steps that cover at least `examples` examples at `per_step` per step (at least 1)."""
    return max(1, -(-examples // per_step))


# The batch entry where the bench's collator puts a batch's real tokens, counted on the CPU
BENCH_TOKENS = "finqa_bench_tokens"


class _Meter:
    """Trainer callback: wall time and non-padding tokens of the steps after `warmup`. The collator counts
    each batch's tokens on the CPU and the training step adds them up as it takes the batch: the Trainer's
    own count (`include_num_input_tokens_seen`) reads each micro-batch's back from the GPU, a wait for the GPU
    at every step that a run without the bench does not have (the bench counted that way before 2026-11-27,
    session 19)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.tok0, self.tok1 = warmup, None, None, 0, 0
        self.seen = 0  # real tokens of the batches the training steps took so far

    def watch(self, trainer: Any) -> None:
        """Count each batch's tokens as the trainer's collator makes it and its training step takes it."""
        collate, step = trainer.data_collator, trainer.training_step

        def counting(features: list[dict]) -> dict[str, Any]:
            batch = collate(features)
            mask = batch.get("attention_mask")
            batch[BENCH_TOKENS] = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            return batch

        def training_step(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            self.seen += inputs.pop(BENCH_TOKENS, 0)
            return step(model, inputs, *args, **kwargs)

        trainer.data_collator, trainer.training_step = counting, training_step

    def callback(self) -> Any:
        from transformers import TrainerCallback

        meter = self

        class Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
                if state.global_step == meter.warmup:
                    _sync()
                    meter.t0, meter.tok0 = time.perf_counter(), meter.seen
                elif state.global_step == state.max_steps:
                    _sync()
                    meter.t1, meter.tok1 = time.perf_counter(), meter.seen

        return Cb()

    def result(self) -> dict[str, float]:
        secs = self.t1 - self.t0
        tokens = self.tok1 - self.tok0
        return {"seconds": round(secs, 3), "tokens": int(tokens), "tokens_per_s": round(tokens / secs, 1)}


def _plain_trl_trainer(
    method: str,
    model_dir: Path,
    rows: list[dict],
    warmup_examples: int,
    examples: int,
    out: Path,
    full_length: bool = False,
) -> tuple[Any, int]:
    """What a user assembles by hand from TRL's docs: SFTTrainer defaults + a LoraConfig (+ 4-bit base).
    `full_length`: max_length=None instead of the default 1024, so that it trains on every example, as the
    recipes do (the default truncates, then drops three quarters of the sample's examples)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    bf16 = _cuda()  # SFTConfig's bf16 default, which a CPU dry run cannot use
    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if bf16 else torch.float32,
        "attn_implementation": "sdpa",
    }
    if method.startswith("q"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
    if bf16:
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token_id = 128004  # Llama 3.2's pad (<|finetune_right_pad_id|>), as its model card says
    per_step = 4  # SFTConfig's defaults: batch 4, no accumulation
    warmup = window_steps(warmup_examples, per_step)
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1,
        max_steps=warmup + window_steps(examples, per_step),
        learning_rate=1e-4,
        bf16=bf16,
        use_cpu=not bf16,
        save_strategy="no",
        report_to="none",
        logging_steps=1000,
        disable_tqdm=True,
        **({"max_length": None} if full_length else {}),
    )
    peft = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", use_dora=method.endswith("dora")
    )
    data = Dataset.from_list(rows)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft
    )
    return trainer, warmup


def _recipe_trainer(
    method: str,
    shape: str,
    model_dir: Path,
    data_dir: Path,
    warmup_examples: int,
    examples: int,
    out: Path,
    limit: int | None,
    extra: Sequence[str] = (),
) -> tuple[Any, int]:
    from . import train

    run = train.parse(
        [
            "--config", f"recipes/{method}-{'1b' if shape == 'tiny' else shape}.yaml",
            "--model_name_or_path", str(model_dir),
            "--data_dir", str(data_dir),
            "--train_splits", *BENCH_SPLITS,
            "--output_dir", str(out),
            "--save_strategy", "no",
            "--logging_steps", "1000",
            "--disable_tqdm", "true",
            *extra,
        ]
    )  # fmt: skip
    if limit:
        run.script.max_train_samples = limit
    # The recipe's (or the lever's) batch decides how many steps make the windows.
    per_step = run.training.per_device_train_batch_size * run.training.gradient_accumulation_steps
    warmup = window_steps(warmup_examples, per_step)
    run.training.max_steps = warmup + window_steps(examples, per_step)
    return train.prepare(run).trainer, warmup


def biggest_pass(trainer: Any) -> list[int] | None:
    """With token passes (`trainer.micro_batch_tokens`): the rows of the pass that holds the most padded
    tokens (then the most rows: more programs, more logits) among the passes the planner makes of an epoch's
    steps in the order the trainer's sampler draws now (its seeded length grouping: the current epoch's; a
    random sampler draws an order of its own); None with fixed micro-batches or without a sampler. The step of
    the longest examples need not hold it: under an unpadded budget its first pass loses a row to the
    padding, while steps of shorter examples fill the budget (the sample's lengths, planned on the CPU:
    passes of 8 x 1,536 and 16 x 768 padded tokens beside the longest step's 5 x 2,304; on machines W and X
    the timed windows peaked 0.17-0.44 GiB above the longest step)."""
    from .train import padded_width, plan_micro_batches

    budget = getattr(trainer, "micro_batch_tokens", None)
    if not budget:
        return None
    data = trainer.train_dataset
    lengths = [len(ids) for ids in data["input_ids"]]
    size, multiple = trainer.args.per_device_train_batch_size, trainer.args.pad_to_multiple_of
    sampler = trainer._get_train_sampler(data)
    if sampler is None:  # an iterable dataset: no order to plan ahead
        return None
    order = list(iter(sampler))
    best, most = None, (0, 0)
    for start in range(0, len(order), size):
        step = order[start : start + size]
        for group in plan_micro_batches([lengths[i] for i in step], budget, multiple):
            rows = [step[j] for j in group]
            padded = len(rows) * padded_width(lengths, rows, multiple)
            if (padded, len(rows)) > most:
                best, most = rows, (padded, len(rows))
    return best


def _batch_of(trainer: Any, rows: list[int], description: str) -> dict[str, Any]:
    """The training dataset's `rows` as one collated batch on the trainer's device."""
    data = trainer.train_dataset
    # Only the columns the trainer feeds the model (TRL keeps e.g. the prompt text beside the token ids).
    picked = trainer._remove_unused_columns(data.select(rows), description=description)
    return trainer._prepare_inputs(trainer.data_collator([picked[i] for i in range(len(picked))]))


def _peak_of_step(trainer: Any, rows: list[int]) -> float | None:
    """Peak GPU memory of one forward + backward over `rows` as one batch, in the trainer's own passes, with
    the trainable parameters' gradients already held, as every pass after a step's first holds them (None
    without CUDA)."""
    import torch

    from .modeling import peak_gpu_memory_gib

    batch = _batch_of(trainer, rows, "worst step")
    model = trainer.model_wrapped
    model.train()
    for param in trainer.model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    _sync()
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    trainer.training_step(model, batch)
    _sync()
    trainer.model.zero_grad(set_to_none=True)
    return peak_gpu_memory_gib()


def longest_batch_peak(trainer: Any) -> dict[str, Any]:
    """The peak memory of the variant's worst step in an epoch: one more forward + backward on the micro-batch
    of its longest examples (every batch holding the longest example is padded to the same shape). Where
    micro_batch_tokens regroups a step's examples into one batch, that batch is the step's longest examples,
    run in its passes of at most the budget's tokens, and also the biggest pass of the epoch (biggest_pass)
    on its own: the worst step is the higher of the two peaks.
    Each extra step runs with the gradients already held (since 2026-11-27; earlier runs' extra steps started
    without them and read low by about their size: plain TRL's timed windows peaked 0.03-0.05 GiB above its
    extra steps on machines W and X). The timed window's peak depends on which batches it happened to meet
    (length grouping puts the longest batch first, random batches meet it somewhere in the epoch), so only
    this number compares the memory of two variants. Run after training (optimizer state allocated), through
    the module training ran (`model_wrapped`: compiled under --torch_compile)."""
    data = trainer.train_dataset
    size = trainer.args.per_device_train_batch_size
    lengths = [len(ids) for ids in data["input_ids"]]
    longest = sorted(range(len(lengths)), key=lengths.__getitem__)[-size:]
    peak = _peak_of_step(trainer, longest)
    out: dict[str, Any] = {
        "longest_batch_tokens": sum(lengths[i] for i in longest),
        "longest_example_tokens": max(lengths),  # what micro_batch_tokens auto's budget derives from
        "longest_batch_peak_gib": peak,
    }
    rows = biggest_pass(trainer)
    if rows is not None:
        from .train import padded_width

        width = padded_width(lengths, rows, trainer.args.pad_to_multiple_of)
        try:  # the longest step's peak stands if this one fails (e.g. out of memory)
            biggest: float | str | None = _peak_of_step(trainer, rows)
        except Exception as err:
            biggest = _error_text(err)
        out["longest_step_peak_gib"] = peak
        out["biggest_pass"] = [len(rows), width]  # rows x padded length
        out["biggest_pass_peak_gib"] = biggest
        if isinstance(peak, float) and isinstance(biggest, float):  # else no CUDA, or the pass failed
            out["longest_batch_peak_gib"] = max(peak, biggest)
    return out


PROFILE_STEPS = 3  # profiled micro-steps per training variant, after 2 unprofiled ones on the same batch


def profile_training(trainer: Any, dest: Path) -> dict[str, Any]:
    """Where a micro-step's time goes: forward + backward (no optimizer step) on the micro-batch of
    median-length examples (length-grouped batches are near uniform; with micro_batch_tokens, a step's
    examples in their passes: the times are then per step, not per pass), run after the timed window so the
    throughput is not touched. Writes the busiest ops to `dest` and returns per micro-step the wall time
    (timed without the profiler, whose overhead is large), the time the GPU spent in kernels (a wall time far
    above it means the step waits on the CPU: launches, Python, casts) and the number of kernels launched."""
    from torch.autograd import DeviceType

    data = trainer.train_dataset
    size = trainer.args.per_device_train_batch_size
    lengths = [len(ids) for ids in data["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    mid = max(0, len(order) // 2 - size // 2)
    picked = order[mid : mid + size]
    batch = _batch_of(trainer, picked, "profiled batch")
    model = trainer.model_wrapped
    model.train()
    for _ in range(2):  # allocator and autotuning settle on this shape before the profiled steps
        _sync()
        t = time.perf_counter()
        trainer.training_step(model, batch)
        _sync()
        plain = time.perf_counter() - t  # the second pass's: the wall time to set against the kernels
    holder: dict[str, Any] = {}
    t = time.perf_counter()
    with profiled(dest, holder):
        for _ in range(PROFILE_STEPS):
            trainer.training_step(model, batch)
        _sync()
    wall = time.perf_counter() - t
    trainer.model.zero_grad(set_to_none=True)
    kernels = [e for e in holder["prof"].events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    return {
        "profile": dest.name,
        "profile_batch_tokens": sum(lengths[i] for i in picked),
        "profile_step_ms": round(plain * 1e3, 1),  # one pass without the profiler, synchronised
        "profiled_step_ms": round(wall * 1e3 / PROFILE_STEPS, 1),  # under the profiler: its overhead included
        "profile_gpu_kernel_ms": round(busy / PROFILE_STEPS, 1) if kernels else None,
        "profile_kernels": len(kernels) // PROFILE_STEPS if kernels else None,
    }


def bench_training(
    variant: str,
    method: str,
    shape: str,
    model_dir: Path,
    data_dir: Path,
    rows: list[dict],
    examples: int,
    warmup_examples: int,
    limit: int | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    import torch

    _empty_cache()
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    import transformers.models.llama.modeling_llama  # noqa: F401 - loaded, so stock_modeling_code watches it
    from torch._dynamo.utils import counters

    from .modeling import stock_modeling_code

    counters.clear()  # process-wide: the graphs of this variant only (--same_process runs several)
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()  # --cudnn_attention false turns it off process-wide
    # Liger (a recipe default where installed) rebinds modeling-module globals: put back for the next variant
    with tempfile.TemporaryDirectory(prefix=f"bench-{variant}-") as tmp, stock_modeling_code():
        try:
            if variant in TRL_VARIANTS:
                full = variant == "trl:full_length"
                trainer, warmup = _plain_trl_trainer(
                    method, model_dir, rows, warmup_examples, examples, Path(tmp), full
                )
            else:
                trainer, warmup = _recipe_trainer(
                    method,
                    shape,
                    model_dir,
                    data_dir,
                    warmup_examples,
                    examples,
                    Path(tmp),
                    limit,
                    lever_args(variant),
                )
            meter = _Meter(warmup)
            meter.watch(trainer)
            trainer.add_callback(meter.callback())
            trainer.train()
            # the graphs made by the end of the timed window (warm-up included): the extra steps below run
            # the longest examples in passes of their own shapes, which may compile more
            window_graphs = counters["stats"]["unique_graphs"]
            from .modeling import peak_gpu_memory_gib

            res = {**meter.result(), "peak_gib": peak_gpu_memory_gib()}
            try:  # the throughput stands even if the extra step fails
                res.update(longest_batch_peak(trainer))
            except Exception as err:
                res["longest_batch_peak_gib"] = _error_text(err)
            if profile is not None:
                try:  # likewise: a failed profile loses only itself
                    res.update(profile_training(trainer, profile))
                except Exception as err:
                    res["profile"] = _error_text(err)
            # compiled layers (a GPU's recipe): more than 6 graphs means recompilation
            if counters["stats"]["unique_graphs"]:
                res["compiled_graphs"] = counters["stats"]["unique_graphs"]
                res["compiled_graphs_window"] = window_graphs
            res["micro_batch"] = trainer.args.per_device_train_batch_size
            res["grad_accum"] = trainer.args.gradient_accumulation_steps
            res["micro_batch_tokens"] = getattr(trainer, "micro_batch_tokens", None)  # recipes' budget
            res["timed_steps"] = trainer.args.max_steps - warmup
            # Plain TRL truncates to max_length=1024 and then drops every example whose program was cut off.
            res["train_examples"] = len(trainer.train_dataset)
        except Exception as err:  # one failing configuration must not lose the others' numbers
            res = {"error": _error_text(err)}
        finally:
            trainer = None
            torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
            gc.collect()
            _empty_cache()
    return {"variant": variant, "method": method, "shape": shape, **res}


def bench_training_in_fresh_process(
    args: argparse.Namespace, shape: str, method: str, variant: str, work: Path, profile: Path | None
) -> dict[str, Any]:
    """One training variant timed in a new Python process, as `make train` runs it: nothing it times was
    warmed by another variant (cuDNN's attention plans per batch length, Triton and cuBLAS state, the
    allocator). The child reuses the models saved in `work`; its output goes to the console."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        cmd = [
            sys.executable, "-m", "finqa_trl.bench", "--same_process",
            "--data_dir", str(args.data_dir), "--tokenizer", str(args.tokenizer),
            "--shapes", shape, "--methods", method, "--variants", variant,
            "--examples", str(args.examples), "--warmup_examples", str(args.warmup_examples),
            "--workdir", str(work), "--out", tmp,
            *(["--max_examples", str(args.max_examples)] if args.max_examples else []),
            *(["--profile"] if profile else []),
        ]  # fmt: skip
        rc = subprocess.run(cmd, check=False).returncode
        found = sorted(Path(tmp).glob("bench-*.json"))
        rows = json.loads(found[0].read_text())["results"] if found else []
        if not rows:
            why = f"its process exited with code {rc} before a result (its output is above)"
            return {"variant": variant, "method": method, "shape": shape, "error": why, "process": "fresh"}
        r = rows[0]
        child_profile = next(Path(tmp).glob("*-profile-*.txt"), None)
        if profile is not None and child_profile is not None:
            shutil.move(child_profile, profile)
            r["profile"] = profile.name
    r["process"] = "fresh"
    return r


def bench_eval(
    shape: str, model_dir: Path, data_dir: Path, out: Path, variant: str = "auto", profile: Path | None = None
) -> dict[str, Any]:
    """`make eval` on 1,147 prompts: wall time of generation + scoring (the model load is timed apart).
    With `profile`, the run goes under torch.profiler and its busiest CUDA kernels are written there (the
    profiler slows the run: such a row's times are not the variant's speed)."""
    from . import predict

    args = predict.parse_args(
        [
            "--model", str(model_dir), "--data_dir", str(data_dir), "--split", "test",
            "--output_dir", str(out), "--max_new_tokens", "20", "--overwrite", "true",
            *EVAL_VARIANTS[variant],
        ]
    )  # fmt: skip
    # Nothing of an earlier variant may shrink the memory the batch sizes come from, or set the peak.
    gc.collect()
    _empty_cache()
    if _cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        with profiled(profile):
            _, metrics = predict.predict(args)
    except Exception as err:  # one failing variant must not lose the others' numbers
        return {
            "shape": shape,
            "eval": variant,
            "error": _error_text(err),
        }
    wall = time.perf_counter() - t
    timing = {k: metrics.get(k) for k in predict.RUN_INFO_KEYS}
    return {
        "shape": shape,
        "eval": variant,
        **({"profile": profile.name} if profile else {}),
        "examples": metrics["n"],
        "wall_seconds": round(wall, 2),
        # everything but loading the weights: prompts, generation, parsing, scoring, writing the files
        "eval_seconds": round(wall - (timing["load_seconds"] or 0.0), 2),
        **timing,
    }


@contextlib.contextmanager
def profiled(dest: Path | None, holder: dict[str, Any] | None = None) -> Iterator[None]:
    """Run the body under torch.profiler (CPU + CUDA) and write the ops that took the most GPU time to `dest`:
    where generation or a training step spends its time (GEMMs, attention, casts, copies, ...), and on a GPU
    also the ops that took the most host time. The profiler object is left in `holder["prof"]` for callers
    that summarise its events."""
    if dest is None:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _cuda() else [])
    with profile(activities=activities) as prof:
        yield
    _sync()
    if holder is not None:
        holder["prof"] = prof
    key = "self_device_time_total" if _cuda() else "self_cpu_time_total"
    table = prof.key_averages().table
    text = (
        f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if _cuda() else 'cpu'}; sorted by {key}\n"
    )
    text += table(sort_by=key, row_limit=40, max_name_column_width=70)
    if _cuda():
        # The host's side: where a step whose GPU sits idle spends its time (Python-heavy ops, CUDA runtime
        # calls such as cudaStreamSynchronize or cudaMemcpy, each a wait for the GPU)
        text += "\nThe host: sorted by self_cpu_time_total\n"
        text += table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)


def eval_split(records: list[dict], dest: Path) -> Path:
    """1,147 real prompts: the sample's examples, repeated from the start as needed (distinct ids)."""
    rows = []
    for i in range(EVAL_EXAMPLES):
        ex = dict(records[i % len(records)])
        ex["id"] = f"{ex['id']}#{i // len(records)}"
        rows.append(ex)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "test.json").write_text(json.dumps(rows))
    return dest


def host_info() -> dict[str, Any]:
    """The machine around the card: its CPU and the library versions. Plain TRL's 1B rows ran 1.21-1.31x as
    fast on machine UU as on QQ and SS (H200s too), its 3B row 0.88x QQ's. The host may be the cause (eager
    batches of 4 launch many small kernels), so every ratio to plain TRL needs to say which host ran it.
    `cpus` counts the CPUs this process may run on (a container's share), `cpus_host` the machine's."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the model here; platform.processor() often does not
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpus": usable, "cpus_host": os.cpu_count(), "versions": versions}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finqa_trl.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", required=True, help="FinQA folder with train/dev/test (real prompts)")
    ap.add_argument("--tokenizer", required=True, help="Llama 3 tokenizer folder (tokenizer.json[.xz])")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--variants",
        nargs="*",
        default=["trl", "recipe"],
        help="trl, trl:full_length, recipe, or recipe:LEVER[+LEVER] with LEVER in "
        f"{', '.join(LEVERS)}, tokens<N> (a budget of N tokens), keep<N> (the last N layers without their "
        "checkpoint); none: eval only",
    )
    ap.add_argument("--examples", type=int, default=192, help="timed training examples per variant")
    ap.add_argument("--warmup_examples", type=int, default=48, help="untimed training examples first")
    ap.add_argument("--eval", action="store_true", help="also time evaluation (generation + scoring)")
    ap.add_argument("--eval_variants", nargs="+", default=["auto"], choices=list(EVAL_VARIANTS))
    ap.add_argument(
        "--profile",
        action="store_true",
        help="profile each variant: a training variant for a few extra micro-steps after its timed window, "
        "an eval variant for its whole run (its times are then not its speed)",
    )
    ap.add_argument("--workdir", default=None, help="where the random-weight models are saved")
    ap.add_argument("--out", default="results")
    ap.add_argument("--max_examples", type=int, default=None, help="use only the first N examples (dry runs)")
    ap.add_argument(
        "--same_process",
        action="store_true",
        help="time every training variant in this process instead of one fresh process each (faster, but "
        "a later variant meets the batch lengths an earlier one built cuDNN attention plans for, and runs "
        "faster for that alone)",
    )
    args = ap.parse_args(argv)
    if min(args.examples, args.warmup_examples, 1 if args.max_examples is None else args.max_examples) < 1:
        ap.error("--examples, --warmup_examples and --max_examples must be at least 1")
    for flag, path in (("--data_dir", args.data_dir), ("--tokenizer", args.tokenizer)):
        if not Path(path).is_dir():
            print(f"error: {flag} {path}: no such directory", file=sys.stderr)
            return 2
    for v in args.variants:
        if v not in TRL_VARIANTS and v != "recipe" and not v.startswith("recipe:"):
            ap.error(f"unknown variant {v!r}")
        if v.startswith("recipe"):
            lever_args(v)  # exits with one line on an unknown lever

    import torch

    if not torch.cuda.is_available() and set(args.shapes) != {"tiny"}:
        print(
            "error: timing the 1b/3b shapes needs a CUDA GPU (--shapes tiny runs anywhere)", file=sys.stderr
        )
        return 2
    from .modeling import load_tokenizer, resolve_source
    from .prompts import format_split
    from .train import load_records

    # the same examples, in the same order, as the recipe variants' --train_splits + --max_train_samples
    try:
        records = load_records(args.data_dir, BENCH_SPLITS, args.max_examples)
    except OneLineError as err:  # e.g. a folder without the FinQA splits: refused before anything is written
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="finqa-bench-"))
    tok = tokenizer_dir(Path(args.tokenizer), work / "tokenizer")
    eval_data = eval_split(records, work / "eval-data") if args.eval else None  # written once for all runs
    results: list[dict[str, Any]] = []
    device = torch.cuda.get_device_name(0) if _cuda() else "cpu"
    now = dt.datetime.now(dt.timezone.utc)
    stamp = now.strftime("%Y-%m-%d")
    out_file = Path(args.out) / f"bench-{now:%Y-%m-%d-%H%M%S}.json"  # one file per run: runs never clobber
    header = {
        "device": device,
        "host": host_info(),
        "date": stamp,
        "examples": args.examples,
        "warmup_examples": args.warmup_examples,
        "command": " ".join(["python -m finqa_trl.bench", *(argv if argv is not None else sys.argv[1:])]),
    }
    for shape in args.shapes:
        model_dir = build_shape(shape, tok, work / f"llama-3.2-{shape}")
        # The recipes' prompt settings (max_prompt_tokens 3072, trimmed by the gold facts), for plain TRL in
        # this process; the recipe variants format their own data, and fresh processes their own.
        rows = []
        if args.same_process and any(v in TRL_VARIANTS for v in args.variants):
            tokenizer = load_tokenizer(resolve_source(str(model_dir)))
            rows = format_split(records, tokenizer=tokenizer, max_prompt_tokens=3072, trim="gold")
        for method in args.methods:
            for variant in args.variants:
                prof = None
                if args.profile:  # a variant named twice (an order check) keeps both profiles
                    seen = sum(
                        (r.get("shape"), r.get("method"), r.get("variant")) == (shape, method, variant)
                        for r in results
                    )
                    name = f"{shape}-{method}-{variant.replace(':', '-').replace('+', '-')}"
                    name += f"-{seen + 1}" if seen else ""
                    prof = out_file.with_name(f"{out_file.stem}-profile-{name}.txt")
                if args.same_process:
                    r = bench_training(
                        variant,
                        method,
                        shape,
                        model_dir,
                        Path(args.data_dir),
                        rows,
                        args.examples,
                        args.warmup_examples,
                        args.max_examples,
                        prof,
                    )
                else:
                    r = bench_training_in_fresh_process(args, shape, method, variant, work, prof)
                print(json.dumps(r), flush=True)
                results.append(r)
                write_json_atomic(out_file, {**header, "results": results})
        for variant in args.eval_variants if args.eval else ():
            name = f"{out_file.stem}-profile-{shape}-{variant}.txt"
            prof = out_file.with_name(name) if args.profile else None
            r = bench_eval(shape, model_dir, eval_data, work / f"eval-{shape}-{variant}", variant, prof)
            print(json.dumps(r), flush=True)
            results.append(r)
            write_json_atomic(out_file, {**header, "results": results})
    print(f"\n{device}, {args.examples} timed examples after {args.warmup_examples} untimed; {out_file}\n")
    print(bench_table(results))
    png = out_file.with_suffix(".png")
    title = f"{device}: {args.examples} timed examples after {args.warmup_examples}"
    try:  # the JSON above is the record: a chart that fails loses only itself
        if bench_chart(results, png, title):
            print(f"chart: {png}")
    except Exception as err:
        print(f"chart not written: {_error_text(err)}", file=sys.stderr)
    for r in results:
        if "eval" in r:
            print(
                f"eval {r['shape']} {r['eval']}: "
                + (
                    f"{r['examples']} examples in {r['eval_seconds']} s (generation + scoring; "
                    f"{r['batches']} batches of up to {r['largest_batch']}; "
                    f"weights loaded in {r['load_seconds']} s)"
                    if "examples" in r
                    else r["error"]
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
