#!/usr/bin/env bash
# One machine's share of a multi-machine training run: `accelerate launch` for this machine's GPUs, joining the
# run whose rank-0 machine is MAIN_PROCESS_IP. Start it on every machine with the same settings and its own
# NODE_RANK (scripts/slurm_train.sbatch does that through srun); run it from the repository root.
#
#   NNODES=2 NODE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 RECIPE=qlora-3b ACCELERATE_CONFIG=fsdp scripts/launch_node.sh
#   NNODES=2 NODE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 RECIPE=qlora-3b ACCELERATE_CONFIG=fsdp scripts/launch_node.sh
#
# Settings (environment):
#   NNODES, NODE_RANK, MAIN_PROCESS_IP   required: machine count, this machine's rank (0..NNODES-1), rank 0's address
#   MAIN_PROCESS_PORT   rendezvous port on MAIN_PROCESS_IP (29500)
#   GPUS_PER_NODE       processes on this machine (default: SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else
#                       nvidia-smi); every machine must run the same number
#   RECIPE (smoke), ACCELERATE_CONFIG (multi_gpu), OUTPUT_DIR (outputs/RECIPE), ARGS (extra train options, split
#   on whitespace), PYTHON (.venv/bin/python if present, else python3)
# The accelerate config's num_machines/machine_rank/main_process_* are overridden by the flags below, so every
# single-machine config in accelerate_configs/ works unchanged (DeepSpeed: with deepspeed_multinode_launcher
# standard; for pdsh + a hostfile see docs/multi-gpu.md).
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

RECIPE=${RECIPE:-smoke}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-multi_gpu}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$RECIPE}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
[[ -n ${NNODES:-} && -n ${NODE_RANK:-} && -n ${MAIN_PROCESS_IP:-} ]] ||
  die "set NNODES, NODE_RANK and MAIN_PROCESS_IP (see the top of $0)"
[[ -f recipes/$RECIPE.yaml ]] || die "no recipe recipes/$RECIPE.yaml (run from the repository root; make recipes)"
config=accelerate_configs/$ACCELERATE_CONFIG.yaml
[[ -f $config ]] || die "no accelerate config $config"

if [[ -z ${GPUS_PER_NODE:-} ]]; then
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    GPUS_PER_NODE=${#visible[@]}
  else
    GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
fi
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "cannot tell how many GPUs this machine has: set GPUS_PER_NODE"

read -r -a extra <<< "${ARGS:-}"
# accelerate's --num_processes is the total over all machines; it starts num_processes/num_machines here.
cmd=(
  "$PYTHON" -m accelerate.commands.launch --config_file "$config"
  --num_machines "$NNODES" --machine_rank "$NODE_RANK"
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT"
  --num_processes "$((NNODES * GPUS_PER_NODE))"
  -m finqa_trl.train --config "recipes/$RECIPE.yaml" --output_dir "$OUTPUT_DIR" ${extra[@]+"${extra[@]}"}
)
echo "[launch_node $NODE_RANK/$NNODES on $(hostname)] ${cmd[*]}" >&2
exec "${cmd[@]}"
