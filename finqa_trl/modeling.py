"""One place to load a tokenizer + causal LM, shared by training and inference.

A model source is one of
  * a Hub id (`meta-llama/Llama-3.2-1B-Instruct`),
  * a local directory written by `save_pretrained` (a base model, or a merged fine-tune),
  * a local `.gguf` file (or a directory/Hub id plus `gguf_file=`), loaded *dequantized* so the result can be
    trained and saved like any other model (for 4-bit loading it is dequantized once into the cache first),
  * `builtin:smoke-llama`: a tiny Llama built offline (random weights, BPE tokenizer trained on the bundled
    fixture) for CPU tests and the demo. It is built once into the cache and then loaded like a local model.

Padding: Llama 3 models pad with `<|finetune_right_pad_id|>` (id 128004), never with the end-of-turn token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import OneLineError, one_line

if TYPE_CHECKING:  # keep `import finqa_trl.modeling` cheap; torch/transformers load on first use
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOKE_MODEL = "builtin:smoke-llama"
# Bump when the smoke architecture/tokenizer recipe changes: the cached copy is rebuilt.
_SMOKE_VERSION = 1
_SMOKE_VOCAB = 2048

# End-of-turn tokens of the chat templates we know, most specific first.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# Llama 3.1/3.2 reserve id 128004 for padding; older Llama 3 tokenizer files call it reserved_special_token_2.
_LLAMA3_PAD = "<|finetune_right_pad_id|>"
_LLAMA3_PAD_ID = 128004

# The plain Llama 3 chat template (the one Llama-3-Instruct ships, without 3.1's date/tool system block).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    _LLAMA3_PAD,
)
# Llama 3's pre-tokenizer split: contractions, words, 1-3 digit groups, punctuation runs, newlines, spaces.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# FinQA's program vocabulary, so that every operation is one token in the smoke tokenizer.
_PROGRAM_WORDS = (
    "add subtract multiply divide exp greater table_sum table_average table_max table_min "
    "const_1 const_2 const_3 const_4 const_5 const_10 const_100 const_1000 const_10000 const_100000 "
    "const_1000000 const_10000000 const_1000000000 const_m1 #0 #1 #2 #3 #4 #5 none yes no"
)


class ModelError(OneLineError):
    """A model source or precision request that cannot work here; the message is one line."""


@dataclass(frozen=True)
class ModelSource:
    """Where weights and tokenizer come from. `path` is what `from_pretrained` gets."""

    kind: str  # "hub" | "local" | "gguf" | "smoke"
    path: str
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.path} ({self.gguf_file})" if self.gguf_file else self.path


# ----------------------------------------------------------------------------------------------- sources


def cache_dir() -> Path:
    """`$FINQA_TRL_CACHE`, else `$XDG_CACHE_HOME/finqa-trl`, else `~/.cache/finqa-trl`."""
    if os.environ.get("FINQA_TRL_CACHE"):
        return Path(os.environ["FINQA_TRL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finqa-trl"


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Classify `name_or_path`. A `.gguf` path, or any source plus `gguf_file`, is a GGUF source."""
    if not name_or_path:
        raise ModelError("no model given: set model_name_or_path in the recipe or pass --model_name_or_path")
    if name_or_path == SMOKE_MODEL:
        return ModelSource("smoke", str(build_smoke_model()))
    path = Path(name_or_path).expanduser()
    if gguf_file is None and name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {name_or_path}")
        return ModelSource("gguf", str(path.resolve().parent), path.name)
    if gguf_file is not None:
        return ModelSource("gguf", str(path.resolve()) if path.is_dir() else name_or_path, gguf_file)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name_or_path} is a directory without config.json: not a saved model")
        return ModelSource("local", str(path.resolve()))
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"model path not found: {name_or_path}")
    return ModelSource("hub", name_or_path)


# ----------------------------------------------------------------------------------------------- precision


