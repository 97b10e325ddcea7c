"""Run by tests/test_fsdp.py under torchrun (2 CPU processes, gloo): a PEFT model wrapped by FSDP (v1) as
Trainer wraps it (PEFT's auto-wrap policy: each decoder layer and each adapter layer a unit of its own,
use_orig_params off). Writes what PEFT saves as the adapter, from the final (full) and a checkpoint's
(sharded) state dict."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import LlamaConfig, LlamaForCausalLM

from finqa_trl.modeling import fsdp_safe_adapter_keys, saved_adapter_tensors

out, use_dora = sys.argv[1], sys.argv[2] == "dora"
dist.init_process_group("gloo")
heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, **heads)
torch.manual_seed(0)
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules="all-linear", use_dora=use_dora))
expected = sorted(get_peft_model_state_dict(model))  # what the adapter file holds without FSDP
if "fix" in sys.argv:
    fsdp_safe_adapter_keys()
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
# a checkpoint (accelerate's save_fsdp_model(adapter_only=True) under SHARDED_STATE_DICT), and a resume from
# it (load_fsdp_model: set_peft_model_state_dict under the same state dict type) into adapters zeroed first
with FSDP.state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT):
    checkpoint = get_peft_model_state_dict(model)
    result["sharded"] = sorted(checkpoint)
    with torch.no_grad():
        for p in fsdp.parameters():
            if p.requires_grad:
                p.zero_()
    set_peft_model_state_dict(model, checkpoint)
with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
    resumed = fsdp.state_dict()
result["resumed"] = all(torch.equal(v, resumed[k]) for k, v in full.items() if "lora_" in k)
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
