#!/bin/bash
# Patch-level pretraining of a Llama-2-7B-shaped GPT on H100 nodes (8 GPUs each).
#
#   sbatch slurm/pretrain_7b_patch.sh                      # defaults below
#   NODES=4 DATA_PATH=/data/pile_llama2 sbatch --nodes=4 slurm/pretrain_7b_patch.sh
#   DRY_RUN=1 bash slurm/pretrain_7b_patch.sh              # print the plan, submit nothing
#
# Requeue-safe: one run directory per RUN_NAME; a restarted job resumes from the latest
# complete checkpoint there (SIGTERM/SIGUSR1 before the time limit writes one, and
# --exit-duration-in-mins leaves time to save). Chain jobs with --dependency=singleton.
#SBATCH --job-name=megapatch-7b-patch
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --dependency=singleton
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

# ---- settings (override from the environment) -------------------------------------------
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
RECIPE=${RECIPE:-$REPO/examples/llama2_7b.yaml}
RUN_NAME=${RUN_NAME:-llama2_7b_patch_k4}
RUN_DIR=${RUN_DIR:-$REPO/runs/$RUN_NAME}
DATA_PATH=${DATA_PATH:?set DATA_PATH to a prefix written by megapatch preprocess}
CONTAINER=${CONTAINER:-nvcr.io/nvidia/pytorch:25.04-py3}  # ships Transformer Engine and apex
TP=${TP:-2}
PP=${PP:-1}
PATCH_SIZE=${PATCH_SIZE:-4}
PATCH_FRACTION=${PATCH_FRACTION:-0.6666666666666666}
EXIT_MINS=${EXIT_MINS:-230}
DRY_RUN=${DRY_RUN:-0}

MODEL_ARGS=(--config "$RECIPE")
PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size "$PP"
    --sequence-parallel
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)
PATCH_ARGS=(--patch-size "$PATCH_SIZE" --patch-fraction "$PATCH_FRACTION")
DATA_ARGS=(--data-path $DATA_PATH)
RUN_ARGS=(--run-dir "$RUN_DIR" --exit-duration-in-mins "$EXIT_MINS" --exit-signal-handler)
ALL_ARGS=("${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${PATCH_ARGS[@]}" "${DATA_ARGS[@]}" "${RUN_ARGS[@]}")

mkdir -p "$REPO/logs" "$RUN_DIR"
if [ "$DRY_RUN" = 1 ]; then
    WORLD_SIZE=$(( ${SLURM_NNODES:-${NODES:-2}} * 8 )) python -m megapatch.cli train "${ALL_ARGS[@]}" --dry-run
    exit 0
fi

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # overlap of TP communication with compute
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

echo "[$(date)] job $SLURM_JOB_ID: $SLURM_NNODES nodes, run dir $RUN_DIR" | tee -a "$RUN_DIR/jobs.log"

# One task per GPU; megapatch reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
srun --kill-on-bad-exit=1 \
     --container-image="$CONTAINER" --container-mounts="$REPO:$REPO,$(dirname "$DATA_PATH")" \
     --container-workdir="$REPO" \
     bash -c "pip install -q -e .; \
              python -m megapatch.cli train ${ALL_ARGS[*]}"