def peak_gpu_memory_gib() -> float | None:
    """This process's peak of allocated CUDA memory so far, in GiB to 2 decimals (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def cuda_available() -> bool:
    """A CUDA GPU is there (the one place this is asked, so that tests can fake it without faking torch)."""
    import torch

    return torch.cuda.is_available()


def triton_gpu_ready() -> bool:
    """Triton can compile for the CUDA GPU here (inductor's GPU code is Triton): installed, and a device it
    supports. `compile_layers: auto` asks this, so a machine without it trains eager instead of failing at the
    first step."""
    from torch.utils._triton import has_triton

    return has_triton()


def bf16_supported() -> bool:
    """True where bf16 training runs natively (an Ampere+ CUDA GPU, or XPU)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def default_dtype() -> torch.dtype:
    import torch

    return torch.bfloat16 if bf16_supported() else torch.float32


def to_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    """'bfloat16' -> torch.bfloat16; 'auto'/None pass through."""
    import torch

    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return name
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        raise ModelError(f"unknown dtype {name!r}: use bfloat16, float16, float32 or auto") from None
    if not isinstance(dtype, torch.dtype):
        raise ModelError(f"unknown dtype {name!r}: use bfloat16, float16, float32 or auto")
    return dtype


def check_4bit_supported() -> None:
    """Raise ModelError (one line) unless bitsandbytes can run 4-bit layers here."""
    import importlib

    try:
        importlib.import_module("bitsandbytes")
    except Exception as err:  # ImportError, or a broken CUDA setup raising at import time
        raise ModelError(
            f"4-bit loading (QLoRA/QDoRA) needs bitsandbytes, which cannot be imported here ({err}); "
            "pick a lora/dora recipe or install bitsandbytes"
        ) from None
    # bitsandbytes >= 0.50 (our floor; NF4 training seen working on this project's CPU machine) has a CPU
    # backend besides CUDA/XPU/MPS, so an import that succeeds means 4-bit layers can run here.


def bnb_4bit_config(
    compute_dtype: torch.dtype,
    storage_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    quant_type: str = "nf4",
) -> BitsAndBytesConfig:
    """NF4 + double quantization. A float `storage_dtype` (bf16) lets FSDP/ZeRO-3 shard the 4-bit base."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage_dtype if storage_dtype is not None else compute_dtype,
    )


# ----------------------------------------------------------------------------------------------- tokenizer


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token that closes an assistant turn: what the model must learn to emit, and generation stops on."""
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for token in _END_OF_TURN:
        if token in vocab and (token in template or not template):
            return token
    return tokenizer.eos_token


def configure_padding(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token that is not the end-of-turn/eos token.

    Llama 3: `<|finetune_right_pad_id|>` (id 128004; older files name that id `<|reserved_special_token_2|>`).
    Others: keep an existing pad that differs from eot/eos, else the first known special token that is
    neither. As a last resort pad == eos is left as is: TRL builds the labels before padding and pads them
    with -100, so the end-of-turn token is still trained, but a warning says so.
    """
    vocab = tokenizer.get_vocab()
    eot = end_of_turn_token(tokenizer)
    taken = {eot, tokenizer.eos_token}
    if _LLAMA3_PAD in vocab:
        tokenizer.pad_token = _LLAMA3_PAD
    elif "<|eot_id|>" in vocab and len(vocab) > _LLAMA3_PAD_ID:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(_LLAMA3_PAD_ID)
    elif tokenizer.pad_token is None or tokenizer.pad_token in taken:
        for candidate in (
            "<|endoftext|>",
            "<|end_of_text|>",
            "<pad>",
            "<|pad|>",
            "<unk>",
            tokenizer.unk_token,
        ):
            if candidate and candidate in vocab and candidate not in taken:
                tokenizer.pad_token = candidate
                break
        else:
            logger.warning("no pad token distinct from %s: padding with it (labels still train it)", eot)
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    # Right padding for training; generation code switches to left padding itself.
    tokenizer.padding_side = "right"


def load_tokenizer(
    source: ModelSource, *, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except OSError as err:
        raise ModelError(f"cannot load tokenizer {source.describe()}: {one_line(err, 300)}") from None
    if not tokenizer.chat_template:
        raise ModelError(f"{source.describe()} has no chat template: use an instruct/chat model")
    configure_padding(tokenizer)
    return tokenizer


# ----------------------------------------------------------------------------------------------- model


def load_model(
    source: ModelSource,
    *,
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool = False,
    quant_type: str = "nf4",
    quant_storage: str | torch.dtype | None = None,
    double_quant: bool = True,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: Any = None,
) -> PreTrainedModel:
    """Load a causal LM. `dtype=None` means bf16 where the hardware has it, else fp32.

    With `load_in_4bit` the linear layers become NF4 (double quant) computing in `dtype`; the model's
    other weights are loaded in `quant_storage` (default: `dtype`) so that every parameter has one float
    dtype, which FSDP and ZeRO-3 need to shard a 4-bit base.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    torch_dtype = to_dtype(dtype) if dtype is not None else default_dtype()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch_dtype}
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if load_in_4bit:
        check_4bit_supported()
        if source.gguf_file:  # bitsandbytes quantizes while loading safetensors, not GGUF blocks
            source = materialize_gguf(source)
        compute = torch_dtype if torch_dtype != "auto" else default_dtype()
        storage = to_dtype(quant_storage) if quant_storage else compute
        kwargs["quantization_config"] = bnb_4bit_config(compute, storage, double_quant, quant_type)
        kwargs["dtype"] = storage
    if source.gguf_file:
        # A bare gguf_file load keeps the weights packed in GGUF blocks: neither trainable nor saveable.
        # dequantize=True unpacks into plain tensors and drops the quantizer, giving a normal model.
        kwargs["gguf_file"] = source.gguf_file
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        return AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except OSError as err:  # gated, misspelled, or not cached while offline
        raise ModelError(f"cannot load model {source.describe()}: {one_line(err, 300)}") from None


def materialize_gguf(source: ModelSource) -> ModelSource:
    """A GGUF source dequantized once into a safetensors directory in the cache (for 4-bit loading).

    Keyed by the file's name, size and mtime; built in a temp dir and renamed into place, so concurrent
    ranks are safe. Other sources are returned unchanged.
    """
    if not source.gguf_file:
        return source
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = Path(source.path) / source.gguf_file
    if not gguf.is_file():
        raise ModelError(f"4-bit loading of a GGUF model needs a local file; not found: {gguf}")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if not (dest / "config.json").is_file():
        logger.info("dequantizing %s once into %s (for 4-bit loading)", gguf, dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=dest.parent))
        try:
            kwargs = {"gguf_file": source.gguf_file}
            model = AutoModelForCausalLM.from_pretrained(  # bf16: what the 4-bit path computes in anyway
                source.path, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True), **kwargs
            )
            model.save_pretrained(str(tmp))
            AutoTokenizer.from_pretrained(source.path, **kwargs).save_pretrained(str(tmp))
            del model
            try:
                tmp.rename(dest)
            except OSError:  # another rank finished first
                if not (dest / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ModelSource("local", str(dest))


def sync_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model's config and generation config agree with the tokenizer on pad / end-of-turn."""
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        eos = gen.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if eot_id not in eos:
            gen.eos_token_id = [eot_id, *eos]


def prepare_4bit_for_training(
    model: PreTrainedModel,
    *,
    gradient_checkpointing: bool,
    gradient_checkpointing_kwargs: dict | None,
    upcast: bool,
) -> PreTrainedModel:
    """With `upcast`, PEFT's k-bit preparation (freeze base, fp32 norms/embeddings, checkpointing) for
    one-device/DDP runs; otherwise the model as it is (the recipes' default: less memory, faster).

    Without it only checkpointing is switched on (Trainer does that from the training arguments, and TRL makes
    the inputs require grad for it). Under FSDP or ZeRO-3 the base is sharded, and the fp32 upcast would break
    the single-dtype requirement of the shards: callers pass upcast=False there.
    """
    from peft import prepare_model_for_kbit_training

    if not upcast:
        return model
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False},
    )


