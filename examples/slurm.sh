#!/usr/bin/env bash
# Multi-node pre-training with SLURM: one torchrun per node, rendezvous on the first node.
# Usage: sbatch --nodes 4 examples/slurm.sh configs/teleflm-52b.toml [--set section.key=value ...]
#SBATCH --job-name=teleflm
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
set -euo pipefail
config=$1
shift
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun .venv/bin/torchrun \
    --nnodes "$SLURM_NNODES" --nproc-per-node 8 \
    --rdzv-backend c10d --rdzv-endpoint "$head_node:29500" --rdzv-id "$SLURM_JOB_ID" \
    -m teleflm.cli.main pretrain --config "$config" "$@"
