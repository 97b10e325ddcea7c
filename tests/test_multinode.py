"""Multi-machine launches, as far as one machine can check them: two "nodes" on localhost (two separate
launchers joined over 127.0.0.1, one CPU process each, gloo) train the smoke recipe through
scripts/launch_node.sh, and scripts/slurm_train.sbatch, run against stub `scontrol`/`srun`/python, starts one
correct `accelerate launch` per node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from finqa_trl.data import FIXTURE_DIR

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# Variables the scripts read: none may leak in from the caller's environment.
SCRIPT_VARS = (
    "NNODES NODE_RANK MAIN_PROCESS_IP MAIN_PROCESS_PORT GPUS_PER_NODE RECIPE ACCELERATE_CONFIG OUTPUT_DIR "
    "ARGS PYTHON FINQA_TRL_ROOT CUDA_VISIBLE_DEVICES FINQA_DIR"
).split()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("SLURM_")}
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", ["slurm_train.sbatch", "launch_node.sh"])
def test_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_two_nodes_on_localhost(tmp_path: Path) -> None:
    """Node 0 and node 1 as two launcher processes (what srun starts on two machines): one process group of 2
    over TCP, the data sharded across the nodes, and one adapter saved, by global rank 0 only."""
    out = tmp_path / "out"
    common = clean_env(
        NNODES="2",
        MAIN_PROCESS_IP="127.0.0.1",
        MAIN_PROCESS_PORT=str(free_port()),
        GPUS_PER_NODE="1",
        RECIPE="smoke",
        ACCELERATE_CONFIG="cpu_ddp",
        OUTPUT_DIR=str(out),
        ARGS=f"--data_dir {FIXTURE_DIR} --max_steps 2 --per_device_train_batch_size 2 --logging_steps 1",
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT),
        FINQA_TRL_CACHE=str(tmp_path / "cache"),  # one cache for both, as on a shared filesystem
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    nodes = [
        subprocess.Popen(
            ["bash", str(SCRIPTS / "launch_node.sh")],
            cwd=ROOT,
            env={**common, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [node.communicate(timeout=300)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, log) in enumerate(zip(nodes, logs, strict=True)):
        assert node.returncode == 0, f"node {rank}:\n{log[-3000:]}"
        assert f"[launch_node {rank}/2 " in log and "--num_machines 2 --machine_rank" in log
    assert "2 process(es)" in logs[0]
    saved = "adapter, tokenizer, recipe.yaml and the training log saved"
    assert logs[0].count(saved) == 1 and saved not in logs[1]  # logged where it is saved: global rank 0
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    # 2 steps x 2 examples x 2 nodes = 8 of the 12 fixture examples: sharded across the nodes, not repeated
    assert state["global_step"] == 2 and abs(state["epoch"] - 8 / 12) < 1e-6
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def stub(path: Path, body: str) -> None:
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def test_sbatch_starts_one_accelerate_launch_per_node(tmp_path: Path) -> None:
    """The job script under a fake 2-node allocation: `srun` runs its command once per node (SLURM_NODEID 0,
    1) and the "python" it ends in prints the command line instead of training."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    stub(bin_dir / "scontrol", 'echo "scontrol $*" >> "$CALLS"; printf "gpu-a07\\ngpu-a08\\n"')
    stub(
        bin_dir / "srun",
        'echo "srun $*" >> "$CALLS"\n'
        "while [[ $1 == --* ]]; do shift; done\n"
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit; done',
    )
    stub(bin_dir / "python", 'echo "python $*"')
    env = clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        CALLS=str(calls),
        SLURM_JOB_ID="123456",
        SLURM_JOB_NODELIST="gpu-a[07-08]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=str(ROOT),
        RECIPE="qlora-3b",
        ACCELERATE_CONFIG="fsdp",
        ARGS="--num_train_epochs 1 --learning_rate 5e-5",
        PYTHON=str(bin_dir / "python"),
    )
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "slurm_train.sbatch")],
        cwd=tmp_path,  # sbatch's working directory is not necessarily the repository: the script cd's there
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().splitlines() == [
        "scontrol show hostnames gpu-a[07-08]",
        "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c NODE_RANK=$SLURM_NODEID exec "
        "scripts/launch_node.sh",
    ]
    expected = (
        "python -m accelerate.commands.launch --config_file accelerate_configs/fsdp.yaml --num_machines 2 "
        "--machine_rank {rank} --main_process_ip gpu-a07 --main_process_port 23456 --num_processes 8 "
        "-m finqa_trl.train --config recipes/qlora-3b.yaml --output_dir outputs/qlora-3b "
        "--num_train_epochs 1 --learning_rate 5e-5"
    )
    # node 0 hosts the rendezvous; the port is 20000 + job id % 10000; 2 nodes x 4 GPUs = 8 processes
    assert proc.stdout.splitlines() == [expected.format(rank=rank) for rank in (0, 1)]


def test_launch_node_refuses_missing_settings(tmp_path: Path) -> None:
    env = clean_env(NNODES="2", NODE_RANK="0", MAIN_PROCESS_IP="h", GPUS_PER_NODE="1", PYTHON="false")
    script = str(SCRIPTS / "launch_node.sh")
    for extra, message in (
        ({"MAIN_PROCESS_IP": ""}, "set NNODES, NODE_RANK and MAIN_PROCESS_IP"),
        ({"RECIPE": "qlora-7b"}, "no recipe recipes/qlora-7b.yaml"),
        ({"ACCELERATE_CONFIG": "fsdp2"}, "no accelerate config accelerate_configs/fsdp2.yaml"),
        ({"GPUS_PER_NODE": "0"}, "set GPUS_PER_NODE"),
    ):
        proc = subprocess.run(
            ["bash", script], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True
        )
        lines = proc.stderr.splitlines()
        assert (
            proc.returncode == 2
            and len(lines) == 1
            and lines[0].startswith("error: ")
            and message in lines[0]
        )