FSDP_WRAPPER = "_fsdp_wrapped_module."


def fsdp_safe_adapter_keys() -> None:
    """Make PEFT save an FSDP (v1) model's adapter weights, and load them back on a resume. Idempotent,
    process-wide: both halves below, which train.py applies under FSDP."""
    fsdp_safe_adapter_saving()
    fsdp_safe_adapter_loading()


def fsdp_safe_adapter_saving() -> None:
    """PEFT 0.21 picks an adapter's state-dict entries by the names of its tuner modules, from which it strips
    only a leading `_fsdp_wrapped_module.`. FSDP also wraps each decoder layer (PEFT's own auto-wrap policy),
    so the module names keep that segment inside (`...layers.0._fsdp_wrapped_module.self_attn...`) while the
    state dict (full or sharded) has none. Every adapter key was missed: the final adapter and each checkpoint
    were saved empty, and `make eval` then ran the bare base (2x H200, results/multi-gpu-200steps). This
    strips the segment wherever it is. A PEFT without that function (older or newer) is left alone; train.py's
    check of the saved adapter still catches an empty one.
    """
    from peft.tuners import tuners_utils

    find = getattr(tuners_utils, "_get_tuner_state_dict_key_prefixes", None)
    if find is None or getattr(find, "finqa_fsdp_safe", False):
        return

    def prefixes(model: Any, adapter_name: str | None = None) -> set[str]:
        return {p.replace(FSDP_WRAPPER, "") for p in find(model, adapter_name=adapter_name)}

    prefixes.finqa_fsdp_safe = True  # type: ignore[attr-defined]
    tuners_utils._get_tuner_state_dict_key_prefixes = prefixes


def fsdp_safe_adapter_loading() -> None:
    """A resume under FSDP: Trainer hands accelerate's load_fsdp_model the FSDP root, and accelerate hands it
    on to `peft.set_peft_model_state_dict`. PEFT 0.21 looks there for parameter names starting with
    `base_model.model.`; the root's start with `_fsdp_wrapped_module.`, so PEFT strips that prefix from every
    key of the checkpoint and `load_state_dict(strict=False)` loads none of them, silently. The resumed run
    went on from freshly initialised adapters (2x H200, the smoke recipe: loss 9.27 at step 4 against 5.83
    without the interruption). Given the PeftModel inside the root instead, under the same state-dict type,
    PEFT loads every adapter weight (tests/test_fsdp.py, through accelerate's own save and load). The root is
    initialised first: loading through the inner module would otherwise let a nested FSDP unit take the
    root's role, and the next forward fails (a FULL_STATE_DICT resume, whose load runs no state_dict() first).
    """
    import peft

    load = peft.set_peft_model_state_dict
    if getattr(load, "finqa_fsdp_safe", False):
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._runtime_utils import _lazy_init

    def load_unwrapped(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model, FullyShardedDataParallel):
            return load(model, *args, **kwargs)
        _lazy_init(model, model)  # what FSDP's own state_dict()/forward do first on the root
        return load(model.module, *args, **kwargs)

    load_unwrapped.finqa_fsdp_safe = True  # type: ignore[attr-defined]
    peft.set_peft_model_state_dict = load_unwrapped  # accelerate imports it from `peft` when it loads


