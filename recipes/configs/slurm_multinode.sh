#!/bin/bash
# sbatch recipes/configs/slurm_multinode.sh
# Multi-node training with SLURM: one `accelerate launch` per node, all joining one process group. Rehearsed on
# one CPU machine by tests/test_multinode.py (a stand-in srun starts each node's launcher locally; GPUS_PER_NODE=1
# MIXED_PRECISION=no); not run on a real cluster here. The variables are the standard ones of torch.distributed.
#
#   MAIN_PROCESS_IP / MAIN_PROCESS_PORT: where rank 0 listens; every node connects there (the rendezvous).
#   NUM_MACHINES / MACHINE_RANK: how many nodes, and which one this is (0 hosts the main process).
#   NUM_PROCESSES: all processes of all nodes (nodes x GPUs per node); each node starts its share.
# Settable from the environment: GPUS_PER_NODE (keep --gpus-per-node equal), MIXED_PRECISION, MAIN_PROCESS_PORT,
# RECIPE and ARGS (the recipe and its arguments).
#SBATCH --job-name=minift
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}
# the first node; sed reads the whole list (head would stop reading, and under pipefail scontrol's SIGPIPE on
# the next name ends the script)
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
RECIPE=${RECIPE:-recipes/pipeline.py}
ARGS=${ARGS:---config recipes/configs/pipeline_sft_dpo.yaml}

# srun starts the block below once per node; SLURM_NODEID is that node's rank.
srun bash -c "accelerate launch \
  --multi_gpu \
  --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_PROCESS_IP \
  --main_process_port $MAIN_PROCESS_PORT \
  --rdzv_backend c10d \
  --mixed_precision $MIXED_PRECISION \
  $RECIPE $ARGS"
