"""The pass shapes (rows, padded width) of the bench's first 34 steps and of a whole epoch, planned on the CPU
by the bench's own trainer and sampler for the FinQA sample (1B LoRA's recipe, a tiny random model: the plan
depends on the data and the budget only). Writes passes-1b-lora.json beside this file and prints the counts.
Usage, from the project root: python results/attention-plans-2026-11-27-h200/count_pass_shapes.py"""

import json
import tempfile
from pathlib import Path

from finqa_trl import bench
from finqa_trl.train import padded_width, plan_micro_batches

SHARED = Path("../shared")
with tempfile.TemporaryDirectory() as tmp:
    tok = bench.tokenizer_dir(SHARED / "models/llama-3-tokenizer", Path(tmp) / "tok")
    model = bench.build_shape("tiny", tok, Path(tmp) / "tiny")
    trainer, warmup = bench._recipe_trainer(
        "lora", "1b", model, SHARED / "data/finqa-sample", 32, 512, Path(tmp) / "out", None
    )
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    size, multiple, budget = (
        trainer.args.per_device_train_batch_size,
        trainer.args.pad_to_multiple_of,
        trainer.micro_batch_tokens,
    )
    order = list(iter(trainer._get_train_sampler(trainer.train_dataset)))
    steps = trainer.args.max_steps
passes, epoch = [], set()
for step, start in enumerate(range(0, len(order), size)):
    rows = [lengths[i] for i in order[start : start + size]]
    for group in plan_micro_batches(rows, budget, multiple):
        shape = (len(group), padded_width(rows, group, multiple))
        epoch.add(shape)
        if step < steps:
            passes.append([step, *shape])
seen, new_in_window = set(), 0
for step, rows, width in passes:
    if (rows, width) not in seen and step >= warmup:
        new_in_window += 1
    seen.add((rows, width))
out = Path(__file__).with_name("passes-1b-lora.json")
out.write_text(json.dumps({"budget": budget, "warmup_steps": warmup, "passes": passes}))
timed = sum(step >= warmup for step, *_ in passes)
print(
    f"budget {budget}, {len(order)} examples, steps of {size}; first {steps} steps: {len(passes)} passes of "
    f"{len(seen)} shapes, {new_in_window} of them new in the timed window ({timed} passes); a whole epoch: "
    f"{len(epoch)} shapes, {len({w for _, w in epoch})} widths"
)