def saved_adapter_tensors(adapter_dir: Path) -> int | None:
    """How many tensors the adapter file in `adapter_dir` holds (None: no safetensors adapter file there)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors import safe_open

    path = Path(adapter_dir) / SAFETENSORS_WEIGHTS_NAME
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return len(list(f.keys()))


def load(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tokenizer + model from any source, with padding configured and mirrored on the model."""
    source = resolve_source(name_or_path, gguf_file)
    tokenizer = load_tokenizer(
        source,
        revision=model_kwargs.get("revision"),
        trust_remote_code=model_kwargs.get("trust_remote_code", False),
    )
    model = load_model(source, **model_kwargs)
    sync_special_tokens(model, tokenizer)
    return model, tokenizer


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str,
    gguf_file: str | None = None,
    dtype: str = "bfloat16",
    trust_remote_code: bool = False,
) -> Path:
    """Merge a LoRA/DoRA adapter into `base` and save a standalone model + tokenizer to `out_dir`.

    The base is loaded in `dtype` (never 4-bit, also for QLoRA/QDoRA adapters). Which base an adapter belongs
    to is decided by the callers (training knows it; `predict.inspect_model` reads it from the run).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    model = load_model(resolve_source(base, gguf_file), dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    sync_special_tokens(model, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ----------------------------------------------------------------------------------------------- processes


def import_before_process_group(deepspeed: bool = True) -> None:
    """Import, before torch.distributed's default group exists, the modules that would keep it alive.

    They read the group into a default argument when first imported (`group=GroupMember.WORLD`): the
    collectives of torch.distributed.nn.functional (torch.distributed.fsdp imports them, by way of its sharded
    tensors, and transformers imports that inside the functions a run calls) and, with `deepspeed` where it is
    installed, DeepSpeed's torch backend (its barriers).
    Imported during a run, after init_process_group, they held the group past destroy_process_group until the
    interpreter's teardown. Gloo's worker threads could then still be releasing the last collective's tensors,
    and a thread that needs the GIL while the interpreter finalizes aborts the process ("terminate called
    without an active exception", SIGABRT) after a run that saved everything: on a 2-core CPU machine, 5 of 20
    runs of a two-process script that kept a reference to the group, 2 of 70 of the FSDP test worker.
    Imported first, their default is None (the default group, for both), and the group is freed, its threads
    joined, where the program lets go of it."""
    import importlib
    import importlib.util

    import torch.distributed

    if not torch.distributed.is_available():  # a torch built without it starts no group
        return
    importlib.import_module("torch.distributed.nn")
    if not deepspeed or importlib.util.find_spec("deepspeed") is None:
        return
    try:
        importlib.import_module("deepspeed.comm")
    except Exception:  # a DeepSpeed that cannot load fails where a run uses it, with its own message
        pass


# ----------------------------------------------------------------------------------------------- smoke model


def _smoke_corpus() -> list[str]:
    """Text of the bundled fixture (all splits) + the program vocabulary: the smoke BPE's training data."""
    from .data import load_split

    fixture = Path(__file__).resolve().parent / "fixtures"
    texts = [_PROGRAM_WORDS]
    for split in ("train", "dev", "test"):
        for ex in load_split(fixture, split):
            texts.extend(ex.get("pre_text", []))
            texts.extend(ex.get("post_text", []))
            texts.extend(" | ".join(str(c) for c in row) for row in ex.get("table", []))
            qa = ex.get("qa", {})
            texts.append(str(qa.get("question", "")))
            texts.append(str(qa.get("program", "")))
    return texts


def _build_smoke(dest: Path, corpus: list[str]) -> None:
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_SMOKE_VOCAB,
        special_tokens=list(_LLAMA3_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    bos = "<|begin_of_text|>"
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token=_LLAMA3_PAD,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=8192,
    )
    ids = {t: bpe.token_to_id(t) for t in _LLAMA3_SPECIALS}
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        # Wide init: a random 64-wide model's logits are otherwise near uniform and LoRA barely moves them.
        initializer_range=0.25,
        bos_token_id=ids[bos],
        eos_token_id=ids["<|eot_id|>"],
        pad_token_id=ids[_LLAMA3_PAD],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [ids["<|eot_id|>"], ids["<|end_of_text|>"]]
    model.generation_config.pad_token_id = ids[_LLAMA3_PAD]
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))


def build_smoke_model() -> Path:
    """Build the smoke model into the cache once (keyed by builder version + corpus) and return its directory.

    Safe under concurrent callers (several ranks): each builds into a temp dir and renames it into place.
    """
    corpus = _smoke_corpus()
    digest = hashlib.sha256(json.dumps([_SMOKE_VERSION, _SMOKE_VOCAB, corpus]).encode()).hexdigest()[:12]
    dest = cache_dir() / f"smoke-llama-{digest}"
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smoke-", dir=dest.parent))
    try:
        _build_smoke(tmp, corpus)
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race; its copy is identical
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built the smoke model in %s", dest)
    return dest


def liger_installed() -> bool:
    """liger-kernel (optional: `pip install liger-kernel`) can be imported."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def compile_decoder_layers(model: Any, mode: str = "default", scope: str = "parts") -> int:
    """torch.compile the parts of every decoder layer (attention, MLP, norms: its child modules) in place;
    returns how many layers. In place (`Module.compile`), not `torch.compile(module)`: parameter names, and so
    saved adapters and checkpoints, stay the same. The parts, not the layer: transformers 5 checkpoints
    inside the layer's forward, and a compiled layer puts that checkpoint inside the graph, which inductor
    failed to partition on an H100 (`Node add_641 was invalid, but is output`, torch 2.11); around compiled
    parts the checkpoint stays eager and recomputes by calling them again. Layers run one code object per
    part with their parameters as graph inputs, so all layers share its graphs (CPU: 6 graphs for LoRA's
    attention, MLP and norm at a first and a dynamic length); DoRA too, its base weights read traceably.
    `mode` is torch.compile's (reduce-overhead: CUDA graphs), or cpp-wrapper (inductor's C++ wrapper).
    `scope` layer compiles each whole layer instead, its checkpoint inside the graph (torch 2.13 on the CPU
    partitions it, recomputing inside the compiled backward with the dropout masks replayed). `scope` body
    compiles each layer's own forward beneath its checkpoint (`_compile_layer_bodies`): one graph per layer
    call instead of one per part, the checkpoint eager around it as with the parts."""
    # cpp-wrapper is an inductor option, not a torch.compile mode (torch.compile takes one or the other): the
    # generated wrapper that launches the kernels is C++ instead of Python
    how = (
        {"options": {"cpp_wrapper": True}}
        if mode == "cpp-wrapper"
        else {"mode": None if mode == "default" else mode}
    )
    layers = decoder_layers(model)
    traceable_dora_weights(model)
    if scope == "body":
        _compile_layer_bodies(layers, how)
    else:
        for target in layers if scope == "layer" else [part for layer in layers for part in layer.children()]:
            target.compile(**how)
    # 0 for a model whose layers are not transformers' checkpointing layers: nothing compiled
    return len(layers)


def decoder_layers(model: Any) -> list[Any]:
    """The model's transformers decoder layers (those that checkpoint themselves), in module order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def body_blocker(model: Any) -> str | None:
    """Why this model's decoder layers cannot compile as bodies (`_compile_layer_bodies`); None: they can.
    The recipes' compile_scope auto falls back to the parts where it says why."""
    return _body_blocker(decoder_layers(model))


