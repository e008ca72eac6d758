"""Multi-node, rehearsed on one machine: recipes/configs/slurm_multinode.sh runs as sbatch would run it, under a
stand-in ``srun`` (and ``scontrol``) that starts each "node"'s ``accelerate launch`` locally with that node's
SLURM variables. The two launchers (``--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1``, one
CPU process each) rendezvous and train the same adapter as one machine launching 2 processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "configs" / "slurm_multinode.sh"

SRUN = """#!/bin/bash
# Stand-in for SLURM's srun on one machine: runs its command once per node of the job, side by side, each with
# that node's SLURM_NODEID; logs the command each node ran. Node 0 starts first and the others once its rendezvous
# port listens: on one machine every node is the rendezvous host, and they would race to bind the port.
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  printf '%s\\n' "$*" > "$STANDIN_LOGS/srun-$node.cmd"
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" > "$STANDIN_LOGS/node-$node.log" 2>&1 &
  pids+=($!)
  if ((node == 0)); then
    for ((try = 0; try < 1200; try++)); do
      (echo > "/dev/tcp/127.0.0.1/$MAIN_PROCESS_PORT") 2> /dev/null && break
      sleep 0.1
    done
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
SCONTROL = """#!/bin/bash
# Stand-in for `scontrol show hostnames LIST`: every node of the job is this machine. It pauses after each name, as a
# real one may still be writing when its reader has what it wants (a reader that stops early gets it a SIGPIPE).
for ((node = 0; node < SLURM_NNODES; node++)); do echo 127.0.0.1; sleep 0.2; done
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_slurm_script_on_two_stand_in_nodes_equals_one_machine_with_two_processes(tmp_path, tiny_dir):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join((ROOT / "recipes" / "data" / "demo_sft.jsonl").read_text().splitlines(True)[:64]))
    args = (f"--dataset_name_or_path {data} --max_seq_length 64 --validation_split 0 --answer_eval_dataset none "
            f"--logging_steps 1 --max_steps 4 --per_device_train_batch_size 2 --lora_r 8 --lora_alpha 16 "
            f"--lora_dropout 0.1")
    bin_dir, logs = tmp_path / "bin", tmp_path / "logs"
    bin_dir.mkdir()
    logs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "STANDIN_LOGS": str(logs), "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]", "GPUS_PER_NODE": "1",
           "MIXED_PRECISION": "no", "MAIN_PROCESS_PORT": str(free_port()), "RECIPE": "recipes/sft.py",
           "ARGS": f"{args} --output_dir {tmp_path / 'nodes'}"}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    node_logs = "\n".join(log.read_text()[-2000:] for log in sorted(logs.glob("node-*.log")))
    assert proc.returncode == 0, proc.stderr[-2000:] + node_logs
    for node in (0, 1):
        launched = (logs / f"srun-{node}.cmd").read_text()
        for flag in ("--num_machines 2", "--num_processes 2", "--main_process_ip 127.0.0.1",
                     "--machine_rank $SLURM_NODEID"):
            assert flag in launched, (flag, launched)
    assert "sft done" in (logs / "node-0.log").read_text()  # the main process ran on node 0

    one = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", str(free_port()), "recipes/sft.py", *args.split(), "--output_dir",
                          str(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "nodes" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
