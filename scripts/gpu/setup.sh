#!/bin/bash
# Copied into .gpu/tools by scripts/gpu/kit.sh; runs on the GPU host.
# On the GPU host, from the repo root: link the carried shared/ as ../shared and install carried wheels.
# It replaces ../shared and installs wheels: only where the device tool sets $OUT, never on a checkout.
if [ -z "${OUT:-}" ]; then echo "setup.sh is for the GPU host (the device tool sets \$OUT there)" >&2; exit 2; fi
t0=$(date +%s)
if [ -d .gpu/shared ]; then rm -rf ../shared; cp -r .gpu/shared ../shared; fi
for d in .gpu/wheels .gpu/bnb; do
  if ls $d/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps $d/*.whl 2>&1 | grep -v WARNING | tail -3
    rm -rf $d
  fi
done
python3 -c "
import importlib
print(' '.join(f'{m} {getattr(importlib.import_module(m), \"__version__\", \"?\")}' if importlib.util.find_spec(m) else f'{m} missing' for m in ('torch','transformers','peft','trl','datasets','bitsandbytes')))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "host: $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed "s/^ //"), $(nproc) CPUs"  # plain TRL's 1B speed may follow the host
echo "setup $(( $(date +%s) - t0 )) s; pwd $(pwd); ls .. : $(ls .. | tr '\n' ' ')"