def _body_blocker(layers: list[Any]) -> str | None:
    for layer in layers:
        cls = type(layer)
        if "forward" in vars(layer):  # set on the instance (a hook's wrapper): it would hide the class's
            return (
                f"a {cls.__name__} has its own forward (a hook's wrapper), which would hide the compiled one"
            )
        if getattr(cls, "_compiled_body", False):  # compiled before: its wrapper holds the compiled body
            continue
        code = getattr(cls.forward, "__code__", None)
        if (
            not hasattr(cls.forward, "__wrapped__")
            or getattr(code, "co_name", "") != "forward_with_checkpointing"
        ):
            # another transformers version's layers: compiling around what is there could hold the
            # checkpoint inside the graph (scope layer), which is not what was asked
            return (
                f"{cls.__name__}.forward is not transformers' checkpointing wrapper (this transformers "
                "version wraps layers otherwise)"
            )
    return None


def _compile_layer_bodies(layers: list[Any], how: dict[str, Any]) -> None:
    """Compile each layer's own forward (attention, MLP, norms and residual adds: one graph) beneath its
    activation checkpoint. transformers 5 wraps every GradientCheckpointingLayer subclass's forward in a
    checkpointing wrapper when the class is defined, keeping the layer's own forward as `__wrapped__`; a
    subclass whose forward is that function compiled gets the same wrapper around the compiled function. So
    each layer's class is swapped for such a subclass (one per class, with the class's name, so that all
    layers share one code object and its graphs): the checkpoint stays eager and recomputes by calling the
    graph again, with the same RNG state, so the dropout masks are drawn again as in the forward. Parameter
    names, and so saved adapters, do not change. The parts make four compiled calls per layer call instead
    (each with its guards and autograd function), the residual adds left in Python between them.
    lean_mlp_recompute's down projection, run outside the graph, splits the body into three graphs (the
    layer's up to the MLP, the MLP's up to the down projection, the layer's rest after it), and the
    recomputation still ends before it (the graph before it keeps the last tensor kept for the backward).
    The swapped class has the original's name and qualified name; a layer pickles (`torch.save` of the whole
    model) as an instance of the original class, which loads eager. State dicts, and so saved adapters and
    checkpoints, are unaffected."""
    import torch

    why = _body_blocker(layers)
    if why:
        raise ModelError(f"--compile_scope body: {why}; --compile_scope parts compiles their parts")
    made: dict[type, type] = {}
    for layer in layers:
        cls = type(layer)
        if getattr(cls, "_compiled_body", False):  # compiled before (a second call): nothing to wrap again
            continue
        if cls not in made:
            made[cls] = type(
                cls.__name__,
                (cls,),
                {
                    "forward": torch.compile(cls.forward.__wrapped__, **how),
                    "_compiled_body": True,
                    "__module__": cls.__module__,
                    "__qualname__": cls.__qualname__,
                    "__reduce_ex__": _reduce_as(cls),
                },
            )
        layer.__class__ = made[cls]


def _reduce_as(cls: type) -> Any:
    """A swapped layer's pickling (torch.save of a whole model): as an instance of `cls`, the class it was
    swapped from. Pickle finds a class by module and qualified name, which name `cls`, not the swapped
    subclass; the loaded layer runs eager (the compiled forward belongs to the swapped class)."""

    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        # object's own reduction, but made by _new_instance of `cls` (pickle refuses copyreg.__newobj__ of a
        # class other than the instance's)
        _, _, *rest = object.__reduce_ex__(self, max(2, protocol))
        return (_new_instance, (cls,), *rest)

    return __reduce_ex__


def _new_instance(cls: type) -> Any:
    return cls.__new__(cls)


def _weight_kind(base: Any) -> str | None:
    """What a base layer's weight is, for the two places that read it without PEFT's
    `dequantize_module_weight` (DoRA's traced forward, lean_recompute's backward): "weight" (a plain
    parameter) or "4bit" (a bitsandbytes 4-bit one); None for anything else (HQQ, 8-bit, torchao...)."""
    import torch

    weight = getattr(base, "weight", None)
    if hasattr(base, "W_q"):  # HQQ: PEFT's function dequantizes it
        return None
    if type(weight) is torch.nn.Parameter:
        return "weight"
    if type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None:
        return "4bit"
    return None


def _dense_weight(base: Any, kind: str) -> Any:
    """The weight of a base layer of `_weight_kind` `kind` as a dense (out, in) tensor: a 4-bit one
    dequantized as PEFT's dequantize_bnb_weight and bitsandbytes' own backward do, but from the parameter
    itself, not its `.data`, whose read dynamo does not trace on a Params4bit."""
    if kind == "4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(base.weight, base.weight.quant_state)
    return base.weight


def _frozen_kind(base: Any) -> str | None:
    """`_weight_kind` of a base layer lean_recompute can run outside autograd: an nn.Linear or a bitsandbytes
    4-bit layer whose weight does not train, without a bias; None for anything else."""
    import torch

    kind = _weight_kind(base)
    # no bias: F.linear with one returns a view of a 3-D input's product, which _lean_down's in-place
    # addition (outside autograd) may not change (the recipes' Llama MLPs have none)
    if kind is None or base.weight.requires_grad or getattr(base, "bias", None) is not None:
        return None
    return None if kind == "weight" and type(base) is not torch.nn.Linear else kind


_BASE_INPUT_GRAD: Any = None


