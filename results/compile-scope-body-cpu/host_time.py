"""Host time per training step of compiled parts against compiled layer bodies (--compile_scope body),
with and without lean_recompute, on a toy Llama small enough that the step is mostly Python and dispatch
(as a 1B pass on the GPU is partly: results/speed-notes.md). Each configuration in a fresh process, the
rounds interleaved; one thread. Run from the repository root:

    python results/compile-scope-body-cpu/host_time.py [ROUNDS]

Prints, per configuration, the median milliseconds of steps 21-70 (lengths 32, 40, 48, 56 in turn, batch 2)
of each round, then the median over the rounds."""

import statistics
import subprocess
import sys
import time

CONFIGS = ("parts", "body", "parts+lean", "body+lean")


def one(config: str) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finqa_trl.modeling import compile_decoder_layers, lean_mlp_recompute

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=False,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear")
    model = get_peft_model(LlamaForCausalLM(cfg), lora)
    model.activation_checkpointing_enable({"use_reentrant": False})
    scope, _, lean = config.partition("+")
    if lean:
        assert lean_mlp_recompute(model) == 16
    assert compile_decoder_layers(model, scope=scope) == 16
    model.train()
    times = []
    for i in range(70):
        ids = torch.randint(0, 128, (2, 32 + 8 * (i % 4)))
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[20:])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(one(sys.argv[2]))
        sys.exit(0)
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    got: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(rounds):
        for config in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, "--one", config], capture_output=True, text=True, check=True
            )
            got[config].append(float(out.stdout.strip().splitlines()[-1]))
    for config, ms in got.items():
        each = " ".join(f"{m:6.1f}" for m in ms)
        print(f"{config:11s} {each}   median {statistics.median(ms):6.1f} ms")
