"""Fine-tune a chat model to write FinQA programs with TRL's SFTTrainer + PEFT (LoRA, DoRA, QLoRA, QDoRA).

    python -m finqa_trl.train --config recipes/qdora-3b.yaml [--output_dir DIR] [--model_name_or_path M]
        [--data_dir D] [--merge] [--any SFTConfig / ModelConfig / FinQAArguments field VALUE]
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 -m finqa_trl.train ...

Modelled on TRL's `trl/scripts/sft.py`: one `TrlParser` over (FinQAArguments, SFTConfig, ModelConfig) reads
the recipe -- its `base:` chain resolved first (finqa_trl.recipes) -- and then the command line, which wins.

* Data: FinQA records -> TRL's conversational prompt/completion format (finqa_trl.prompts). TRL's own
  completion-only loss masks every prompt token (label -100); the program and the end-of-turn token after it
  are trained.
* Where there is no bf16 GPU (CPU), bf16 and the bf16 model dtype become fp32, and a log line says so.
* A run resumes from the last `checkpoint-*` in output_dir. The adapter, tokenizer and the fully resolved
  recipe (`recipe.yaml`) land in output_dir; `--merge` also writes a merged bf16 model to output_dir/merged.
* Hub pushes (each epoch + final) only with `--push_to_hub true --hub_model_id USER/NAME`; tracking only via
  `--report_to` (e.g. wandb).
* Bad input (unknown recipe or setting, missing data, 4-bit without bitsandbytes support, an 8-bit base, a
  4-bit base that the launch's FSDP/ZeRO-3 settings would break, an output_dir holding another recipe's run)
  -> one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import enum
import functools
import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from . import OneLineError, one_line
from .data import DataError, load_split, resolve_data_dir
from .modeling import (
    CAUSAL_SDPA,
    ModelError,
    bf16_supported,
    body_blocker,
    check_4bit_supported,
    compile_decoder_layers,
    decoder_layers,
    default_dtype,
    end_of_turn_token,
    fsdp_safe_adapter_keys,
    import_before_process_group,
    lean_mlp_recompute,
    load_model,
    load_tokenizer,
    materialize_gguf,
    peak_gpu_memory_gib,
    prepare_4bit_for_training,
    resolve_source,
    saved_adapter_tensors,
    shadow_adapter_weights,
    sync_special_tokens,
    use_causal_attention,
)
from .recipes import RUN_RECIPE, Recipe, RecipeError, available, check_keys, method_name, resolve
from .score import write_atomic

logger = logging.getLogger("finqa_trl.train")
# bitsandbytes' CPU backend warns at import, on AVX512-bf16 CPUs, that an optional Hub kernel is missing and
# falls back to its bundled one; the advice (install `kernels`, fetch from the Hub) does not apply offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
RECIPE_FILE = RUN_RECIPE
# Settings that make two runs "the same recipe" for the purpose of sharing (resuming in) an output_dir.
IDENTITY = (
    "recipe",
    "model_name_or_path",
    "gguf_file",
    "use_peft",
    "use_dora",
    "load_in_4bit",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "context",
    "eg_k",
)
# Precision settings that also make a run what it is (a resume must not switch them halfway), recorded in
# every saved recipe, with the value a saved recipe that lacks the key ran with: the default of its time.
PRECISION = {"kbit_fp32_upcast": True, "adapters_in_compute_dtype": False}
# Written into each checkpoint: how many processes saved it and the global batch they trained with, so that a
# resume can tell whether it is launched as the run it continues (checkpoints saved before it: not checked)
LAUNCH_FILE = "launch.json"


class UsageError(OneLineError):
    """A bad command line or setting; `str()` is one line."""


@dataclass
class FinQAArguments:
    """The FinQA side of a run: which data, how prompts are built, what happens after training."""

    recipe: str | None = field(
        default=None, metadata={"help": "Recipe name; set from --config and recorded in recipe.yaml."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "FinQA folder; default $FINQA_DIR, else the bundled fixture."}
    )
    train_splits: list[str] = field(
        default_factory=lambda: ["train"], metadata={"help": "Splits to train on, e.g. train dev."}
    )
    eval_splits: list[str] = field(
        default_factory=lambda: ["dev"],
        metadata={"help": "Splits for the eval loss (when eval_strategy != no)."},
    )
    context: str = field(
        default="full", metadata={"help": "Prompt context: full or gold.", "choices": ["full", "gold"]}
    )
    eg_k: int = field(default=0, metadata={"help": "Few-shot examples per prompt."})
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "Trim context (never the question) until each prompt fits."}
    )
    trim: str = field(
        default="gold",
        metadata={
            "help": "What trimming drops first: see finqa_trl.prompts.",
            "choices": ["gold", "question"],
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N examples only."}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside model_name_or_path (a .gguf path works too)."}
    )
    kbit_fp32_upcast: bool = field(
        default=False,
        metadata={
            "help": "4-bit bases: true runs PEFT's k-bit preparation, which casts the weights left "
            "unquantized (embeddings, norms, LM head) to fp32, so hidden states run in fp32. The default "
            "false keeps them in the compute dtype, as plain TRL and the 16-bit recipes do: on an H100 "
            "1.11-1.85x the tokens/s and 0.5-3.8 GiB less peak memory (results/speed-notes.md)."
        },
    )
    adapters_in_compute_dtype: bool = field(
        default=False,
        metadata={
            "help": "16-bit bases, one GPU or DDP: keep LoRA A/B in the compute dtype (bf16) instead of "
            "PEFT's fp32, as TRL does for 4-bit bases (the DoRA magnitude stays fp32: its updates are below "
            "bf16's resolution). Less precise trained weights; a speed lever to time, not a default. Refused "
            "where it would do nothing: 4-bit bases (already so), FSDP (accelerate upcasts trainable bf16 "
            "weights) and DeepSpeed (bf16 everywhere)."
        },
    )
    adapter_weight_copies: bool = field(
        default=False,
        metadata={
            "help": "fp32 LoRA adapters of a bf16 base under bf16 autocast (one process or DDP, plain LoRA): "
            "compute each adapter's A and B from a bf16 copy made at the start of every forward of the model "
            "(one multi-tensor copy) instead of autocast's cast of the fp32 weight at each use in the "
            "forward and the checkpoint's recomputation (one more kernel to launch each time). The same "
            "matmuls on the same rounded weights and the same fp32 weight gradients: on the CPU, eager and "
            "compiled as bodies, the loss and every gradient bit for bit over optimizer steps, dropout "
            "included (tests). The weights, optimizer and saved adapters stay fp32; the copies "
            "are buffers outside the state dict. A speed lever, off, not timed yet (results/speed-notes.md, "
            "Next 34). Not with lora_dropout_kernel."
        },
    )
    adapter_input_cast: str = field(
        default="true",
        metadata={
            "help": "16-bit bases, one GPU or DDP: false stops PEFT from copying each adapted layer's bf16 "
            "input to fp32 (its adapters' dtype) before the adapter. bf16 autocast computes the adapter "
            "matmuls in bf16 either way, so for LoRA the loss and gradients are the same (bit for bit on the "
            "CPU without dropout; the dropout masks are drawn on another dtype), and the adapters and the "
            "optimizer stay fp32. auto (the recipes): false for LoRA wherever it applies (fp32 adapters of "
            "a bf16 base under bf16 mixed precision, one GPU or DDP), true elsewhere and for DoRA (whose "
            "forward it changes: SmolLM2 DoRA ended about 1% higher in loss without the cast, two runs each "
            "way); false is refused where it would do nothing. On one H100, over half an epoch, 1b LoRA "
            "1.24x and DoRA 1.11x the tokens/s (results/speed-notes.md).",
            "choices": ["auto", "true", "false"],
        },
    )
    lora_dropout_kernel: str = field(
        default="false",
        metadata={
            "help": "LoRA's dropout inside its A matmul (finqa_trl/lora_dropout.py): one Triton kernel reads "
            "each adapted layer's input, draws the dropout mask in registers and multiplies by A, instead of "
            "writing a dropped-out copy of the input and reading it back; the backward draws the same mask "
            "again. Same objective (each element kept with probability 1 - p, scaled by 1 / (1 - p); the "
            "masks come from another generator, seeded from torch's, so that checkpointing recomputes the "
            "same ones: CPU tests). Plain LoRA adapters only (not DoRA: its dropout also feeds the base "
            "layer) and only while training on a CUDA GPU. auto: on with a CUDA GPU for one process or "
            "DDP; true: also under FSDP or DeepSpeed (untested there); refused without a GPU. A speed lever, "
            "off in the recipes: a profile of compiled 3b LoRA on an H200 spent 19% of its kernel time in "
            "dropout kernels, but on three H200s, in fresh processes, 1b and 3b LoRA ran 0.97-1.06x the "
            "recipe with it (six pairs; its kernels 1.05-1.36x inductor's time), 0.24-0.40 GiB less at the "
            "worst step (results/speed-notes.md).",
            "choices": ["auto", "true", "false"],
        },
    )
    lean_recompute: str = field(
        default="false",
        metadata={
            "help": "Leave each MLP's frozen down projection out of the activation checkpoint's "
            "recomputation (modeling.lean_mlp_recompute). The backward needs everything of a layer's forward "
            "but that last projection's output, and torch stops recomputing once the last tensor kept for "
            "the backward is made again: with the adapters computed first, inside the compiled MLP, and the "
            "base layer after it outside autograd (its input gradient carried by the adapters' term), one "
            "(tokens x intermediate) @ (intermediate x hidden) matmul per layer and pass goes (a twelfth of "
            "a Llama 3.2 step's base-layer matmuls). The same operations and dropout masks: with one adapter "
            "the gradients are those of PEFT's forward bit for bit (CPU tests). Plain LoRA adapters over a "
            "bias-free 16-bit or bitsandbytes 4-bit base (not DoRA: its forward reads the base weight), with "
            "the non-reentrant activation checkpoint, one process or DDP, compiled parts or bodies or eager "
            "(not --compile_scope layer). auto (the recipes'): where it applies, the layers compile and the "
            "base is 16-bit; true: also on a 4-bit base, refused where it does not apply. One H200, with "
            "compiled parts: 3B LoRA 1.05x in both orders, 1B LoRA 1.00x and 1.06x, at the recipe's "
            "worst-step memory; on a 4-bit base 1B QLoRA ran 0.86-0.87x (the GPU waiting on the host; cause "
            "not established), 3B QLoRA 1.04x. With compiled bodies (compile_scope auto), 1B LoRA ran "
            "without it at 1.00x and 1.11x its speed with it, so lora-1b turns it off; 3B LoRA keeps it "
            "(results/speed-notes.md).",
            "choices": ["auto", "true", "false"],
        },
    )
    cudnn_attention: bool = field(
        default=True,
        metadata={
            "help": "Let sdpa use cuDNN's attention kernel (CUDA). false: PyTorch's flash kernel instead; "
            "cuDNN builds a plan for each new sequence length the first time it meets it, a CPU cost that "
            "length-grouped batches meet at almost every step of a first epoch. Not a default: the recipes "
            "pad batches to multiples of 64 instead (1.62x against 1.53x for this, 1b LoRA, one H100)."
        },
    )
    causal_attention: str = field(
        default="false",
        metadata={
            "help": "Training with sdpa: attention with the causal mask only (sdpa's causal kernel), not "
            "each row's padding mask. TRL's collator pads on the right, after every real token, and causal "
            "attention never lets a real token see what comes after it: the same loss and gradients (a CPU "
            "test). Skips transformers' check of the padding mask, a host wait for the GPU before every "
            "pass, and the mask itself. auto (the recipes): on with sdpa and neither packing nor "
            "padding_free (rows side by side in one sequence, which a causal mask alone would let see each "
            "other); true refuses those. One H200, 1b LoRA, with defer_metrics: 1.09x the tokens/s in both "
            "orders, 0.10 GiB less at the worst step; alone 1.03x (results/speed-notes.md).",
            "choices": ["auto", "true", "false"],
        },
    )
    defer_metrics: bool = field(
        default=False,
        metadata={
            "help": "Keep TRL's per-pass training metrics (entropy, mean_token_accuracy, num_tokens) on the "
            "GPU until they are logged, instead of reading each pass's on the host right after its "
            "forward, a wait for the GPU before the backward can be queued. The same values logged (to "
            "float rounding); the loss is TRL's own (its fused LM head, summed over the trained tokens). "
            "Only for TRL's default loss (nll, no compute_loss_func, label smoothing, aux loss or sequence "
            "parallelism) on padded rows, else TRL computes it. The recipes: true. One H200, 1b LoRA: 1.00x "
            "alone, 1.09x with causal_attention (results/speed-notes.md).",
        },
    )
    compile_layers: str = field(
        default="false",
        metadata={
            "help": "torch.compile the attention, MLP and norms of each decoder layer, in place (regional "
            "compilation: every layer shares the graphs; sequence lengths dynamic from the second length "
            "met). Fuses elementwise work and PEFT's per-adapter Python into few kernels, for runs bound by "
            "launching kernels: on one H100, in fresh processes, 1b LoRA 1.22x, QLoRA 1.20x, DoRA (input "
            "cast skipped) 1.51x, 3b LoRA 1.14x the tokens/s, 0.06-1.06 GiB more at the worst step. "
            "Activation checkpointing stays eager around the parts. Same objective: the losses match eager "
            "to float rounding (a CPU test); dropout masks come from another generator. auto (the recipes): "
            "on with a CUDA GPU that Triton compiles for, one process or DDP; true: also on the CPU; refused "
            "under FSDP and DeepSpeed (their hooks would be compiled with the parts). DoRA compiles without "
            "graph breaks, on a 4-bit base too (its base weight read traceably): one H200, 1b and 3b QDoRA "
            "1.73x eager with the QDoRA recipes' budget (micro_batch_tokens auto:0.92). On a GPU, "
            "SmolLM2 LoRA logged eager's losses compiled in fp32 (15 steps, within 1e-6 relative); in bf16 "
            "the compiled run stayed closer to fp32 than eager (3.0% against 9.4% above it on average). "
            "Liger's kernels are off under it unless --liger_kernel true (that pair not timed).",
            "choices": ["auto", "true", "false"],
        },
    )
    compile_mode: str = field(
        default="default",
        metadata={
            "help": "torch.compile's mode for the layers' parts where compile_layers compiles them: "
            "reduce-overhead adds CUDA graphs (one per batch shape; the compiled micro-step is still bound "
            "by the CPU), max-autotune-no-cudagraphs tunes the fused kernels, max-autotune both, "
            "cpp-wrapper has inductor launch the kernels from generated C++ instead of Python (its "
            "cpp_wrapper option; fewer host microseconds per kernel where the pass waits on the host); "
            "the same loss function. Speed levers: reduce-overhead failed on an H200 for 1b LoRA with the "
            "recipes' activation checkpointing and token-budgeted passes (the capture invalidated with "
            "cuDNN attention; with the flash kernel the recomputation met other tensor metadata), and "
            "cpp-wrapper failed in torch 2.11's inductor on an H200 (CudaKernelParamCache not populated); "
            "the autotune modes not yet timed (results/speed-notes.md).",
            "choices": [
                "default",
                "reduce-overhead",
                "max-autotune-no-cudagraphs",
                "max-autotune",
                "cpp-wrapper",
            ],
        },
    )
    compile_scope: str = field(
        default="parts",
        metadata={
            "help": "What compile_layers compiles: parts (each decoder layer's attention, MLP and norms; the "
            "activation checkpoint stays eager around them and recomputes by calling them again) or layer "
            "(the whole decoder layer with its activation checkpoint inside the graph: the compiler "
            "recomputes the layer inside the compiled backward, replaying its dropout masks, and fuses "
            "across the parts and the residual adds; fewer calls from Python per layer). Same objective: on "
            "the CPU it gives the gradients of the layer compiled without recomputation, and keeps what the "
            "eager checkpoint keeps. Not for DoRA: PEFT's DoRA forward writes to a dict outside the layer, "
            "which dynamo cannot replay inside a checkpoint, so the whole layer would run eager. A speed "
            "lever that torch 2.11 (the GPU image's) fails to partition on a GPU once dynamo makes the "
            "lengths dynamic (an H100 and two H200s, 1b LoRA; the one shape that ran: 1.08x the parts at 1.2 "
            "GiB more; results/speed-notes.md). body: each decoder layer's own forward (attention, MLP, "
            "norms and residual adds) as one graph beneath its activation checkpoint, which stays eager "
            "around it as with the parts and recomputes by calling the graph again, drawing the same dropout "
            "masks: one compiled call per layer call instead of four (fewer guards, autograd functions and "
            "Python between them, for a pass bound by the host). DoRA too. With lean_recompute, whose frozen "
            "down projection runs outside the graph, three graphs per layer call. One H200 (machine TT), "
            "fresh processes, the first half epoch, both orders, against the parts: 1B QLoRA 1.13x and "
            "1.32x, 3B LoRA 1.07x and 1.04x, 1B LoRA 1.08x and 1.00x (1.08x and 1.11x without "
            "lean_recompute), the same worst-step memory; UU: 3B QLoRA 1.05x and 0.99x; 1B DoRA 1.05x and "
            "0.97x (TT, UU) at 0.09 GiB more. "
            "auto (the recipes'): body for plain LoRA adapters (16-bit or 4-bit base), parts for DoRA, and "
            "parts where a layer cannot compile as a body (said in the log). qdora-1b sets body (VV: 1.055x, "
            "after UU's 1.07x in the other order, at 0.04 GiB more). A recipe's scope reads as auto where "
            "the layers do not compile; on the command line, body and layer are refused there.",
            "choices": ["auto", "parts", "layer", "body"],
        },
    )
    uncheckpointed_layers: int = field(
        default=0,
        metadata={
            "help": "The last N decoder layers run without their activation checkpoint in every training "
            "pass: their activations stay alive for the backward instead of being recomputed (no second "
            "forward of those layers, their dropout masks drawn once). The same operations, masks and "
            "gradients; more memory per token of each pass. Where the memory is there, a lever to time with "
            "smaller passes (micro_batch_tokens N): the biggest pass of the token budget sets the peak. One "
            "process or DDP, with activation checkpointing on. 0 (the recipes'): every layer checkpointed. "
            "One H200 (machine VV), 3B LoRA, fresh processes, the first half epoch: passes of at most 4,096 "
            "tokens ran 0.49x the recipe, 0.52x with 5 of 28 layers kept (0.81 GiB below the recipe's worst "
            "step), 0.88x with all kept (twice its memory): at the recipe's memory the smaller passes cost "
            "more than the recomputation saved (results/speed-notes.md, Next 30)."
        },
    )
    micro_batch_tokens: str = field(
        default="false",
        metadata={
            "help": "One process or DDP: load each optimizer step's per_device_train_batch_size x "
            "gradient_accumulation_steps examples (per process) as one batch and run its forward + backward "
            "in the fewest micro-batches of at most this many padded tokens (rows x padded length), the "
            "gradients adding up before the one optimizer step. The same examples in each step (the "
            "length-grouped sampler already draws them per step; under DDP an epoch's last step may repeat "
            "other examples, as accelerate completes the processes' last batches) and the same loss: TRL "
            "divides by the trained tokens of the whole step either way. Short examples then share a "
            "micro-batch instead of each group of per_device_train_batch_size paying the per-pass launch "
            "cost. auto (the recipes): "
            "where gradient_accumulation_steps > 1, a budget of per_device_train_batch_size x the longest "
            "training example (unpadded), so that no micro-batch holds more tokens, padding included, than "
            "plain TRL's worst batch on the same data (the longest example and as many rows padded to it; "
            "but a single row padded beyond the budget, which gets a micro-batch of its own). With the "
            "budget padded to 64 instead (the default until 2026-11-27), two H200 machines measured "
            "1.15-1.48x the tokens/s of fixed micro-batches for 1b LoRA, QLoRA, DoRA, QDoRA, 3b LoRA and "
            "QLoRA; unpadded (machine W), the timed window's peak was 0.04-0.10 GiB lower (1b QLoRA and "
            "DoRA within 0.05 GiB of plain TRL's on the same data), at 0.94-1.01x the padded budget's "
            "tokens/s (results/speed-notes.md; DDP tested on the CPU only); auto:F: F (0 < F <= 1) times "
            "auto's budget, off where auto is (the QDoRA recipes: auto:0.92, for their compiled layers); a "
            "positive integer: that budget; false: fixed micro-batches. Off under FSDP and DeepSpeed (an "
            "integer is refused there: DeepSpeed counts micro-steps itself), with padding_free or packing "
            "(no rows to regroup) and with auto_find_batch_size."
        },
    )
    liger_kernel: str = field(
        default="false",
        metadata={
            "help": "Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU (pip install liger-kernel; "
            "TRL's use_liger_kernel, which keeps its own loss: the objective is unchanged). auto: on when "
            "liger-kernel is installed, a GPU is used (not under --use_cpu) and the layers run eager (not "
            "under compile_layers; the LoRA and DoRA recipes under FSDP/DeepSpeed: eager 1b LoRA ran 1.03x "
            "and 0.38 GiB less with them on one H100, in fresh processes); true: required; false: not "
            "automatically (the 4-bit recipes: 1b QLoRA ran 0.94x with them; TRL's --use_liger_kernel true "
            "still turns them on).",
            "choices": ["auto", "true", "false"],
        },
    )
    merge: bool = field(
        default=False, metadata={"help": "After training, write a merged bf16 model to output_dir/merged."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir holding another run (its checkpoints are deleted)."},
    )


def known_settings() -> set[str]:
    """Every key a recipe or the command line may set."""
    from trl import ModelConfig, SFTConfig

    return {f.name for cls in (FinQAArguments, SFTConfig, ModelConfig) for f in fields(cls) if f.init}


def _parser() -> Any:  # a TrlParser subclass, built lazily (importing trl is slow)
    from trl import ModelConfig, SFTConfig, TrlParser

    class Parser(TrlParser):
        def error(self, message: str):  # argparse would print usage + message and exit: make it one line
            raise UsageError(message)

    return Parser((FinQAArguments, SFTConfig, ModelConfig), prog="python -m finqa_trl.train")


# ------------------------------------------------------------------------------------------------ logging


class _MainRankOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") == "0"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest swaps it per test)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging() -> None:
    if logger.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[finqa_trl] %(message)s"))
    handler.addFilter(_MainRankOnly())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# ------------------------------------------------------------------------------------------------ parsing


def _pop_config(argv: list[str]) -> tuple[str, list[str]]:
    rest, config = [], None
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            config = next(it, None)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not config:
        raise UsageError(f"--config recipes/NAME.yaml is required; available: {', '.join(available())}")
    return config, rest


def _cli_keys(argv: Sequence[str]) -> list[str]:
    return [a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")]


def _cli_value(argv: Sequence[str], key: str) -> str | None:
    """The last value given to --key on the command line (`--key v` or `--key=v`), None when absent."""
    found = None
    for i, arg in enumerate(argv):
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name.replace("-", "_") == key:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def _check_pad_to_multiple_of(value: Any) -> None:
    """Checked before SFTConfig converts it (its bare `invalid literal for int()` names no option); a value
    that is not positive would break the collator's shapes mid-training."""
    text = str(value).strip().lower()
    if value is None or text in ("none", "null"):
        return
    if not text.lstrip("-").isdigit():
        raise UsageError(f"pad_to_multiple_of must be a positive integer or none, got {value!r}")
    if int(text) <= 0:
        raise UsageError(f"pad_to_multiple_of must be positive (or none), got {int(text)}")