def _base_input_grad() -> Any:
    """The autograd function that carries the input gradient of a frozen base layer run outside autograd:
    the identity on the adapters' first term (whose gradient is the layer output's), whose backward also hands
    the layer's input grad @ W, as F.linear's backward does, the weight read (or dequantized) again. It keeps
    an empty tensor for its backward, made before the base layer runs: a checkpoint's recomputation replays
    the forward only until the last kept tensor is made again (torch's early stop), so it ends before the base
    layer; and the backward, unpacking it, has the recomputation run before it computes grad @ W (a node that
    keeps nothing runs first, and its output would wait beside the recomputed layer: a first version so made
    held 0.05-0.07 GiB more at the worst step on an H200, results/speed-notes.md Next 22)."""
    global _BASE_INPUT_GRAD
    if _BASE_INPUT_GRAD is None:
        import torch

        class BaseInputGrad(torch.autograd.Function):
            @staticmethod
            def forward(
                ctx: Any, term: torch.Tensor, h: torch.Tensor, base: Any, kind: str, dtype: torch.dtype
            ) -> torch.Tensor:
                # h is an input only so that its gradient comes from here. The module is kept, not a saved
                # weight: a recomputed 4-bit weight reaches the backward without its quantization state.
                # `kind` is the base layer's _frozen_kind, classified once when the MLP was made lean.
                ctx.base, ctx.kind, ctx.dtype = base, kind, dtype
                ctx.save_for_backward(term.new_empty(0))
                return term.view_as(term)

            @staticmethod
            def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
                _ = ctx.saved_tensors  # unpacked: the checkpoint recomputes the layer now, before grad @ W
                # the base layer's output gradient is the sum's, in the base output's dtype; its input
                # gradient in the dtype its matmul ran in: autocast's (that same dtype), or a 4-bit layer's
                # compute dtype (bitsandbytes casts the input to it, and the product back)
                base_grad = grad.to(ctx.dtype)
                compute = getattr(ctx.base, "compute_dtype", None) or ctx.dtype
                weight = _dense_weight(ctx.base, ctx.kind).to(compute)
                return grad, base_grad.to(compute).matmul(weight), None, None, None

        _BASE_INPUT_GRAD = BaseInputGrad
    return _BASE_INPUT_GRAD


def _converts(down: Any) -> bool:
    """PEFT's 4-bit LoRA layer casts its input to the adapters' dtype, and each term back to the base
    output's, only outside autocast; its 16-bit one casts the input always and the sum once at the end."""
    import torch

    return getattr(down, _LEAN, None) == "4bit" and not torch.is_autocast_enabled()


def _down_terms(down: Any, h: Any) -> list[Any]:
    """The down projection's LoRA terms (input cast, dropout, A, B, scaling), as PEFT's LoRA layer computes
    them for its active adapters, in their order, without its base layer."""
    terms = []
    four_bit = getattr(down, _LEAN, None) == "4bit"
    for name in down.active_adapters:
        if name not in down.lora_A:
            continue
        x = (
            h
            if four_bit and not _converts(down)
            else down._cast_input_dtype(h, down.lora_A[name].weight.dtype)
        )
        terms.append(down.lora_B[name](down.lora_A[name](down.lora_dropout[name](x))) * down.scaling[name])
    return terms


def _base_output_dtype(down: Any, h: Any) -> Any:
    """The dtype the frozen base layer will return for input h: bitsandbytes' 4-bit layer returns its input's;
    nn.Linear autocast's where autocast is on, else its input's (F.linear takes only one)."""
    import torch

    if getattr(down, _LEAN, None) == "4bit" or not torch.is_autocast_enabled(h.device.type):
        return h.dtype
    return torch.get_autocast_dtype(h.device.type)


def _lean_down(down: Any, h: Any, terms: list[Any]) -> Any:
    """The frozen down projection run outside autograd, its input gradient carried by the first adapter
    term (`_base_input_grad`, applied before the base layer runs), plus the adapters' terms added as PEFT
    adds them; outside the compiled graph (torch.compiler.disable), which so ends before it."""
    import torch

    base, dtype = down.get_base_layer(), _base_output_dtype(down, h)
    if _converts(down):  # PEFT's 4-bit layer outside autocast: each term in the base output's dtype
        terms = [term.to(dtype) for term in terms]
    terms = [_base_input_grad().apply(terms[0], h, base, getattr(down, _LEAN), dtype), *terms[1:]]
    with torch.no_grad():
        out = base(h)
    if out.dtype != dtype:  # the gradient above would be computed in another dtype than the base layer's
        raise RuntimeError(f"lean_recompute: the down projection returned {out.dtype}, expected {dtype}")
    result = out
    for term in terms:
        # in place where the dtypes agree (the same values; no second tokens x hidden buffer, which the
        # compiled graph's add did not have either)
        result = result.add_(term) if term.dtype == result.dtype else result + term
    return result.to(out.dtype)


def _lean_mlp_forward(self: Any, x: Any) -> Any:
    """LlamaMLP's forward, down_proj(act_fn(gate_proj(x)) * up_proj(x)), with down_proj's adapters computed
    before its frozen base layer, and the base layer run outside autograd (`_lean_down`)."""
    down = self.down_proj
    if down.merged or down.disable_adapters:  # the base layer alone (merged: the adapters are in it)
        return type(self).forward(self, x)
    if not any(name in down.lora_A for name in down.active_adapters):  # no adapter term to carry the gradient
        return type(self).forward(self, x)
    h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
    return _LEAN_DOWN(down, h, _down_terms(down, h))


_LEAN_DOWN: Any = None
# on each lean MLP's down_proj: what its base layer is (_frozen_kind), so which of PEFT's LoRA layers it is
_LEAN = "_finqa_lean"


