#!/bin/bash
# Builds .gpu/ (ignored by git) for a bare GPU host that cannot download: Python 3.12, torch 2.11 and
# transformers 5.17 in its image, no trl, datasets or bitsandbytes. The recipes need transformers >= 5.24
# (`activation_checkpointing`), so the wheels below replace the image's. Each transfer carries at most 64 MiB,
# so bitsandbytes (42 MB) travels in a call of its own:
#   call 1: carry [".gpu/bnb", ".gpu/tools"]                    bash .gpu/tools/setup.sh
#   call 2: carry [".gpu/wheels", ".gpu/shared", ".gpu/tools"]  bash .gpu/tools/setup.sh; Q=.gpu/tools/q.txt bash .gpu/tools/job.sh
# (within the 30 s the host stays warm after call 1; later calls carry [".gpu/tools"] only). The queue file
# holds lines NAME|ESTIMATED_SECONDS|COMMAND, where $B is the bench (job.sh). Run from the repository root,
# with the FinQA sample and the Llama 3 tokenizer in FINQA_DIR and LLAMA3_TOKENIZER.
set -euo pipefail
FINQA_DIR=${FINQA_DIR:-../shared/data/finqa-sample}
LLAMA3_TOKENIZER=${LLAMA3_TOKENIZER:-../shared/models/llama-3-tokenizer}
plat=(--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux_2_24_x86_64)
for d in "$FINQA_DIR" "$LLAMA3_TOKENIZER"; do
  [ -d "$d" ] || { echo "error: $d is not a folder (set FINQA_DIR and LLAMA3_TOKENIZER)" >&2; exit 2; }
done
# built aside and swapped in at the end: a failed download leaves the kit that was there
mkdir -p .gpu; new=$(mktemp -d .gpu/new.XXXXXX); trap 'rm -rf "$new"' EXIT
mkdir -p "$new/wheels" "$new/bnb" "$new/shared/data" "$new/shared/models" .gpu/tools
# the versions every H200 run since session 24 carried (results/*/commands.txt name them)
pip download -q --no-deps "${plat[@]}" -d "$new/wheels" transformers==5.24.0 peft==0.21.2 trl==1.16.0 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5
pip download -q --no-deps "${plat[@]}" -d "$new/bnb" bitsandbytes==0.50.2
cp -r "$FINQA_DIR" "$new/shared/data/finqa-sample"
cp -r "$LLAMA3_TOKENIZER" "$new/shared/models/llama-3-tokenizer"
rm -rf .gpu/wheels .gpu/bnb .gpu/shared
mv "$new/wheels" "$new/bnb" "$new/shared" .gpu/
cp scripts/gpu/setup.sh scripts/gpu/job.sh .gpu/tools/
git rev-parse --short HEAD > .gpu/tools/COMMIT  # job.sh prints it: the tree travels without .git
du -sh .gpu/wheels .gpu/bnb .gpu/shared