def _no_accelerator() -> bool:
    import torch

    from .modeling import cuda_available

    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (cuda_available() or xpu or torch.backends.mps.is_available())


def _cpu_defaults(values: dict[str, Any], cli: Sequence[str]) -> dict[str, Any]:
    """Adapt a GPU recipe to a machine without bf16 (CPU, older GPUs), unless the command line says otherwise.

    SFTConfig's bf16 would fail there: train in fp32 instead, and say so. Without any accelerator, also set
    use_cpu, which is what makes a multi-process launch (torchrun, accelerate) form a gloo process group
    instead of silently running N independent single-process trainings.

    Returns the recipe's own values of the keys it changed, so the recorded recipe stays the portable one.
    """
    original: dict[str, Any] = {}
    if bf16_supported():
        return original
    changed = []
    if "bf16" not in cli and values.get("bf16", True):  # SFTConfig's bf16=None means True
        original["bf16"] = values.get("bf16", True)
        values["bf16"] = False
        changed.append("bf16=false")
    if "dtype" not in cli and values.get("dtype") in ("bfloat16", "float16"):
        original["dtype"] = values["dtype"]
        values["dtype"] = "float32"
        changed.append("dtype=float32")
    if "use_cpu" not in cli and _no_accelerator() and not values.get("use_cpu"):
        original["use_cpu"] = values.get("use_cpu", False)
        values["use_cpu"] = True
    if changed:
        logger.info("no bf16-capable GPU here: training in fp32 (%s)", ", ".join(changed))
        # An accelerate config asking for bf16 would turn bf16 autocast on regardless.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    return original