def lean_mlp_recompute(model: Any) -> int:
    """Leave each MLP's frozen down projection out of the activation checkpoint's recomputation. The
    backward of a checkpointed decoder layer needs everything of its forward but the last projection's output:
    the layer's output goes to the next layer, whose own checkpoint keeps it. Torch stops recomputing once
    the last tensor kept for the backward is made again; PEFT runs down_proj's base layer before its
    adapters, which keep tensors, so the whole layer is recomputed. Here the adapters come first, inside the
    compiled MLP, and the base layer runs after it outside autograd, its input gradient carried by the first
    adapter term (`_base_input_grad`): one (tokens x intermediate) @ (intermediate x hidden) matmul less
    per layer and pass, a twelfth of a Llama 3.2 step's base-layer matmul work under checkpointing. The same
    operations and the same dropout masks: with one adapter (the recipes'), the gradients bit for bit (CPU
    tests; with several, h's gradient sums its parts in another order). Applies to MLPs whose forward is
    LlamaMLP's, with a down_proj that is PEFT's LoRA layer with plain LoRA adapters (not DoRA, whose forward
    reads the base weight) over a frozen, bias-free nn.Linear or bitsandbytes 4-bit layer. Not under FSDP or
    DeepSpeed, which manage the weights, nor with the checkpoint inside a compiled layer (train.py refuses
    those). Returns how many MLPs."""
    global _LEAN_DOWN
    import types

    import torch
    from peft.tuners.lora import Linear as LoraLinear
    from transformers.models.llama.modeling_llama import LlamaMLP

    # PEFT's LoRA layer for each kind of base layer, whose forward _down_terms and _lean_down repeat
    layers: dict[str, type] = {"weight": LoraLinear}
    try:
        from peft.tuners.lora.bnb import Linear4bit as Lora4bit

        layers["4bit"] = Lora4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        pass
    if _LEAN_DOWN is None:
        _LEAN_DOWN = torch.compiler.disable(_lean_down)
    lean = 0
    llama = LlamaMLP.forward.__code__
    for module in model.modules():
        down = getattr(module, "down_proj", None)
        code = getattr(type(module).forward, "__code__", None)
        kind = _frozen_kind(down.get_base_layer()) if hasattr(down, "get_base_layer") else None
        if not (
            kind in layers
            and type(down) is layers[kind]
            # LlamaMLP's forward or a copy of it (Qwen2's, Mistral's...): the computation _lean_mlp_forward
            # repeats, and the attributes it reads; not one set on the instance (Liger's SwiGLU)
            and code is not None
            and (code.co_code, code.co_names) == (llama.co_code, llama.co_names)
            and "forward" not in vars(module)
            and not getattr(down, "lora_variant", None)  # DoRA (or another variant) on some adapter
            and not any(getattr(down, "use_dora", {}).values())
        ):
            continue
        setattr(down, _LEAN, kind)
        module.forward = types.MethodType(_lean_mlp_forward, module)
        lean += 1
    return lean


# On each DoRA layer's base layer: how DoRA's forward gets the base weight (see traceable_dora_weights)
_DORA_BASE = "_finqa_dora_base"
_PEFT_DORA_WEIGHT: Any = None  # PEFT's own dequantize_module_weight, for every base layer not marked


_SHADOW_LINEAR: Any = None


def _shadow_linear() -> Any:
    """F.linear of an fp32 adapter weight under 16-bit autocast, computed from a 16-bit copy made before the
    pass instead of autocast's cast at each use: the same matmuls on the same rounded values, and the same
    weight gradient (the 16-bit product, then made fp32, as the cast's backward makes it)."""
    global _SHADOW_LINEAR
    if _SHADOW_LINEAR is None:
        import torch

        class ShadowLinear(torch.autograd.Function):
            @staticmethod
            def forward(
                ctx: Any, x: torch.Tensor, weight: torch.Tensor, shadow: torch.Tensor
            ) -> torch.Tensor:
                xs = x.to(shadow.dtype)  # autocast's cast of an fp32 input (PEFT's input cast on): kept cast
                ctx.save_for_backward(xs, shadow)
                ctx.dtypes = x.dtype, weight.dtype
                return torch.nn.functional.linear(xs, shadow)

            @staticmethod
            def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
                xs, shadow = ctx.saved_tensors
                grad = grad.to(shadow.dtype)
                grad_x = grad.matmul(shadow).to(ctx.dtypes[0])
                grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(xs.reshape(-1, xs.shape[-1]))
                return grad_x, grad_w.to(ctx.dtypes[1]), None

        _SHADOW_LINEAR = ShadowLinear
    return _SHADOW_LINEAR


def _shadow_forward(self: Any, x: Any) -> Any:
    # the class made already (shadow_adapter_weights): a compiled layer tracing its definition would break
    return _SHADOW_LINEAR.apply(x, self.weight, self.weight_shadow)


