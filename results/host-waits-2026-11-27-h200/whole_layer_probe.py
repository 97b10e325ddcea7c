"""Whole-layer compile on the GPU: (A) which settings partition (tiny model), (B) speed of parts vs layer at
1B shape on one realistic pass, each in a fresh process. Usage: python wl.py A | python wl.py B <scope> [cfg]"""
import os, sys, time, traceback, subprocess, json
import torch

dev = "cuda" if torch.cuda.is_available() else "cpu"


def build(hidden, inter, layers, heads, kv, vocab, drop, scope, ckpt=True):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      attn_implementation="sdpa", use_cache=False, tie_word_embeddings=True,
                      max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device(dev):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=drop, target_modules="all-linear"))
    for mod in m.modules():  # the recipe: bf16 input to fp32 adapters without PEFT's cast
        if hasattr(mod, "cast_input_dtype_enabled"):
            mod.cast_input_dtype_enabled = False
    if ckpt:
        m.gradient_checkpointing_enable({"use_reentrant": False})
    ls = [x for x in m.modules() if isinstance(x, GradientCheckpointingLayer)]
    targets = ls if scope == "layer" else [p for l in ls for p in l.children()] if scope == "parts" else []
    for t in targets:
        t.compile()
    m.train()
    return m


def batch(rows, length, vocab, pad_last=0, trained=15):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    att = torch.ones_like(ids)
    if pad_last:
        att[-1, length - pad_last:] = 0
    lab = torch.full_like(ids, -100)
    for r in range(rows):
        end = int(att[r].sum())
        lab[r, end - trained:end] = ids[r, end - trained:end]
    return ids.to(dev), att.to(dev), lab.to(dev)


def step(m, ids, att, lab):
    inner = m.base_model.model
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        h = inner.model(input_ids=ids, attention_mask=att).last_hidden_state
        keep = lab[:, 1:] != -100  # the recipe: logits only where a label is trained
        logits = inner.lm_head(h[:, :-1][keep]).float()
    loss = torch.nn.functional.cross_entropy(logits, lab[:, 1:][keep])
    loss.backward()
    return loss


def part_a():
    import torch._functorch.config as fc
    tries = {
        "default": {},
        "no_cudnn": {"cudnn": False},
        "graphsafe_off": {"graphsafe": False},
        "no_cudnn+graphsafe_off": {"cudnn": False, "graphsafe": False},
        "dropout0": {"drop": 0.0},
        "no_pad_mask": {"pad": 0},
        "no_ckpt_layer": {"ckpt": False},
    }
    res = {}
    for name, o in tries.items():
        torch._dynamo.reset()
        torch.backends.cuda.enable_cudnn_sdp(o.get("cudnn", True))
        fc.graphsafe_rng_functionalization = o.get("graphsafe", True)
        try:
            m = build(256, 1024, 2, 4, 2, 1000, o.get("drop", 0.05), "layer", o.get("ckpt", True))
            ids, att, lab = batch(4, 192, 1000, o.get("pad", 40))
            for _ in range(2):
                loss = step(m, ids, att, lab); m.zero_grad()
            res[name] = f"ok loss {loss.item():.4f}"
        except Exception as e:
            tb = traceback.format_exc().strip().splitlines()
            frames = [l for l in tb if l.strip().startswith("File")][-4:]
            res[name] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]} | " + " | ".join(f.strip()[-110:] for f in frames)
        print(name, "->", res[name], flush=True)
    return res


def part_b(scope, cfg):
    import torch._functorch.config as fc
    if "no_cudnn" in cfg:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if "graphsafe_off" in cfg:
        fc.graphsafe_rng_functionalization = False
    shape = os.environ.get("SHAPE", "1b")
    dims = {"1b": (2048, 8192, 16, 32, 8), "3b": (3072, 8192, 28, 24, 8), "tiny": (128, 256, 2, 4, 2)}[shape]
    vocab = 128256 if shape != "tiny" else 1000
    m = build(*dims, vocab, 0.05, scope)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    shapes = [(8, 1536, 300), (16, 768, 100), (5, 2432, 500), (4, 3072, 0)] if shape != "tiny" else [(2, 64, 10), (4, 32, 5)]
    out = {"scope": scope, "cfg": cfg, "shape": shape}
    for rows, length, pad in shapes:
        ids, att, lab = batch(rows, length, vocab, pad)
        for _ in range(3):
            step(m, ids, att, lab); opt.step(); opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter(); n = 8
        for _ in range(n):
            step(m, ids, att, lab); opt.step(); opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / n * 1000
        tok = int(att.sum())
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0
        out[f"{rows}x{length}"] = {"ms": round(ms, 1), "tok_s": round(tok / ms * 1000), "peak_gib": round(peak, 2)}
        print(scope, cfg, f"{rows}x{length}", out[f"{rows}x{length}"], flush=True)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "A":
        part_a()
    elif sys.argv[1] == "B":
        r = part_b(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
        print("JSON", json.dumps(r))