def _plain(value: Any) -> Any:
    """Make a parsed argument value YAML-friendly (enums -> their value)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


@dataclass
class Run:
    script: FinQAArguments
    training: Any  # trl.SFTConfig
    model: Any  # trl.ModelConfig
    recipe: Recipe
    resolved: dict[str, Any]  # the fully resolved recipe: recipe keys + command-line overrides, final values

    @property
    def method(self) -> str:
        return method_name(self.resolved)


def parse(argv: Sequence[str]) -> Run:
    """Resolve the recipe, apply the command line, build (FinQAArguments, SFTConfig, ModelConfig)."""
    config, rest = _pop_config(list(argv))
    recipe = resolve(config)
    known = known_settings()
    check_keys(recipe, known)
    unknown = [k for k in _cli_keys(rest) if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise UsageError(f"unknown option --{unknown[0]}{hint}")

    values = {"recipe": recipe.name, "output_dir": f"outputs/{recipe.name}", **recipe.values}
    _check_pad_to_multiple_of(_cli_value(rest, "pad_to_multiple_of") or values.get("pad_to_multiple_of"))
    adapted = _cpu_defaults(values, _cli_keys(rest))
    with tempfile.TemporaryDirectory(prefix="finqa-recipe-") as tmp:
        resolved_file = Path(tmp) / f"{recipe.name}.yaml"
        resolved_file.write_text(yaml.safe_dump(values, sort_keys=False))
        try:
            script, training, model, remaining = _parser().parse_args_and_config(
                ["--config", str(resolved_file), *rest], return_remaining_strings=True
            )
        except ValueError as err:  # raised by the dataclasses' __post_init__ checks
            raise UsageError(err) from None
    if remaining:
        raise UsageError(f"unexpected argument(s): {' '.join(remaining)}")
    _auto_true_false(script, "compile_layers")
    _auto_true_false(script, "causal_attention")
    _auto_true_false(script, "lora_dropout_kernel")
    _auto_true_false(script, "lean_recompute")
    _resolve_liger(script, training)
    # a YAML false/integer arrives as a bool/int: one spelling in the record and in the checks
    script.micro_batch_tokens = str(script.micro_batch_tokens).strip().lower()
    if "compile_scope" not in _cli_keys(rest) and not compiles_layers(script, training):
        # A recipe's scope (qdora-1b: body) is for where its layers compile; elsewhere (no GPU, FSDP) nothing
        # compiles, and the checks refuse a scope only where one was asked for on the command line. The
        # record keeps the recipe's value.
        adapted.setdefault("compile_scope", script.compile_scope)
        script.compile_scope = "auto"

    objs = (script, training, model)
    keys = list(dict.fromkeys([*values, *_cli_keys(rest), *PRECISION]))
    final = {}
    for key in keys:
        for obj in objs:
            if hasattr(obj, key):
                final[key] = _plain(getattr(obj, key))
                break
    # The record is what a rerun with it as --config should do: the recipe's precision, not this machine's
    # fallback (re-derived on every run), and never a one-off --overwrite_output_dir.
    final.update(adapted)
    final.pop("overwrite_output_dir", None)
    return Run(script, training, model, recipe, final)


def _auto_true_false(script: FinQAArguments, key: str) -> str:
    """An auto/true/false field: a YAML `false`/`true` arrives as a bool (and bypasses the parser's choices
    check), so it is normalised to its string and checked here."""
    value = str(getattr(script, key)).lower()
    if value not in ("auto", "true", "false"):
        raise UsageError(f"{key} must be auto, true or false, got {value!r}")
    setattr(script, key, value)
    return value


def _resolve_liger(script: FinQAArguments, training: Any) -> None:
    """--liger_kernel decides TRL's use_liger_kernel; the recorded recipe keeps `auto` (per machine). TRL's
    own --use_liger_kernel true still turns them on (false only means: not automatically)."""
    from . import modeling

    _auto_true_false(script, "liger_kernel")
    why_not = modeling.liger_unavailable(on_gpu=_on_gpu(training))
    if script.liger_kernel == "true" and why_not:
        raise UsageError(why_not)
    # Under --compile_layers inductor fuses what Liger's kernels fuse, and Liger's Triton functions inside a
    # compiled layer are more for dynamo to trace (the H100 run with both traced nothing: eager speed)
    auto = script.liger_kernel == "auto" and not why_not and not compiles_layers(script, training)
    if script.liger_kernel == "true" or auto:
        training.use_liger_kernel = True


def _causal_attention_blocker(training: Any, model: Any) -> str | None:
    """Why the causal mask alone would not do for this run (None: it does), worded after
    `--causal_attention true`: it needs sdpa, and rows that each hold one example."""
    if model.attn_implementation != "sdpa":
        return (
            f"runs sdpa's causal kernel: it needs --attn_implementation sdpa, got {model.attn_implementation}"
        )
    if training.packing or training.padding_free:
        return (
            "is for padded rows: with packing or padding_free several examples share one sequence, and a "
            "causal mask alone would let each see the ones before it"
        )
    return None


def causal_attention(script: FinQAArguments, training: Any, model: Any) -> bool:
    """Whether this run's training attention uses the causal mask only: `true`, or `auto` where nothing
    blocks it (`_validate` refuses `true` where something does)."""
    if script.causal_attention == "false":
        return False
    return script.causal_attention == "true" or _causal_attention_blocker(training, model) is None


def _on_gpu(training: Any) -> bool:
    """This run trains on a CUDA GPU (one is there, and --use_cpu is not given)."""
    from . import modeling

    return modeling.cuda_available() and not training.use_cpu


def _auto_triton(training: Any) -> bool:
    """Where `auto` turns on what Triton compiles (compile_layers, lora_dropout_kernel): a CUDA GPU that
    Triton compiles for, one process or DDP (not FSDP or DeepSpeed: their hooks and sharded weights)."""
    from . import modeling

    return _on_gpu(training) and not _fsdp_or_deepspeed(training) and modeling.triton_gpu_ready()


def fuses_lora_dropout(script: FinQAArguments, training: Any) -> bool:
    """Whether this run puts LoRA's dropout inside its A matmul: `true` (refused in _validate without a GPU),
    or `auto` on a CUDA GPU that Triton compiles for, one process or DDP."""
    if script.lora_dropout_kernel == "true":
        return True
    return script.lora_dropout_kernel == "auto" and _auto_triton(training)


def _lean_recompute_blocker(run: Run) -> str | None:
    """Why lean_recompute cannot apply to this run (None: it can)."""
    if run.model.use_dora:
        return "is for plain LoRA adapters: DoRA's forward reads the base weight"
    if not run.model.use_peft:
        return "is for LoRA adapters (use_peft)"
    if not run.training.activation_checkpointing:
        return "needs --activation_checkpointing true: without it nothing is recomputed"
    kwargs = run.training.activation_checkpointing_kwargs
    if kwargs is not None and kwargs.get("use_reentrant", True) is not False:
        return "needs the non-reentrant checkpoint (use_reentrant: false), whose recomputation stops early"
    if _fsdp_or_deepspeed(run.training):
        return "is for one process or DDP: FSDP and DeepSpeed manage the base weights the backward reads"
    if layer_compile_scope(run) == "layer":
        return "is for --compile_scope parts or body: a compiled layer holds its checkpoint inside the graph"
    return None


def leans_recompute(run: Run) -> bool:
    """Whether this run leaves the MLPs' down projections out of the recomputation: `true` (refused in
    _validate where it cannot apply), or `auto` where it can, the layers compile (eager, it holds a tokens x
    hidden buffer more at the peak: results/lean-recompute-2026-11-27/cpu-peak-output.txt) and the base is
    16-bit. On a 4-bit base, 1B QLoRA ran 0.86x and 0.87x the recipe without it on one H200 (its GPU waited on
    the host more; the cause is not established: its kernels took less time), 3B QLoRA 1.04x on two
    (results/speed-notes.md, Next 23)."""
    value = run.script.lean_recompute
    if value == "auto":
        return (
            _lean_recompute_blocker(run) is None
            and compiles_layers(run.script, run.training)
            and not run.model.load_in_4bit
        )
    return value == "true"


def layer_compile_scope(run: Run) -> str:
    """What compile_layers compiles of each decoder layer: --compile_scope, `auto` resolved. auto: the bodies
    for plain LoRA adapters, which as bodies ran faster than as parts in at least one order, and no slower
    than 0.99x in the other, at the same worst-step memory (one H200 each, both orders; machine TT: 1B QLoRA
    1.13x and 1.32x, 3B LoRA 1.07x and 1.04x, 1B LoRA 1.08x and 1.00x, and 1.08x and 1.11x with lora-1b's
    lean_recompute off; UU: 3B QLoRA 1.05x and 0.99x); the parts for DoRA (1B DoRA 1.05x and 0.97x on TT
    and UU, at 0.09 GiB more). qdora-1b sets body itself (1.07x and 1.055x on UU and VV, at 0.04 GiB more);
    3B QDoRA's bodies ran 1.06x at 0.06 GiB more (VV, one order), so auto keeps DoRA's parts.
    prepare falls back to the parts where a layer cannot compile as a body (modeling.body_blocker)."""
    scope = run.script.compile_scope
    if scope == "auto":
        return "parts" if run.model.use_dora else "body"
    return scope


def compiles_layers(script: FinQAArguments, training: Any) -> bool:
    """Whether this run compiles the decoder layers (parts or bodies: layer_compile_scope): `true`, or `auto`
    on a CUDA GPU for one process or DDP (`true` under FSDP or DeepSpeed is refused in _validate: their module
    hooks would be traced with the layers)."""
    if training.torch_compile:  # the Trainer compiles the whole model (the bench's compile_model): not twice
        return False
    if script.compile_layers == "true":
        return True
    return script.compile_layers == "auto" and _auto_triton(training)


def _fixed_micro_batches_only(training: Any) -> str | None:
    """Why this launch keeps fixed micro-batches whatever --micro_batch_tokens says (None: it need not); the
    line an explicit budget is refused with."""
    if _fsdp_or_deepspeed(training):
        # DeepSpeed's engine counts micro-steps itself (it would step the optimizer after each micro-batch),
        # and FSDP would hold unsharded gradients between them
        return (
            "--micro_batch_tokens N is for one GPU or DDP: under FSDP and DeepSpeed the micro-batches stay "
            "fixed (auto leaves them so)"
        )
    if training.padding_free or training.packing:
        return (
            "--micro_batch_tokens N regroups the padded rows of a batch: it does not apply with padding_free "
            "or packing"
        )
    if training.auto_find_batch_size:  # it would halve the step's examples; passes already bound the memory
        return (
            "--micro_batch_tokens N bounds each pass by tokens; auto_find_batch_size would halve the "
            "examples of each step instead: use one of the two"
        )
    return None


def auto_fraction(value: str) -> float | None:
    """The fraction of the auto budget that `auto` (1) or `auto:F` asks for; None for any other value, or
    an F outside (0, 1]."""
    if value == "auto":
        return 1.0
    head, _, tail = value.partition(":")
    try:
        fraction = float(tail) if head == "auto" and tail else 0.0
    except ValueError:
        return None
    return fraction if 0 < fraction <= 1 else None


def micro_batch_tokens(script: FinQAArguments, training: Any) -> int | str | None:
    """What --micro_batch_tokens asks of this run: None (fixed micro-batches), "auto" or "auto:F" (a budget
    that prepare derives from the data) or a token budget. Off where it cannot apply
    (_fixed_micro_batches_only; an integer is refused there, in _validate) and for auto without
    accumulation (nothing to regroup)."""
    value = script.micro_batch_tokens
    if value == "false" or _fixed_micro_batches_only(training):
        return None
    if auto_fraction(value) is not None:
        return value if training.gradient_accumulation_steps > 1 else None
    return int(value)


def _check_micro_batch_tokens(run: Run) -> None:
    value = run.script.micro_batch_tokens
    if value == "false" or auto_fraction(value) is not None:
        return
    if not value.isdigit() or int(value) <= 0:
        raise UsageError(
            "micro_batch_tokens must be auto, auto:F (0 < F <= 1), false or a positive number of tokens, "
            f"got {value!r}"
        )
    why = _fixed_micro_batches_only(run.training)
    if why:
        raise UsageError(why)


def _check_uncheckpointed_layers(run: Run) -> None:
    n = run.script.uncheckpointed_layers
    if n < 0:
        raise UsageError(f"uncheckpointed_layers must be 0 or more, got {n}")
    if not n:
        return
    if not run.training.activation_checkpointing:
        raise UsageError(
            "--uncheckpointed_layers N needs --activation_checkpointing true: without it no layer is "
            "checkpointed"
        )
    if _fsdp_or_deepspeed(run.training):
        raise UsageError(
            "--uncheckpointed_layers N is for one process or DDP: FSDP and DeepSpeed wrap the layers' "
            "checkpoints themselves"
        )
    if layer_compile_scope(run) == "layer" and compiles_layers(run.script, run.training):
        raise UsageError(
            "--uncheckpointed_layers N is for --compile_scope parts or body: a compiled layer holds its "
            "checkpoint inside the graph"
        )


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


def padded_width(lengths: Sequence[int], rows: Sequence[int], multiple: int | None) -> int:
    """The padded length of a micro-batch of `rows` (indices into `lengths`): its longest row, rounded up to
    `multiple` as the collator pads it."""
    return _round_up(max(lengths[r] for r in rows), multiple)


def plan_micro_batches(
    lengths: Sequence[int], budget: int, multiple: int | None = None, parts: int | None = None
) -> list[list[int]]:
    """The rows of one batch (indices into `lengths`, their unpadded lengths) in the fewest micro-batches
    whose rows x padded length (the longest row, rounded up to `multiple`) stays within `budget` tokens, or in
    `parts` micro-batches (at most one per row) where the processes of a DDP run must agree. Rows go longest
    first; where near-equal row counts fit (the smaller micro-batches taking the longest rows: length-grouped
    batches, whose rows are alike), those, else each micro-batch filled in turn. A row longer than the budget
    gets a micro-batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def cost(group: list[int]) -> int:
        return len(group) * padded_width(lengths, group, multiple)

    filled: list[list[int]] = []  # the fewest: each micro-batch takes the next rows while they fit
    for i in order:
        if filled and cost([*filled[-1], i]) <= budget:
            filled[-1].append(i)
        else:
            filled.append([i])
    n = max(1, min(max(len(filled), parts or 1), len(order)))
    q, r = divmod(len(order), n)
    sizes, even, start = [q] * (n - r) + [q + 1] * r, [], 0
    for size in sizes:
        even.append(order[start : start + size])
        start += size
    if all(cost(group) <= budget for group in even):
        return even
    while len(filled) < n:  # more parts agreed on: halve the biggest (a part of a micro-batch fits too)
        big = max(range(len(filled)), key=lambda k: len(filled[k]))
        group = filled.pop(big)
        filled[big:big] = [group[: len(group) // 2], group[len(group) // 2 :]]
    return filled


# ------------------------------------------------------------------------------------------------ checks


def _validate(run: Run) -> None:
    m, s = run.model, run.script
    if not m.model_name_or_path:
        raise UsageError(f"{run.recipe.path}: no model_name_or_path (set it or pass --model_name_or_path)")
    if m.load_in_8bit:
        raise UsageError(
            "load_in_8bit is not supported: an 8-bit base under DeepSpeed ZeRO-3 trains to a wrong loss "
            "(bitsandbytes issue #1451); use load_in_4bit (QLoRA/QDoRA recipes)"
        )
    if m.load_in_4bit and not m.use_peft:
        raise UsageError("a 4-bit base can only be trained through an adapter: set use_peft true")
    if m.load_in_4bit:
        _check_sharded_4bit(run)
    if m.use_dora and _uses_deepspeed(run.training) and run.training.bf16:
        # DeepSpeed's bf16 mode runs the forward on bf16 copies of every parameter (its keep_in_fp32_modules
        # covers buffers only), the DoRA magnitude vector included, which TRL and PEFT otherwise keep in fp32
        # for this reason (TRL #7268): its fp32 master copy learns, but updates reach the forward only once
        # they add up to half a bf16 step (0.2-0.4% of a magnitude of ~6: ~150 steps at lr 1e-4). Seen on
        # the CPU (every magnitude bf16 at step 1 under ZeRO-2, fp32 without it); measured on 2 GPUs
        # (results/multi-gpu): QDoRA under ZeRO-2 ran close to the LoRA loss curve, up to 17.4% from one GPU's
        # QDoRA curve, most likely for this reason. ZeRO-3 runs the same bf16 mode (not run with DoRA).
        raise UsageError(
            "DoRA under DeepSpeed in bf16 does not train like one GPU: DeepSpeed runs the DoRA magnitude in "
            "bf16, where its small updates show only after many steps (QDoRA under ZeRO-2 on 2 GPUs: loss up "
            "to 17% from one GPU's, results/multi-gpu); use ACCELERATE_CONFIG=multi_gpu (DDP), or LoRA/QLoRA "
            "under DeepSpeed"
        )
    _check_precision_options(run)
    if s.eg_k < 0:
        raise UsageError(f"eg_k must be >= 0, got {s.eg_k}")
    if s.max_prompt_tokens is not None and s.max_prompt_tokens <= 0:
        raise UsageError(f"max_prompt_tokens must be positive, got {s.max_prompt_tokens}")
    if s.compile_layers == "true" and _fsdp_or_deepspeed(run.training):
        raise UsageError(
            "--compile_layers true is for one GPU or DDP: FSDP's and DeepSpeed's hooks on each layer would "
            "be compiled with its parts (auto leaves such runs eager)"
        )
    if s.compile_mode != "default" and not compiles_layers(s, run.training):
        raise UsageError(
            f"--compile_mode {s.compile_mode} applies where the layers are compiled (--compile_layers true, "
            "or auto on a CUDA GPU for one process or DDP)"
        )
    if s.compile_scope not in ("auto", "parts", "layer", "body"):  # a YAML value skips the parser's choices
        raise UsageError(f"compile_scope must be auto, parts, layer or body, got {s.compile_scope!r}")
    if s.compile_scope not in ("auto", "parts"):
        if not compiles_layers(s, run.training):
            raise UsageError(
                f"--compile_scope {s.compile_scope} applies where the layers are compiled (--compile_layers "
                "true, or auto on a CUDA GPU for one process or DDP)"
            )
        if run.model.use_dora and s.compile_scope == "layer":
            raise UsageError(
                "--compile_scope layer is not for DoRA: PEFT's DoRA forward writes to a dict outside the "
                "layer, which dynamo cannot replay inside the layer's checkpoint, so the layer would run "
                "eager (--compile_scope parts compiles DoRA's parts)"
            )
    if run.training.packing and run.training.max_length is None:  # else TRL raises a bare ValueError
        raise UsageError(
            "--packing true needs --max_length N: TRL packs examples into rows of that many tokens (the "
            "recipes leave max_length null)"
        )
    if s.lora_dropout_kernel == "true" and not _kernels_run_here(run.training):
        raise UsageError(
            "--lora_dropout_kernel true needs a CUDA GPU (its kernels are Triton kernels; auto leaves CPU "
            "runs to PEFT's dropout)"
        )
    blocker = _lean_recompute_blocker(run)
    if s.lean_recompute == "true" and blocker:
        raise UsageError(f"--lean_recompute true {blocker}")
    blocker = _causal_attention_blocker(run.training, run.model)
    if s.causal_attention == "true" and blocker:
        raise UsageError(f"--causal_attention true {blocker}")
    _check_micro_batch_tokens(run)
    _check_uncheckpointed_layers(run)
    if run.training.push_to_hub and not run.training.hub_model_id:
        raise UsageError("push_to_hub needs --hub_model_id USER/NAME")


def _kernels_run_here(training: Any) -> bool:
    """A CUDA GPU, or Triton's interpreter (TRITON_INTERPRET=1: the tests, on the CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or _on_gpu(training)


def _check_precision_options(run: Run) -> None:
    """A precision option that would do nothing in this run is refused, not ignored: a run (or a timing) made
    with it would be reported as something it is not."""
    m, s, training = run.model, run.script, run.training
    if s.kbit_fp32_upcast and not m.load_in_4bit:
        raise UsageError(
            "--kbit_fp32_upcast true applies to 4-bit bases (QLoRA/QDoRA recipes): nothing to upcast"
        )
    if s.kbit_fp32_upcast and _is_sharded(training):
        # Not refused: a q-run saved before the key was recorded ran with the upcast on one device, and its
        # resume is told to pass `true`; under sharding that run never upcast either.
        logger.warning(
            "--kbit_fp32_upcast true does nothing under FSDP/ZeRO-3: the sharded 4-bit base keeps one dtype, "
            "so embeddings, norms and LM head stay in the compute dtype"
        )
    if s.adapters_in_compute_dtype:
        if m.load_in_4bit:
            raise UsageError(
                "--adapters_in_compute_dtype true applies to 16-bit bases: TRL already keeps the adapters "
                "of a 4-bit base in the compute dtype"
            )
        if _fsdp_or_deepspeed(training):
            raise UsageError(
                "--adapters_in_compute_dtype true does nothing under FSDP (accelerate upcasts trainable bf16 "
                "weights to fp32) or DeepSpeed (bf16 everywhere): drop it, or use DDP / one GPU"
            )

    if s.adapter_weight_copies and (why := _weight_copies_blocker(run)):
        raise UsageError(f"--adapter_weight_copies true {why}")
    if _auto_true_false(s, "adapter_input_cast") == "false":
        if not _input_cast_skippable(run):
            raise UsageError(
                "--adapter_input_cast false applies to fp32 adapters of a bf16 base under bf16 mixed "
                "precision: here there is no such cast (no adapter, a 4-bit or non-bf16 base, "
                "--adapters_in_compute_dtype true, or no bf16)"
            )
        if _fsdp_or_deepspeed(training):
            raise UsageError(
                "--adapter_input_cast false is for one GPU or DDP: FSDP and DeepSpeed compute the adapters "
                "in bf16 themselves"
            )


def _weight_copies_blocker(run: Run) -> str | None:
    """Why adapter_weight_copies cannot apply to this run (None: it can)."""
    if not _input_cast_skippable(run):
        return (
            "applies to fp32 adapters of a bf16 base under bf16 mixed precision: here autocast casts no "
            "adapter weight (no adapter, a 4-bit or non-bf16 base, --adapters_in_compute_dtype true, or no "
            "bf16)"
        )
    if run.model.use_dora:
        return "is for plain LoRA adapters: DoRA's forward reads A and B itself"
    if _fsdp_or_deepspeed(run.training):
        return "is for one GPU or DDP: FSDP and DeepSpeed compute the adapters in bf16 themselves"
    if fuses_lora_dropout(run.script, run.training):
        return "does not combine with lora_dropout_kernel, whose kernel reads A's weight itself"
    return None


def _input_cast_skippable(run: Run) -> bool:
    """fp32 adapters of a bf16 base under bf16 autocast: the only case where PEFT copies each adapted
    layer's input to another dtype. `auto`/unset dtype loads bf16 on a bf16 GPU (Llama 3.2's own dtype)."""
    m, s, training = run.model, run.script, run.training
    bf16_base = m.use_peft and m.dtype not in ("float32", "float16") and not m.load_in_4bit
    return bool(bf16_base and training.bf16 and not s.adapters_in_compute_dtype)


def skips_input_cast(run: Run) -> bool:
    """Whether this run turns PEFT's input cast off: `false` (checked to apply), or `auto` for LoRA where it
    applies and the adapters are not sharded (FSDP and DeepSpeed compute them in bf16 themselves). DoRA keeps
    the cast under `auto`: PEFT's DoRA forward computes part of its result in the input's dtype, so skipping
    the cast changes its numbers (4e-5 relative on the CPU), and on real weights (SmolLM2) it ended about 1%
    higher in loss without it, two runs each way."""
    s, training = run.script, run.training
    if s.adapter_input_cast == "false":
        return True
    sharded = _fsdp_or_deepspeed(training)
    lora = not run.model.use_dora
    return s.adapter_input_cast == "auto" and lora and _input_cast_skippable(run) and not sharded


def check_output_dir(output_dir: Path, resolved: dict[str, Any], overwrite: bool) -> None:
    """Refuse an output_dir that holds another recipe's run, or unknown files, unless `overwrite`."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UsageError(f"output_dir {output_dir} exists and is not a directory")
    saved_file = output_dir / RECIPE_FILE
    if not saved_file.is_file():
        if any(output_dir.iterdir()):  # even with overwrite: it may be anything (`--output_dir .`)
            raise UsageError(
                f"output_dir {output_dir} is not empty and holds no {RECIPE_FILE} (not a run of this "
                "project): pick another --output_dir"
            )
        return
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError:
        saved = {}
    saved = {**PRECISION, **saved}  # a recipe saved before these keys were recorded ran with these values
    keys = [*IDENTITY, *PRECISION]
    if not resolved.get("load_in_4bit"):
        keys.remove("kbit_fp32_upcast")  # means nothing for a 16-bit base
    diff = [k for k in keys if _norm(saved.get(k)) != _norm(resolved.get(k))]
    if diff and not overwrite:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {resolved.get(k)!r}" for k in diff)
        raise UsageError(
            f"output_dir {output_dir} holds a run of recipe {saved.get('recipe')!r} that differs "
            f"({changes}); pick another --output_dir, or pass --overwrite_output_dir true to start over there"
        )


def _norm(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 1:  # ModelConfig turns [x] into x
        return value[0]
    return value


def _write_recipe(output_dir: Path, resolved: dict[str, Any]) -> None:
    """The fully resolved recipe; itself a valid --config (rerunning it resumes this run)."""
    text = (
        f"# {method_name(resolved)} run of recipe {resolved.get('recipe')}: the fully resolved recipe\n"
        "# (recipe + command line), written by finqa_trl.train. `--config` accepts it as it is.\n"
        + yaml.safe_dump(resolved, sort_keys=False)
    )
    write_atomic(output_dir / RECIPE_FILE, lambda f: f.write(text))  # other ranks may be reading it


def _uses_fsdp(training: Any) -> bool:
    """FSDP, from `accelerate launch` (which sets ACCELERATE_USE_FSDP) or SFTConfig's own --fsdp."""
    return bool(training.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _uses_deepspeed(training: Any) -> bool:
    """DeepSpeed, from `accelerate launch` or --deepspeed: SFTConfig then holds its plugin."""
    return getattr(training, "deepspeed_plugin", None) is not None


def _fsdp_or_deepspeed(training: Any) -> bool:
    """The launch wraps the model itself: hooks on its modules, adapters in bf16 (unlike DDP and one GPU)."""
    return _uses_fsdp(training) or _uses_deepspeed(training)


def _zero3(training: Any) -> tuple[bool, bool]:
    """(ZeRO stage 3?, zero3 init on?) as accelerate resolves them. SFTConfig builds its DeepSpeedPlugin from
    what `accelerate launch` exports (ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE or the stage
    in ACCELERATE_DEEPSPEED_CONFIG_FILE, ACCELERATE_DEEPSPEED_ZERO3_INIT, which defaults to on for stage 3)
    or from --deepspeed ds.json, so reading the plugin covers every route."""
    ds = getattr(training, "deepspeed_plugin", None)
    if ds is None or int(ds.zero_stage) != 3:
        return False, False
    return True, bool(ds.zero3_init_flag)


def _is_sharded(training: Any) -> bool:
    """FSDP or DeepSpeed ZeRO-3: the base model's parameters are sharded across ranks."""
    return _uses_fsdp(training) or _zero3(training)[0]


def _check_sharded_4bit(run: Run) -> None:
    """Known upstream traps of a sharded 4-bit base, stopped at launch rather than minutes into loading."""
    m, training = run.model, run.training
    if _uses_fsdp(training) and m.bnb_4bit_quant_storage:
        # FSDP flattens every parameter of a unit into one tensor of one dtype: the packed 4-bit weights
        # (stored as quant_storage) and the rest of the model (loaded in dtype) must agree. Unset is fine:
        # modeling.load_model then stores in the compute dtype.
        compute = m.dtype if m.dtype not in (None, "auto") else str(default_dtype()).removeprefix("torch.")
        if m.bnb_4bit_quant_storage != compute:
            raise UsageError(
                f"FSDP with a 4-bit base needs bnb_4bit_quant_storage equal to the compute dtype: set "
                f"--bnb_4bit_quant_storage {compute} (it is {m.bnb_4bit_quant_storage})"
            )
    zero3, zero3_init = _zero3(training)
    if zero3 and not zero3_init:
        # PEFT's QLoRA + ZeRO-3 recipe needs it, and with it off accelerate treats parameters as unsharded
        # (its GatheredParameters becomes a no-op): code reading the full 4-bit weights would see shards.
        raise UsageError(
            "DeepSpeed ZeRO-3 with a 4-bit base needs zero3 init: set zero3_init_flag: true in the "
            "accelerate config or pass --zero3_init_flag true to accelerate launch "
            "(ACCELERATE_DEEPSPEED_ZERO3_INIT is false)"
        )
    if _uses_fsdp(training) and m.use_dora:
        # Measured (results/multi-gpu): QDoRA under FSDP ran up to its first optimizer step, where AdamW found
        # the tensors of one parameter in different dtypes: the LoRA A/B flat parameters of DoRA layers get
        # bf16 gradients, even with every trainable parameter cast to fp32 before wrapping
        # (fsdp-qdora-diagnostic.txt). Not proven why: the 4-bit base, or DoRA calling lora_A/lora_B twice
        # per forward. LoRA (16-bit base) under FSDP trains and matches one GPU; QLoRA was not run.
        raise UsageError(
            "DoRA on a 4-bit base (QDoRA) under FSDP fails at the first optimizer step (AdamW: 'Tensors of "
            "the same index must be on the same device and the same dtype'; 2 GPUs, torch 2.11, accelerate "
            "1.15, peft 0.21.2): use ACCELERATE_CONFIG=multi_gpu (DDP) for QDoRA"
        )
    # DoRA on a 4-bit base under ZeRO-3 (QDoRA) once failed with a shape mismatch (peft issue #1731); a GPU
    # run of this project trained it with peft 0.21. In bf16, _validate's DeepSpeed + DoRA check stops it.


def _keep_adapter_dtypes_on_resume(trainer: Any) -> None:
    """Resuming reloads the adapter through PEFT's `load_adapter`, which by default casts bf16 adapter
    weights to fp32 (`autocast_adapter_dtype`): a resumed QLoRA/QDoRA run (TRL keeps its LoRA A/B in bf16),
    or one with --adapters_in_compute_dtype, would go on in another precision than it started with. The
    reload copies the saved values into the existing weights, so without the cast every weight keeps its
    dtype; `load_best_model_at_end` reloads the same way. FSDP and DeepSpeed load checkpoints otherwise."""
    model = trainer.model
    if hasattr(model, "load_adapter"):
        model.load_adapter = functools.partial(model.load_adapter, autocast_adapter_dtype=False)


def describe_weights(model: Any) -> str:
    """E.g. "4-bit nf4 linear layers, float32 elsewhere" or "bfloat16"."""
    cfg = getattr(model, "hf_quantizer", None)
    cfg = getattr(cfg, "quantization_config", None)
    dtypes = sorted(
        {
            str(p.dtype).removeprefix("torch.")
            for p in model.parameters()
            if p.dtype.is_floating_point and type(p).__name__ != "Params4bit"  # packed 4-bit storage
        }
    )
    if cfg is not None and getattr(cfg, "load_in_4bit", False):
        return f"4-bit {cfg.bnb_4bit_quant_type} linear layers, {'/'.join(dtypes)} elsewhere"
    return "/".join(dtypes)


# ------------------------------------------------------------------------------------------------ data


def load_records(data_dir: str | None, splits: Sequence[str], limit: int | None = None) -> list[dict]:
    """The FinQA records of `splits`, concatenated (the first `limit` only). DataError if any is missing."""
    records = [ex for split in splits for ex in load_split(data_dir, split)]
    return records if limit is None else records[:limit]


def build_dataset(
    script: FinQAArguments, records: list[dict], tokenizer: Any, shots_from: list[dict] | None = None
) -> Any:
    """FinQA records -> a `datasets.Dataset` of TRL conversational prompt/completion rows (+ "id")."""
    from datasets import Dataset

    from .prompts import format_split

    try:
        rows = format_split(
            records,
            context=script.context,
            eg_k=script.eg_k,
            train_examples=shots_from if shots_from is not None else records,
            tokenizer=tokenizer,
            max_prompt_tokens=script.max_prompt_tokens,
            trim=script.trim,
        )
    except ValueError as err:
        raise UsageError(err) from None
    rows = [r for r in rows if "completion" in r]  # unlabelled records cannot be trained on
    if not rows:
        raise DataError("no labelled examples to train on")
    return Dataset.from_list(rows)


def _rows(value: Any, index: Any, rows: int, width: int, keep: int) -> Any:
    """`value` (a batch entry) for the rows in `index`, cut to `keep` positions where it is per position."""
    import torch

    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
        return value
    value = value.index_select(0, index)
    return value[:, :keep] if value.dim() >= 2 and value.shape[1] == width else value


@functools.cache
def _trainer_class() -> type:
    """TRL's SFTTrainer, except that a run resumed in the middle of an epoch sees the batches the
    uninterrupted run saw. transformers' LengthGroupedSampler (the recipes' `group_by_length`) draws each
    epoch's permutation from the global torch RNG when the epoch starts; a resumed run draws it again from
    another RNG state, then skips the batches it believes were done, so that epoch held other batches: some
    examples twice, others never (the smoke recipe on the CPU: resumed and straight adapters 0.004 apart on
    one process, 0.01 on two; 0 with random or sequential order, whose samplers accelerate seeds per epoch).
    Here the permutation comes from the run's seed and the epoch number. The epoch is read from the trainer's
    state when the epoch's batches are first drawn, not passed by `set_epoch`: after a resume's skip,
    accelerate's dataloader under several processes does not reach the sampler with it. The same objective
    and grouping; only where the randomness comes from differs."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTTrainer

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        def __init__(self, batch_size: int, lengths: list[int], seed: int, epoch: Callable[[], int]) -> None:
            super().__init__(batch_size, lengths=lengths)
            self.seed, self.epoch_now = seed, epoch

        def __iter__(self) -> Any:
            self.generator = torch.Generator().manual_seed(self.seed + self.epoch_now())
            return super().__iter__()

    class FinQATrainer(SFTTrainer):
        # set by prepare where --micro_batch_tokens applies: each step's batch runs in micro-batches of at
        # most this many padded tokens; the forward + backward passes this process ran, counted
        micro_batch_tokens: int | None = None
        passes: int = 0
        # set by prepare (--uncheckpointed_layers): the decoder layers that run without their checkpoint
        uncheckpointed: tuple[Any, ...] = ()
        # set by prepare (--defer_metrics): each training pass's metric sums, read once per log
        defer_metrics: bool = False
        pending_metrics: list[torch.Tensor] | None = None

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            parallel = getattr(self.accelerator, "parallelism_config", None)
            if not (
                self.defer_metrics
                and model.training
                and not return_outputs
                and self.compute_loss_func is None
                and self.label_smoother is None
                and self.args.loss_type == "nll"
                and not self.aux_loss_enabled
                and not (parallel is not None and parallel.sp_enabled)
                and "attention_mask" in inputs  # padding_free rows (packing) count tokens otherwise: TRL's
            ):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # TRL 1.16's loss as its compute_loss computes it in this case (its fused LM head: the summed
            # log-likelihood of the trained tokens over the step's count); only its metrics differ, kept as
            # GPU tensors here where TRL reads each pass's on the host (`.item()`, `num_valid > 0`)
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            sums = (
                outputs.label_mask.sum(),
                outputs.entropy.detach().sum(),
                outputs.is_top1.sum(),
                inputs["attention_mask"].sum(),
            )
            # float32: exact for these counts (a pass's tokens), and MPS has no float64
            gathered = [self.accelerator.gather_for_metrics(t).sum().float() for t in sums]
            self.pending_metrics = [*(self.pending_metrics or []), torch.stack(gathered)]
            return loss

        def read_pending_metrics(self) -> None:
            """One read of every pass's metrics since the last, appended as TRL appends each pass's."""
            if not self.pending_metrics:
                return
            for valid, entropy, correct, tokens in torch.stack(self.pending_metrics).tolist():
                self._metrics["train"]["entropy"].append(entropy / valid if valid > 0 else 0.0)
                self._metrics["train"]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
                self._total_train_tokens += int(tokens) // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            self.pending_metrics = None

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            self.read_pending_metrics()
            super().log(logs, start_time)

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            self.read_pending_metrics()  # TRL's eval logs the training token count so far
            return super().evaluate(*args, **kwargs)

        def training_step(
            self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
        ) -> torch.Tensor:
            # The Trainer switches checkpointing on for every layer when training starts (and again on a
            # resume); transformers' layers read the flag at each call
            for layer in self.uncheckpointed:
                layer.gradient_checkpointing = False
            mask = inputs.get("attention_mask")
            if not self.micro_batch_tokens or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                return super().training_step(model, inputs, num_items_in_batch)
            rows, width = mask.shape
            multiple = self.args.pad_to_multiple_of
            lengths = mask.sum(1).tolist()  # right-padded (TRL's collator): each row's tokens come first
            groups = plan_micro_batches(lengths, self.micro_batch_tokens, multiple)
            parts = len(groups)
            if self.accelerator.num_processes > 1:
                # every process runs as many passes: TRL gathers its metrics in each, and DDP reduces the
                # gradients in the last one
                agreed = torch.tensor(parts, device=mask.device)
                torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
                if int(agreed) != parts:
                    parts = int(agreed)
                    groups = plan_micro_batches(lengths, self.micro_batch_tokens, multiple, parts)
            self.passes += parts
            if parts == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            if num_items_in_batch is None:
                # The Trainer counts the step's trained tokens only for a model that takes loss kwargs (PEFT's
                # Llama does); without the count each pass would be its own mean. Counted here, the passes add
                # up to the step's token mean (fixed micro-batches would average their means instead)
                num_items_in_batch = (inputs["labels"][..., 1:] != -100).sum()
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    num_items_in_batch = self.accelerator.gather(num_items_in_batch).sum()
            total = None
            for i, group in enumerate(groups):
                keep = min(width, padded_width(lengths, group, multiple))
                index = torch.tensor(group, device=mask.device)
                part = {key: _rows(value, index, rows, width, keep) for key, value in inputs.items()}
                last = i == len(groups) - 1  # DDP reduces the summed gradients once, after the last pass
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = super().training_step(model, part, num_items_in_batch)
                total = loss if total is None else total + loss
            return total

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is not LengthGroupedSampler:
                return sampler
            seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
            # state.epoch is k exactly when epoch k begins (k + steps/steps), and k plus a fraction when a run
            # resumes inside epoch k; its batches are drawn before the epoch's first step updates it.
            return EpochSeededLengthGroupedSampler(
                sampler.batch_size, sampler.lengths, seed, lambda: math.floor(self.state.epoch or 0)
            )

    return FinQATrainer


def build_trainer(
    run: Run,
    model: Any,
    tokenizer: Any,
    train_ds: Any,
    eval_ds: Any = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """TRL's SFTTrainer with the recipe's LoRA/DoRA adapter. Tokenization, completion-only labels and
    collation are TRL's own: prompt tokens get label -100; the program and its end-of-turn token train."""
    from trl import get_peft_config

    return _trainer_class()(
        model=model,
        args=run.training,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=get_peft_config(run.model),
        callbacks=list(callbacks),
    )


# ------------------------------------------------------------------------------------------------ hub


def _hub_callback(training: Any, output_dir: Path) -> Any:  # a TrainerCallback, built lazily
    from huggingface_hub import HfApi
    from transformers import TrainerCallback

    class HubPushCallback(TrainerCallback):
        """Push the adapter at the end of every epoch (forcing a checkpoint there) and after the final save.

        Trainer's own pushing is switched off (push_to_hub=False on the trainer) so nothing is pushed twice.
        Epoch pushes run on the main process only and a failure there is logged, not fatal.
        """

        ignore = [
            "optimizer.pt",
            "scheduler.pt",
            "rng_state*",
            "training_args.bin",
            "checkpoint-*",
            "merged/*",
            LAUNCH_FILE,  # this machine's launch, for resuming here
        ]

        def __init__(self) -> None:
            self.api = HfApi(token=training.hub_token)
            self.repo_id = training.hub_model_id
            self.private = training.hub_private_repo
            self.epoch_end = False
            self.created = False

        def _push(self, folder: Path, message: str) -> None:
            if not self.created:
                self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                self.created = True
            self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=str(folder),
                commit_message=message,
                ignore_patterns=self.ignore,
            )
            recipe_file = output_dir / RECIPE_FILE
            if recipe_file.is_file() and not (folder / RECIPE_FILE).is_file():
                self.api.upload_file(
                    path_or_fileobj=str(recipe_file),
                    path_in_repo=RECIPE_FILE,
                    repo_id=self.repo_id,
                    commit_message=message,
                )

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            # force a checkpoint: what Trainer writes there (gathered under FSDP/ZeRO-3) is what we push
            control.should_save = True
            self.epoch_end = True
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.epoch_end and state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                try:
                    self._push(ckpt, f"epoch {state.epoch:.0f} (step {state.global_step})")
                    logger.info("pushed epoch %.0f to https://huggingface.co/%s", state.epoch, self.repo_id)
                except Exception as err:  # a network hiccup must not kill a long run
                    logger.warning("hub push of epoch %.0f failed: %s", state.epoch, err)
            self.epoch_end = False
            return control

        def push_final(self) -> None:
            self._push(output_dir, "final adapter")
            logger.info("pushed the final adapter to https://huggingface.co/%s", self.repo_id)

    return HubPushCallback()


# ------------------------------------------------------------------------------------------------ run


@dataclass
class Prepared:
    """Everything `train` needs, ready: what `prepare` returns (also used by finqa_trl.bench)."""

    run: Run
    trainer: Any  # trl.SFTTrainer
    resume: str | None  # the checkpoint training resumes from
    hub: Any = None  # the HubPushCallback, when pushing
    compiled_layers: int = 0  # decoder layers compiled (compile_layers), their parts or bodies
    fused_dropouts: int = 0  # LoRA adapters with their dropout inside A's matmul (lora_dropout_kernel)
    lean_mlps: int = 0  # MLPs whose down projection the recomputation leaves out (lean_recompute)
    compile_scope: str | None = None  # what of each layer compiled (parts, layer, body); None: nothing
    weight_copies: int = 0  # fp32 adapter weights computed from bf16 copies (adapter_weight_copies)


def prepare(run: Run) -> Prepared:
    """Check the input (before anything is written), record the recipe, load tokenizer + data + model, and
    build the trainer. The batch and Hub settings it changes for the trainer (batch size, accumulation,
    push_to_hub) are changed on a shallow copy, the returned Prepared.run: in the caller's Run they read as
    parsed, so a second prepare plans the same budget. Nested settings (kwargs dicts) stay shared."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.trainer_utils import get_last_checkpoint

    run = replace(run, training=copy.copy(run.training))
    script, training, margs = run.script, run.training, run.model
    output_dir = Path(training.output_dir)

    # -- every check that can fail on user input comes before anything is written or loaded
    _validate(run)
    if _uses_fsdp(training):
        fsdp_safe_adapter_keys()  # else PEFT saves the adapter (and every checkpoint) empty under FSDP
    records = load_records(script.data_dir, script.train_splits, script.max_train_samples)
    run.resolved["data_dir"] = str(resolve_data_dir(script.data_dir))  # record where the data came from
    eval_records = None
    if str(getattr(training.eval_strategy, "value", training.eval_strategy)) != "no":
        eval_records = load_records(script.data_dir, script.eval_splits)
    if margs.load_in_4bit:
        check_4bit_supported()
    check_output_dir(output_dir, run.resolved, script.overwrite_output_dir)
    # -- resume from the last checkpoint of this recipe's output_dir (checked before the model loads)
    resume = training.resume_from_checkpoint
    if resume is None and not script.overwrite_output_dir and output_dir.is_dir():
        resume = get_last_checkpoint(str(output_dir))
        if resume:
            logger.info("resuming from %s", resume)
    if isinstance(resume, str) and Path(resume).is_dir():
        if script.overwrite_output_dir and Path(resume).resolve().is_relative_to(output_dir.resolve()):
            raise UsageError(
                f"--resume_from_checkpoint {resume} lies in the output_dir that --overwrite_output_dir true "
                "would empty first: drop one of the two"
            )
        check_resume_launch(Path(resume), training)

    state = training.distributed_state  # initialised by SFTConfig
    # Global rank 0 first, not each node's local rank 0 (Trainer's default): under an initialised process
    # group, transformers' save_pretrained writes weights on global rank 0 only, so a smoke/GGUF copy built by
    # another node's local main would hold no weights, and two nodes building into one shared cache race.
    with training.main_process_first(local=False, desc="model source"):
        source = resolve_source(margs.model_name_or_path, script.gguf_file)
        if margs.load_in_4bit:
            source = materialize_gguf(source)

    # -- tokenizer, data, model
    tokenizer = load_tokenizer(
        source, revision=margs.model_revision, trust_remote_code=training.trust_remote_code
    )
    train_ds = build_dataset(script, records, tokenizer)
    eval_ds = None if eval_records is None else build_dataset(script, eval_records, tokenizer, records)
    model = load_model(
        source,
        dtype=margs.dtype,
        load_in_4bit=margs.load_in_4bit,
        quant_type=margs.bnb_4bit_quant_type,
        quant_storage=margs.bnb_4bit_quant_storage,
        double_quant=margs.use_bnb_nested_quant,
        revision=margs.model_revision,
        trust_remote_code=training.trust_remote_code,
        attn_implementation=margs.attn_implementation,
    )
    sync_special_tokens(model, tokenizer)
    if margs.load_in_4bit:
        model = prepare_4bit_for_training(
            model,
            gradient_checkpointing=training.activation_checkpointing,
            gradient_checkpointing_kwargs=training.activation_checkpointing_kwargs,
            upcast=script.kbit_fp32_upcast and not _is_sharded(training),  # shards need one dtype
        )
    logger.info(
        "%s: %s of %s (%s, %s%s), %d training examples (%s), %d process(es), end-of-turn %s, pad %s",
        run.recipe.name,
        run.method,
        source.describe(),
        describe_weights(model),
        "bf16 mixed precision" if training.bf16 else "fp16" if training.fp16 else "fp32",
        ", Liger kernels" if training.use_liger_kernel else "",
        len(train_ds),
        "+".join(script.train_splits),
        state.num_processes,
        end_of_turn_token(tokenizer),
        tokenizer.pad_token,
    )

    hub = None
    if training.push_to_hub:
        hub = _hub_callback(training, output_dir)
        training.push_to_hub = False  # our callback pushes; Trainer's own pushing would duplicate it
    callbacks = [_launch_recorder(), *([hub] if hub else [])]
    budget, fixed = micro_batch_tokens(script, training), training.per_device_train_batch_size
    if budget is not None:
        # Each step's examples load as one batch. The sampler already draws them per step (transformers'
        # length-grouped sampler groups per_device x accumulation examples; random order is one permutation,
        # however batched), so every step holds the examples it held with fixed micro-batches, and the global
        # batch, the steps per epoch and a resumed run's skipped batches stay as they were.
        training.per_device_train_batch_size = fixed * training.gradient_accumulation_steps
        training.gradient_accumulation_steps = 1
    trainer = build_trainer(run, model, tokenizer, train_ds, eval_ds, callbacks)
    if budget is not None:
        if isinstance(budget, str):
            # Plain TRL's worst batch on the same data: the longest example and fixed - 1 rows padded to it
            # (TRL pads to the longest row only). Unpadded, so that padding to a multiple never makes a pass
            # bigger than that batch: the pass of the longest example then holds a row fewer where the
            # padding lengthens it. auto:F takes a fraction of it (a method that keeps more per token).
            longest = max(len(ids) for ids in trainer.train_dataset["input_ids"])
            # at least 1: a budget of 0 would read as no budget (one pass per step), not the smallest one
            budget = max(1, int(auto_fraction(budget) * fixed * longest))
        trainer.micro_batch_tokens = budget
        logger.info(
            "%d examples per step and process, in micro-batches of at most %d padded tokens",
            training.per_device_train_batch_size,
            budget,
        )
    if script.adapters_in_compute_dtype:  # 16-bit bases only (_check_precision_options)
        # PEFT keeps the adapters of a 16-bit base in fp32, so each adapted layer casts its input to fp32; TRL
        # already puts those of a 4-bit base (and of ZeRO-3 runs) in the compute dtype. Same rule as TRL's:
        # the DoRA magnitude keeps fp32 (TRL #7268). A 16-bit base is loaded in the compute dtype: its own.
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(model.dtype)
    if skips_input_cast(run):  # bf16 base, fp32 adapters, bf16 autocast (_check_precision_options)
        # PEFT's own switch (`cast_input_dtype_enabled`, which peft.helpers.disable_input_dtype_casting sets
        # for a `with` block), set for good here: the bench calls trainer.train() itself. Training and
        # evaluation run the forward that accelerate wraps in bf16 autocast; a generate() on this model
        # outside autocast would meet fp32 adapters with bf16 inputs (predict loads its own model).
        for module in trainer.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    if causal_attention(script, training, margs):  # the training model only: predict loads its own
        why_not = use_causal_attention(model)
        if why_not and script.causal_attention == "true":
            raise UsageError(f"--causal_attention true: {why_not}")
        if why_not:
            logger.info("causal_attention auto: %s; attention keeps the padding mask", why_not)
    trainer.defer_metrics = script.defer_metrics
    if not script.cudnn_attention:
        # process-wide, as torch keeps it: the flash (or memory-efficient) kernel, which builds no plans
        torch.backends.cuda.enable_cudnn_sdp(False)
    copies = 0
    if script.adapter_weight_copies:  # before compiling: the compiled layers trace the adapters' new forward
        copies = shadow_adapter_weights(trainer.model, torch.bfloat16)
        if not copies:
            raise UsageError(
                "--adapter_weight_copies true: no adapter of this model applies (fp32, bias-free nn.Linear "
                "A and B of a plain LoRA layer)"
            )
        logger.info("adapter_weight_copies: %d fp32 adapter weights computed from bf16 copies", copies)
    fused = 0
    if fuses_lora_dropout(script, training):  # before compiling: the compiled parts trace the fused adapters
        from .lora_dropout import fuse_lora_dropout

        fused = fuse_lora_dropout(trainer.model)
        logger.info("lora_dropout_kernel: %d adapters with their dropout inside A's matmul", fused)
    lean = 0
    if leans_recompute(run):  # before compiling: the compiled MLPs end before the frozen down projection
        lean = lean_mlp_recompute(trainer.model)
        if lean:
            logger.info("lean_recompute: %d MLPs' down projections left out of the recomputation", lean)
        elif script.lean_recompute == "true":
            raise UsageError(
                "--lean_recompute true: no MLP of this model applies (LlamaMLP's forward, its down_proj a "
                "plain LoRA layer over a frozen, bias-free nn.Linear or bitsandbytes 4-bit layer)"
            )
    compiled = 0
    scope = layer_compile_scope(run)
    if compiles_layers(script, training):
        if script.compile_scope == "auto" and scope == "body" and (why := body_blocker(trainer.model)):
            logger.info("compile_scope auto: compiling the layers' parts, not their bodies: %s", why)
            scope = "parts"
        compiled = compile_decoder_layers(trainer.model, script.compile_mode, scope)
        if compiled:
            what = {"parts": "the parts of", "layer": "whole", "body": "the bodies of"}[scope]
            logger.info("compiling %s %d decoder layers (torch.compile, in place)", what, compiled)
        else:
            logger.warning(
                "compile_layers: no transformers decoder layers found in this model: it runs eager"
            )
    if script.uncheckpointed_layers:
        layers = decoder_layers(trainer.model)
        if script.uncheckpointed_layers > len(layers):
            raise UsageError(
                f"--uncheckpointed_layers {script.uncheckpointed_layers}: this model has {len(layers)} "
                "decoder layers"
            )
        trainer.uncheckpointed = tuple(layers[-script.uncheckpointed_layers :])
        logger.info(
            "uncheckpointed_layers: the last %d of %d decoder layers keep their activations (not recomputed)",
            len(trainer.uncheckpointed),
            len(layers),
        )
    _keep_adapter_dtypes_on_resume(trainer)
    dropped = len(train_ds) - len(trainer.train_dataset)
    if dropped:
        logger.warning(
            "%d examples dropped: max_length=%s cut off their whole program", dropped, training.max_length
        )

    # -- only now, with everything loaded, touch the output_dir: a run that failed above (bad model id, too
    # many shots, ...) leaves no recipe.yaml behind that would make the corrected rerun look like another run
    if state.is_main_process:
        if script.overwrite_output_dir and output_dir.is_dir():
            for ckpt in output_dir.glob("checkpoint-*"):
                logger.info("--overwrite_output_dir: deleting %s", ckpt)
                shutil.rmtree(ckpt)
            # the last run's training log, which report would otherwise plot for an interrupted new run
            for log in ("trainer_state.json", "train_results.json", "all_results.json"):
                (output_dir / log).unlink(missing_ok=True)
        _write_recipe(output_dir, run.resolved)
    state.wait_for_everyone()

    return Prepared(
        run, trainer, resume, hub, compiled, fused, lean, scope if compiled else None, weight_copies=copies
    )


def _launch(training: Any) -> dict[str, int]:
    processes = training.world_size
    batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * processes
    return {"processes": processes, "global_batch": batch}


def _launch_recorder() -> Any:  # a TrainerCallback, built lazily
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class LaunchRecorder(TrainerCallback):
        """Writes LAUNCH_FILE into each checkpoint once the Trainer has saved it."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if args.should_save and checkpoint.is_dir():  # where the Trainer saved: each node's, if told to
                (checkpoint / LAUNCH_FILE).write_text(json.dumps(_launch(args)) + "\n")

    return LaunchRecorder()


def check_resume_launch(checkpoint: Path, training: Any) -> None:
    """A resume launched with another global batch is refused: every later step would average another number
    of examples, and in an epoch-based run (the recipes') the Trainer recomputes the steps per epoch, and with
    them the learning-rate schedule and the epoch the saved step falls in. Another process count at the same
    global batch only deals the rest of the resumed epoch differently: a warning."""
    recorded = checkpoint / LAUNCH_FILE
    if not recorded.is_file():
        return  # saved before launches were recorded: nothing to compare with
    try:
        saved = json.loads(recorded.read_text())
        saved_processes, saved_batch = int(saved["processes"]), int(saved["global_batch"])
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s is unreadable: resuming without checking the launch against it", recorded)
        return
    now = _launch(training)
    if now["global_batch"] != saved_batch:
        raise UsageError(
            f"{checkpoint} was saved by {saved_processes} process(es) at a global batch of {saved_batch} "
            f"examples; this launch ({now['processes']} process(es)) makes it {now['global_batch']}, which "
            "would change the examples per step (and in an epoch-based run the steps per epoch and the "
            "learning-rate schedule): resume with per_device_train_batch_size x gradient_accumulation_steps "
            f"x processes = {saved_batch}, or start a new run (another --output_dir, or "
            "--overwrite_output_dir true there)"
        )
    if now["processes"] != saved_processes:
        logger.warning(
            "%s was saved by %d process(es), resumed on %d: the rest of its epoch is dealt to the processes "
            "otherwise than the interrupted run would have (examples of that epoch may repeat or be left "
            "out); from the next epoch on, the run is as one launched this way",
            checkpoint,
            saved_processes,
            now["processes"],
        )


def train(run: Run) -> int:
    """prepare + train + save the adapter (+ merge, + final Hub push). Returns the exit code."""
    prepared = prepare(run)
    trainer, hub, script = prepared.trainer, prepared.hub, run.script
    output_dir, state = Path(run.training.output_dir), run.training.distributed_state
    # What the saved adapter must hold: every trainable tensor, counted before FSDP or DeepSpeed wraps it
    trainable = sum(1 for _, param in trainer.model.named_parameters() if param.requires_grad)
    result = trainer.train(resume_from_checkpoint=prepared.resume)

    if trainer.is_fsdp_enabled:  # a loadable adapter, not per-rank shards
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(output_dir))
    # train_results.json (runtime, loss, peak GPU memory of each process) and trainer_state.json (the loss
    # curve; TRL's num_tokens, summed over the processes), written by the main process
    metrics = dict(result.metrics)
    peaks = _peak_gpu_memory_gib()
    if peaks:
        metrics["peak_gpu_memory_gib"] = peaks
        logger.info("peak GPU memory per process (GiB): %s", peaks)
    # The recipe says auto: record what was asked of TRL here (it applies them where liger-kernel supports the
    # model type, and logs at info level where it does not)
    metrics["liger_kernel"] = bool(run.training.use_liger_kernel)
    # likewise `auto` in the recipes: whether PEFT copied each adapter input to fp32 (None: no such copy here)
    metrics["adapter_input_cast"] = not skips_input_cast(run) if _input_cast_skippable(run) else None
    metrics["compile_layers"] = prepared.compiled_layers > 0  # likewise: whether any layer compiled
    metrics["compile_mode"] = run.script.compile_mode if prepared.compiled_layers else None
    metrics["compile_scope"] = prepared.compile_scope  # auto resolved: what compiled (None: nothing)
    metrics["lora_dropout_kernel"] = prepared.fused_dropouts  # adapters fused (0: none, or not asked)
    metrics["lean_recompute"] = prepared.lean_mlps  # MLPs left out of the recomputation (0: none)
    metrics["adapter_weight_copies"] = prepared.weight_copies  # adapter weights with bf16 copies (0: none)
    metrics["causal_attention"] = getattr(trainer.model.config, "_attn_implementation", None) == CAUSAL_SDPA
    metrics["defer_metrics"] = run.script.defer_metrics
    metrics["micro_batch_tokens"] = trainer.micro_batch_tokens  # None: fixed micro-batches
    metrics["uncheckpointed_layers"] = len(trainer.uncheckpointed)  # run without their checkpoint
    if trainer.micro_batch_tokens:  # each process's passes (a collective): how much the steps were regrouped
        from accelerate.utils import gather_object

        metrics["micro_batch_passes"] = gather_object([trainer.passes])
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    logger.info("adapter, tokenizer, %s and the training log saved in %s", RECIPE_FILE, output_dir)

    # -- after training, on the main process only; a failure here is reported after the other ranks are
    # released (raising on rank 0 alone would leave them waiting at the barrier)
    failed = None
    state.wait_for_everyone()
    if state.is_main_process:
        try:
            saved = saved_adapter_tensors(output_dir)
            if saved is not None and saved < trainable:  # a run that "worked" but saved less than it trained
                raise RuntimeError(
                    f"the adapter file in {output_dir} holds {saved} of the {trainable} weights trained "
                    "(PEFT missed the others in the model's state dict), so it would evaluate as "
                    + ("the bare base" if saved == 0 else "a partly untrained adapter")
                )
            if script.merge:  # on the CPU, from a fresh bf16 copy of the base (never the 4-bit one)
                from .merge import merge

                merged = merge(output_dir, output_dir / "merged", dtype="bfloat16", overwrite=True)
                logger.info("merged bf16 model saved in %s", merged)
            if hub is not None:
                hub.push_final()
        except Exception as err:
            failed = f"training finished and the adapter is saved in {output_dir}, but: {err}"
    state.wait_for_everyone()
    if hasattr(trainer, "end"):  # transformers >= 5.18: close trackers, destroy the process group
        trainer.end()
    state.destroy_process_group()  # transformers < 5.18 (the GPU image's 5.17); a no-op where end() did it
    if failed:
        print(f"error: {one_line(failed)}", file=sys.stderr)
        return 1
    return 0


def _peak_gpu_memory_gib() -> list[float]:
    """torch.cuda.max_memory_allocated of every process in rank order (empty without CUDA); a collective."""
    from accelerate.utils import gather_object

    peak = peak_gpu_memory_gib()
    return [] if peak is None else gather_object([peak])


def _one_gpu_unless_launched() -> None:
    """A single process that sees several GPUs would make Trainer wrap the model in nn.DataParallel, which
    SFTTrainer refuses. Without a distributed launcher (torchrun/accelerate set WORLD_SIZE), train on the
    first visible GPU only. Must run before CUDA is initialised; a CUDA_VISIBLE_DEVICES already set wins."""
    if "WORLD_SIZE" not in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    _one_gpu_unless_launched()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _parser().parse_args(["--help"])  # prints every FinQAArguments / SFTConfig / ModelConfig field
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # parse()'s SFTConfig then starts a process group
    if launched:
        import_before_process_group()
    try:
        run = parse(argv)
        return train(run)
    except (UsageError, RecipeError, DataError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        # The trainer's DDP wrapper holds the destroyed process group in reference cycles: collected now, its
        # gloo threads are joined while the interpreter is alive (import_before_process_group says why). FSDP
        # (v1) keeps its modules, and so the group, alive regardless (tests/fsdp_worker.py); it runs on GPUs.
        if launched:
            gc.collect()


if __name__ == "__main__":
    sys.exit(main())