def _decoder_stack(model: Any) -> Any:
    """The module that runs the decoder layers (a Llama's LlamaModel): each forward of the model, generate's
    included, runs it before any adapter of its layers."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        for child in module.children():
            if (
                isinstance(child, torch.nn.ModuleList)
                and len(child)
                and all(isinstance(layer, GradientCheckpointingLayer) for layer in child)
            ):
                return module
    return None


def shadow_adapter_weights(model: Any, dtype: Any) -> int:
    """Give each plain LoRA adapter's fp32 A and B (bias-free nn.Linear) a `dtype` copy, refreshed at the
    start of every forward of the model's decoder stack (one multi-tensor copy: the optimizer may have
    stepped since; generate runs it too), and compute the adapter with it. Under `dtype` autocast the
    adapter's matmuls are the same: autocast casts the fp32 weight to `dtype` at every use in the forward
    and a checkpoint's recomputation, each cast one more kernel to launch (a 3B LoRA step profiled on an
    H200 launched 37 cast kernels per layer and pass, of 232, the backward's casts of the weight gradients
    to fp32 among them, which stay: results/speed-notes.md, Next 33 and 34). The weights, their gradients,
    the optimizer and saved adapters stay fp32; the copies are buffers outside the state dict. Not for
    DoRA (its forward reads A and B itself). Returns the number of weights copied."""
    import types

    import torch
    from peft.tuners.lora import LoraLayer

    linears = []
    for module in model.modules():
        if not isinstance(module, LoraLayer) or any(module.use_dora.values()):
            continue
        for lin in (*module.lora_A.values(), *module.lora_B.values()):
            if type(lin) is torch.nn.Linear and lin.bias is None and lin.weight.dtype == torch.float32:
                linears.append(lin)
    if not linears:
        return 0
    _shadow_linear()
    for lin in linears:
        lin.register_buffer("weight_shadow", lin.weight.detach().to(dtype), persistent=False)
        lin.forward = types.MethodType(_shadow_forward, lin)
    # DDP broadcasts buffers from the first process before each forward (accelerate's default): these are
    # made from the weights, which DDP keeps equal, and the refresh below overwrites them anyway
    ignored = [name for name, _ in model.named_buffers() if name.endswith("weight_shadow")]
    model._ddp_params_and_buffers_to_ignore = [
        *getattr(model, "_ddp_params_and_buffers_to_ignore", []),
        *ignored,
    ]

    def refresh(*_: Any) -> None:
        # read at each call: .to(device) replaces buffers, and a resumed run loads other weights
        with torch.no_grad():
            torch._foreach_copy_([lin.weight_shadow for lin in linears], [lin.weight for lin in linears])

    (_decoder_stack(model) or model).register_forward_pre_hook(refresh)
    return len(linears)


def _dora_base_weight(module: Any) -> Any:
    """PEFT's `dequantize_module_weight` for the base layers marked by `traceable_dora_weights`, without its
    checks of the weight's class (which dynamo cannot trace): the same tensor, the same dequantization."""
    how = getattr(module, _DORA_BASE, None)
    return _dense_weight(module, how) if how else _PEFT_DORA_WEIGHT(module)


def traceable_dora_weights(model: Any) -> int:
    """Let dynamo trace DoRA's forward whole: PEFT's DoRA reads its base weight through
    `dequantize_module_weight`, whose checks of the weight's class break the compiled graph at every adapted
    layer of a 4-bit base (1b QDoRA on the GPU image's torch 2.11: 59 graphs; the smoke recipe's 2 layers
    over 3 steps on the CPU's torch 2.13: 55, LoRA's 6), and on torch 2.13 of a 16-bit base too (36 graphs;
    the GPU's 16-bit DoRA compiled into 6 already). Each DoRA layer's base layer is marked, here and not in
    the graph, with what its weight is (a plain parameter or a bitsandbytes 4-bit one), and PEFT's DoRA
    module is pointed at a function that reads the mark; unmarked layers (another quantization, another
    model) still go through PEFT's function. Returns how many base layers were marked."""
    global _PEFT_DORA_WEIGHT

    marked = 0
    for module in model.modules():
        if not getattr(module, "lora_magnitude_vector", None):  # not a LoRA layer, or no DoRA adapter on it
            continue
        base = module.get_base_layer()
        kind = _weight_kind(base)
        if kind is None:  # unmarked: PEFT's own function
            continue
        setattr(base, _DORA_BASE, kind)
        marked += 1
    if marked:
        import peft.tuners.lora.dora as peft_dora

        if peft_dora.dequantize_module_weight is not _dora_base_weight:
            _PEFT_DORA_WEIGHT = peft_dora.dequantize_module_weight
            peft_dora.dequantize_module_weight = _dora_base_weight
    return marked


# sdpa under another name, which transformers' mask builder does not know: it returns no mask for it
CAUSAL_SDPA = "finqa_causal_sdpa"


def use_causal_attention(model: Any) -> str | None:
    """Attention with the causal mask only, for right-padded training batches: sdpa's causal kernel
    (is_causal) instead of a mask of each row's padding. Padding comes after every real token, which causal
    attention never lets see it, so every real token's output, the loss and the gradients are the same; the
    padding positions (label -100) see other padding, which nothing reads. transformers builds no mask for an
    attention implementation outside its mask registry, so it also skips its check of the padding mask (a
    host wait for the GPU in every pass) and the mask's memory. Never for left padding (generation) or packed
    rows. Returns why not (and changes nothing) for a model with sliding-window layers, whose masks it would
    drop too."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    # Mistral sets sliding_window alone; Qwen2 keeps one with use_sliding_window false
    sliding = (
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", None) is not False
    )
    if sliding or layer_types != {"full_attention"}:
        return f"{type(model).__name__} has sliding-window attention, which the causal mask alone would widen"
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    model.set_attn_implementation(CAUSAL_SDPA)
    return None


def liger_unavailable(on_gpu: bool) -> str | None:
    """Why `--liger_kernel true` cannot run here (None: it can); train and predict refuse with this line."""
    if not liger_installed():
        return "--liger_kernel true needs liger-kernel: pip install liger-kernel"
    if not on_gpu:
        return "--liger_kernel true needs a CUDA GPU (Liger's kernels are Triton kernels)"
    return None


@contextmanager
def stock_modeling_code() -> Iterator[None]:
    """On exit, put back every global of transformers' loaded modeling modules that the body rebound. Liger
    patches a model instance's modules and also its modeling module's globals (the RoPE function, looked up
    at call time; the norm and MLP classes), which would otherwise carry over to every model built later in
    the process: the benchmark's next variant, plain TRL's baseline included. The instance keeps them. Only
    modules imported on entry are watched: load (or import) the model's family before entering."""
    modules = {n: m for n, m in list(sys.modules.items()) if n.startswith("transformers.models.") and m}
    saved = {n: dict(vars(m)) for n, m in modules.items()}
    try:
        yield
    finally:
        for name, module in modules.items():
            now = vars(module)
            for key, value in saved[name].items():
                if now.get(key) is not value:
                    setattr(module, key, value)
