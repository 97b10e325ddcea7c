"""Run by tests/test_fsdp.py under torchrun (2 CPU processes, gloo): a PEFT model wrapped by FSDP (v1) as
Trainer wraps it (PEFT's auto-wrap policy: each decoder layer and each adapter layer a unit of its own,
use_orig_params off). Writes what PEFT saves as the adapter from the final (full) state dict, what a
checkpoint holds and whether a resume from it restores the adapter: accelerate's save_fsdp_model and
load_fsdp_model (sharded, adapter only) on the FSDP root, as Trainer calls them.
argv: out dir, lora|dora, and the fix to apply: fix (both halves), saving (fsdp_safe_adapter_saving only) or
none."""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import peft
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import PartialState
from accelerate.utils import load_fsdp_model, save_fsdp_model
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import (
    FullStateDictConfig,
    ShardedOptimStateDictConfig,
    ShardedStateDictConfig,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import LlamaConfig, LlamaForCausalLM

from finqa_trl.modeling import fsdp_safe_adapter_keys, fsdp_safe_adapter_saving, saved_adapter_tensors

out, use_dora, fix = sys.argv[1], sys.argv[2] == "dora", sys.argv[3]
dist.init_process_group("gloo")
state = PartialState(cpu=True)  # accelerate's FSDP helpers log through it
heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, **heads)
torch.manual_seed(0)
lora = LoraConfig(r=2, target_modules="all-linear", use_dora=use_dora)
model = get_peft_model(LlamaForCausalLM(cfg), lora)
expected = sorted(get_peft_model_state_dict(model))  # what the adapter file holds without FSDP
{"fix": fsdp_safe_adapter_keys, "saving": fsdp_safe_adapter_saving, "none": lambda: None}[fix]()
policy = fsdp_auto_wrap_policy(model)
fsdp = FSDP(model, auto_wrap_policy=policy, use_orig_params=False, device_id=torch.device("cpu"))
ids = torch.randint(0, 64, (1, 6))
fsdp(input_ids=ids, labels=ids).loss.backward()
torch.optim.SGD(fsdp.parameters(), lr=1.0).step()  # trained values: lora_B leaves its zero init
result = {"expected": expected}
# the final adapter (train.py: FULL_STATE_DICT, then Trainer's save_pretrained with the gathered state dict)
with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
    full = fsdp.state_dict()
result["full"] = sorted(get_peft_model_state_dict(model, state_dict=full))
# a checkpoint and a resume from it into adapters zeroed first, as Trainer makes them under FSDP
plugin = SimpleNamespace(
    fsdp_version=1,
    state_dict_type=StateDictType.SHARDED_STATE_DICT,
    state_dict_config=ShardedStateDictConfig(),
    optim_state_dict_config=ShardedOptimStateDictConfig(),
)
accelerator = SimpleNamespace(
    wait_for_everyone=dist.barrier,
    process_index=state.process_index,
    num_processes=state.num_processes,
    is_main_process=state.is_main_process,
    is_fsdp2=False,
)
checkpoint = Path(out) / "checkpoint"
save_fsdp_model(plugin, accelerator, fsdp, checkpoint, adapter_only=True)
held = dcp.FileSystemReader(str(checkpoint / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata
result["sharded"] = sorted(k.removeprefix("model.") for k in held)
with torch.no_grad():
    for p in fsdp.parameters():
        if p.requires_grad:
            p.zero_()
load_fsdp_model(plugin, accelerator, fsdp, checkpoint, adapter_only=True)
with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
    resumed = fsdp.state_dict()
result["resumed"] = all(torch.equal(v, resumed[k]) for k, v in full.items() if "lora_" in k)
# the same through a full (unsharded) checkpoint, into a fresh FSDP model that has not run a forward yet (its
# root not initialised: loading must not let a nested unit take the root's role), then a forward. Saved and
# loaded as accelerate's save/load_fsdp_model do, but without their CPU offload (FSDP cannot offload on a CPU
# device): PEFT's functions on the FSDP root, `peft.set_peft_model_state_dict` looked up when called.
with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
    adapter_only = get_peft_model_state_dict(fsdp)
torch.manual_seed(2)
fresh = FSDP(
    get_peft_model(LlamaForCausalLM(cfg), lora),
    auto_wrap_policy=policy,
    device_id=torch.device("cpu"),
)
with FSDP.state_dict_type(fresh, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
    peft.set_peft_model_state_dict(fresh, adapter_only)
fresh(input_ids=ids, labels=ids)
with FSDP.state_dict_type(fresh, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
    loaded_full = fresh.state_dict()
result["full_resumed"] = all(torch.equal(v, loaded_full[k]) for k, v in full.items() if "lora_" in k)
if dist.get_rank() == 0:
    model.save_pretrained(f"{out}/adapter", state_dict=full)
    result["saved"] = saved_adapter_tensors(Path(out) / "adapter")
    result["trained"] = all(v.abs().max() > 0 for k, v in full.items() if "lora_B" in k)
    torch.manual_seed(1)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM(cfg), f"{out}/adapter")
    theirs = loaded.state_dict()
    result["same_values"] = all(torch.equal(v, theirs[k]) for k, v in full.items() if "lora_" in k)
    with open(f"{out}/result.json", "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
# FSDP (v1) keeps its modules alive, and through them the process group, from something the collector cannot
# see (gc.collect() frees neither; the autograd hooks it registers are the likely holder), so the group
# outlives destroy_process_group, and a rank aborted once in CI as the interpreter tore down with gloo's
# threads still releasing tensors (finqa_trl.modeling.import_before_process_group). Everything is written
# and closed: end without the teardown.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
