#!/bin/bash
# Patch-level pretraining of a Llama-2-7B-shaped GPT with `megapatch train`, on Slurm.
#
#   sbatch slurm/pretrain_7b_patch.sh                          # 2 nodes x 8 H100, NGC container
#   DATA_PATH=/data/pile_llama2 sbatch --nodes=4 slurm/pretrain_7b_patch.sh
#   CONTAINER= PYTHON=$HOME/venv/bin/python sbatch slurm/pretrain_7b_patch.sh   # bare metal
#   DRY_RUN=1 NODES=2 bash slurm/pretrain_7b_patch.sh          # print the plan, submit nothing
#
# Submit from the megapatch checkout (or set MEGAPATCH_REPO). The log is <name>-<jobid>.out in the
# submit directory, appended across requeues (`sbatch --output=DIR/%x-%j.out` puts it in DIR,
# which must exist); RUN_DIR/jobs.log gets a line when each job session starts and one when it
# ends.
#
# Everything follows the allocation: nodes, tasks per node (one per GPU when the job has GPUs),
# CPUs per task. The #SBATCH lines below are the 7B defaults; override any on the sbatch line.
#
# Stopping and requeueing (the job id stays the same; the run resumes from its last checkpoint):
# `megapatch train` answers SIGTERM/SIGUSR1 by finishing the step, writing a complete checkpoint
# and exiting 75; this script then requeues the job (`scontrol requeue`), unless the job was
# cancelled (scancel) or Slurm requeued it already (`scontrol requeue`, preemption).
#   * time limit: SIGUSR1 to this batch shell 300 s before it (--signal=B:USR1@300),
#     forwarded to every process of the training step; the time limit's own SIGTERM is a
#     second chance (KillWait seconds to save).
#   * `scancel --batch --signal=USR1 JOBID`: the same path (checkpoint + requeue now).
#   * `scancel --signal=TERM JOBID` (or USR1): the trainers get it directly; checkpoint + requeue.
#   * `scontrol requeue JOBID`: every process gets SIGTERM, KillWait seconds to save.
#   * plain `scancel JOBID`: checkpoint within KillWait, not requeued.
# --dependency=singleton keeps one job of this name running at a time: submit the same command
# several times to chain jobs on one RUN_DIR.
#
#SBATCH --job-name=megapatch-7b-patch
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --dependency=singleton
#
# Why B:USR1 (to this shell, which forwards it) rather than USR1 to the steps directly: one path
# for the time limit and for `scancel --batch --signal=USR1` (both must work), this shell knows
# and logs why the trainers stopped, and a signal that comes before the trainers run is not lost
# (the job is simply requeued). The forwarded signal reaches every process of the training step
# (srun signals the whole step), exactly as the step-wide form would.

set -uo pipefail  # no -e: every exit code below is looked at and logged

# ---- settings (environment variables; these names are used by other tools) -------------------
find_repo() {  # the megapatch checkout: MEGAPATCH_REPO, else the submit dir (or a parent of it)
    local d
    for d in "${MEGAPATCH_REPO:-}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/.."; do
        [ -n "$d" ] || continue
        d=$(cd "$d" 2>/dev/null && pwd) || continue
        while [ "$d" != / ]; do
            [ -f "$d/megapatch/__init__.py" ] && [ -d "$d/slurm" ] && { echo "$d"; return 0; }
            [ -n "${MEGAPATCH_REPO:-}" ] && break  # an explicit repository is taken as it is
            d=$(dirname "$d")
        done
    done
    return 1
}
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}  # relative paths below are relative to it
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$SUBMIT_DIR/$1" ;; esac; }

REPO=$(find_repo) || {
    echo "error: no megapatch checkout found from '${MEGAPATCH_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}':" \
        "submit from the repository (sbatch slurm/pretrain_7b_patch.sh) or set MEGAPATCH_REPO" >&2
    exit 2
}
RECIPE=$(abspath "${RECIPE:-$REPO/examples/llama2_7b.yaml}")  # YAML recipe
RUN_DIR=$(abspath "${RUN_DIR:-$REPO/runs/$(basename "${RECIPE%.*}")}")  # checkpoints, jobs.log
DATA_PATH=${DATA_PATH:-}            # overrides the recipe's data path (a prefix, or a blend)
TRAIN_ARGS=${TRAIN_ARGS:-}          # extra `megapatch train` flags (split on whitespace)
PYTHON=${PYTHON:-python3}           # interpreter with megapatch (or where it gets installed)
case $PYTHON in /*) ;; */*) PYTHON=$(abspath "$PYTHON") ;; esac  # .venv/bin/python: submit dir
CONTAINER=${CONTAINER-nvcr.io/nvidia/pytorch:25.04-py3}  # pyxis image; empty = bare metal
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}  # extra pyxis mounts, comma-separated
MAX_RESTARTS=${MAX_RESTARTS:-100}   # no requeue beyond this many restarts
DRY_RUN=${DRY_RUN:-0}               # 1: print the plan and the launch, submit nothing
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-2}}   # dry run only (a job uses its allocation)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}   # dry run only

# ---- the training command ---------------------------------------------------------------------
read -r -a EXTRA_ARGS <<<"$TRAIN_ARGS"
DATA_ARGS=()
if [ -n "$DATA_PATH" ]; then  # relative prefixes are relative to the submit dir; weights stay
    DATA_ARGS=(--data-path)
    for w in $DATA_PATH; do
        if [[ $w =~ ^[0-9.eE+-]+$ ]]; then w=$w; else w=$(abspath "$w"); fi
        DATA_ARGS+=("$w")
    done
fi
CONFIG_ARGS=(--config "$RECIPE")
RUN_ARGS=(--run-dir "$RUN_DIR")
TRAIN_FLAGS=("${CONFIG_ARGS[@]}" "${DATA_ARGS[@]}" "${RUN_ARGS[@]}" "${EXTRA_ARGS[@]}")
TRAIN_CMD=("$PYTHON" -m megapatch.cli train "${TRAIN_FLAGS[@]}")

# Each task runs the trainer under this small shell. Every process of the step receives the
# stop signals; the trainer answers them, this shell only has to outlive them (a trap, not an
# ignore: an ignored signal would be inherited by the trainer). It records the trainer's exit
# code and turns 75 (stopped after a complete checkpoint) into 0 for srun, so that
# --kill-on-bad-exit does not kill ranks that are still leaving after their save, and srun's
# own exit code is not the 137 of a rank killed that way.
TASK_WRAPPER='
code_dir=$1; shift
trap ":" TERM USR1 INT
"$@"
rc=$?
echo "$rc" >"$code_dir/rank$SLURM_PROCID"
[ "$rc" = 75 ] && exit 0
exit "$rc"'

# ---- container (pyxis/enroot) or bare metal ---------------------------------------------------
CONTAINER_ARGS=()
if [ -n "$CONTAINER" ]; then
    mounts="$REPO,$RUN_DIR"
    for w in "${DATA_ARGS[@]:1}"; do [[ $w == /* ]] && mounts+=",$(dirname "$w")"; done
    [ -n "$CONTAINER_MOUNTS" ] && mounts+=",$CONTAINER_MOUNTS"
    # A named container lives for the whole job on each node: what the install step puts in
    # it is there for the training step.
    CONTAINER_ARGS=(--container-image="$CONTAINER" --container-name=megapatch
        --container-mounts="$mounts" --container-workdir="$REPO")
fi

# printf's time format is a builtin: no subshell that a signal to the batch step could kill
say() { printf '[launcher %(%Y-%m-%dT%H:%M:%S)T] %s\n' -1 "$*"; }

if [ "$DRY_RUN" = 1 ]; then
    if ! command -v "$PYTHON" >/dev/null; then
        echo "error: PYTHON=$PYTHON: no such interpreter" >&2
        exit 2
    fi
    if "$PYTHON" -m megapatch.cli plan --help >/dev/null 2>&1; then
        "$PYTHON" -m megapatch.cli plan "${TRAIN_FLAGS[@]}" \
            --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" || exit $?
    else  # before `megapatch plan`: the trainer's own dry run at that world size
        tasks=$GPUS_PER_NODE; [ "$tasks" -gt 0 ] || tasks=1
        WORLD_SIZE=$((NODES * tasks)) "$PYTHON" -m megapatch.cli train "${TRAIN_FLAGS[@]}" \
            --dry-run || exit $?
    fi
    echo
    echo "repository  $REPO"
    echo "run dir     $RUN_DIR"
    echo "launch      srun --nodes=$NODES --ntasks-per-node=<GPUs per node, here $GPUS_PER_NODE>" \
        "--cpus-per-task=<CPUs per node / tasks> --kill-on-bad-exit=1 ${CONTAINER_ARGS[*]}"
    echo "            ${TRAIN_CMD[*]}"
    exit 0
fi

# ---- in the job -------------------------------------------------------------------------------
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: not inside a Slurm job: submit with sbatch, or DRY_RUN=1 bash $0 for the plan" >&2
    exit 2
fi
RESTART=${SLURM_RESTART_COUNT:-0}
NNODES=$SLURM_JOB_NUM_NODES
# Tasks per node as allocated ("8(x2)" -> 8); the launch below needs the same count on each node.
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}
TASKS_PER_NODE=${TASKS_PER_NODE%%,*}
GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-0}
if [ "$GPUS_ON_NODE" = 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    GPUS_ON_NODE=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
fi
CPUS_PER_TASK=$((SLURM_CPUS_ON_NODE / TASKS_PER_NODE))
[ "$CPUS_PER_TASK" -ge 1 ] || CPUS_PER_TASK=1

mkdir -p "$RUN_DIR" || { echo "error: cannot create RUN_DIR=$RUN_DIR" >&2; exit 2; }
cd "$REPO" || exit 2  # recipes' relative paths (data/...) are relative to the checkout
JOBS_LOG=$RUN_DIR/jobs.log
LOG_FILE=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2)
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
T0=$SECONDS
joblog() {
    printf '%(%Y-%m-%dT%H:%M:%S)T job %s restart %s: %s\n' -1 "$SLURM_JOB_ID" "$RESTART" "$*" \
        >>"$JOBS_LOG"
    say "$*"
}
finish() {  # finish CODE MESSAGE...: the job's closing line in jobs.log, then exit CODE
    local code=$1
    shift
    joblog "$* ($((SECONDS - T0)) s)"
    exit "$code"
}

joblog "started on $SLURM_JOB_NODELIST: $NNODES node(s) x $TASKS_PER_NODE task(s)," \
    "$GPUS_ON_NODE GPU(s)/node, $CPUS_PER_TASK CPU(s)/task, ${CONTAINER:-bare metal}," \
    "commit $COMMIT, log ${LOG_FILE:-?}"

if [ "$GPUS_ON_NODE" -gt 0 ] && [ "$GPUS_ON_NODE" != "$TASKS_PER_NODE" ]; then
    finish 2 "refused: $GPUS_ON_NODE GPU(s) but $TASKS_PER_NODE task(s) per node; one task per" \
        "GPU: sbatch --ntasks-per-node=$GPUS_ON_NODE (exit 2, not requeued)"
fi
if [ $((TASKS_PER_NODE * NNODES)) != "$SLURM_NTASKS" ]; then
    finish 2 "refused: $SLURM_NTASKS tasks are not $TASKS_PER_NODE per node on $NNODES nodes;" \
        "submit with --ntasks-per-node (exit 2, not requeued)"
fi
if [ -n "$CONTAINER" ] && ! srun --help 2>/dev/null | grep -q -- --container-image; then
    finish 2 "refused: CONTAINER=$CONTAINER needs the pyxis plugin (srun --container-image)," \
        "absent here; set CONTAINER= to run with PYTHON=$PYTHON on bare metal (exit 2)"
fi

# ---- signals to this shell --------------------------------------------------------------------
SRUN_PID=
STOP=       # why the trainers were asked to stop (USR1 to this shell)
ENDING=     # Slurm is ending this job (SIGTERM to this shell)
REQUEUED=   # this shell requeued the job (which sends it SIGTERM)
on_usr1() {
    STOP="SIGUSR1 to the batch shell (time limit near, or scancel --batch --signal=USR1)"
    if [ -n "$SRUN_PID" ]; then
        say "SIGUSR1: asking the trainers to checkpoint and stop"
        kill -USR1 "$SRUN_PID" 2>/dev/null  # srun signals every process of the step
    else
        say "SIGUSR1 before the trainers started"
    fi
}
on_term() {  # requeue, time limit, preemption or scancel: the trainers got SIGTERM too.
    # Slurm refuses srun's own SIGKILL of the step once the job is no longer running, so the
    # trainers have KillWait seconds to save; this shell waits for them.
    [ -n "$REQUEUED" ] && return  # the TERM of our own requeue
    [ -n "$ENDING" ] && return    # the time limit sends it twice
    ENDING="SIGTERM from Slurm"
    # In jobs.log now: if the trainers outlive KillWait, SIGKILL ends this shell as well.
    joblog "SIGTERM from Slurm (scontrol requeue, time limit, preemption or scancel): the" \
        "trainers checkpoint and stop; SIGKILL follows after KillWait"
}
trap on_usr1 USR1
trap on_term TERM
trap '' INT HUP
requeue() {  # the requeue sends this shell SIGTERM: ignore it from here on
    REQUEUED=1
    trap '' TERM
    scontrol requeue "$SLURM_JOB_ID" >"$RUN_DIR/.requeue.$SLURM_JOB_ID" 2>&1
    local rc=$?
    REQUEUE_OUT=$(tr '\n' ' ' <"$RUN_DIR/.requeue.$SLURM_JOB_ID")
    rm -f "$RUN_DIR/.requeue.$SLURM_JOB_ID"
    return $rc
}

# ---- install (at most once per node; none when megapatch imports) -----------------------------
if [ -n "$CONTAINER" ]; then
    # Each node's container needs it. The code is imported from the mounted checkout (nothing
    # written into the shared repository, so nodes cannot race); only missing dependencies are
    # installed into each node's container.
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    DEPS='import tomllib
print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"])'
    # shellcheck disable=SC2016  # expanded by the step's shell
    INSTALL='cd "$1" || exit 1
"$2" -c "import megapatch.training.loop" 2>/dev/null && exit 0
echo "[install] $(hostname -s): pip install the dependencies of megapatch"
deps=$("$2" -c "$3") && "$2" -m pip install -q $deps'
    srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" \
        bash -c "$INSTALL" install "$REPO" "$PYTHON" "$DEPS"
    rc=$?
    [ "$rc" = 0 ] || finish 1 "failed: installing megapatch's dependencies in $CONTAINER (exit $rc)"
elif ! "$PYTHON" -c 'import megapatch' 2>/dev/null; then
    # Bare metal: PYTHON's environment is shared by the nodes (a venv or conda on the shared
    # file system), so one editable install serves the whole job.
    say "megapatch does not import with $PYTHON: pip install -e $REPO"
    "$PYTHON" -m pip install -q -e "$REPO"
    rc=$?
    [ "$rc" = 0 ] || finish 1 "failed: pip install -e $REPO with $PYTHON (exit $rc)"
fi
if [ -n "$STOP" ] || [ -n "$ENDING" ]; then
    if [ -n "$ENDING" ]; then finish 1 "ended by Slurm before the trainers started"; fi
    requeue && finish 0 "stop requested before training: requeued"
    finish 1 "stop requested before training; scontrol requeue failed: $REQUEUE_OUT"
fi

# ---- train ------------------------------------------------------------------------------------
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}  # jobs may share a node
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # TP communication overlapped with compute
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export PYTHONUNBUFFERED=1

CODE_DIR=$RUN_DIR/.exit_codes/$SLURM_JOB_ID.$RESTART
rm -rf "$CODE_DIR" && mkdir -p "$CODE_DIR"
LAUNCH_ARGS=(
    --nodes="$NNODES"
    --ntasks-per-node="$TASKS_PER_NODE"
    --cpus-per-task="$CPUS_PER_TASK"
    --kill-on-bad-exit=1
)
say "${TRAIN_CMD[*]}"
srun "${LAUNCH_ARGS[@]}" "${CONTAINER_ARGS[@]}" \
    bash -c "$TASK_WRAPPER" megapatch-task "$CODE_DIR" "${TRAIN_CMD[@]}" &
SRUN_PID=$!
[ -n "$STOP" ] && kill -USR1 "$SRUN_PID" 2>/dev/null  # a USR1 that came during the launch
while :; do  # `wait` returns early when a trapped signal arrives: wait again
    wait "$SRUN_PID"
    SRUN_RC=$?
    if [ "$SRUN_RC" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
    break
done

# ---- what happened, and what to do ------------------------------------------------------------
codes=""
for ((r = 0; r < SLURM_NTASKS; r++)); do
    codes+=" $(cat "$CODE_DIR/rank$r" 2>/dev/null || echo '-')"
done
rm -rf "$CODE_DIR"
read -r RC0 _ <<<"$codes"
# Rank 0's code decides (75 means the collective checkpoint is complete); without it, srun's.
if [ "$RC0" = - ]; then TRAIN_RC=$SRUN_RC; [ "$TRAIN_RC" = 0 ] && TRAIN_RC=1; else TRAIN_RC=$RC0; fi
CKPT=$(cat "$RUN_DIR/checkpoints/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
WHAT="exit $TRAIN_RC (ranks:$codes; srun $SRUN_RC), latest checkpoint $CKPT"

[ "$TRAIN_RC" = 0 ] && finish 0 "$WHAT: finished"
reason=
if [ -n "$ENDING" ]; then  # requeued by Slurm already? (then whatever the trainers managed)
    info=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null)
    restarts=$(grep -o 'Restarts=[0-9]*' <<<"$info" | cut -d= -f2)
    reason=$(grep -o ' Reason=[^ ]*' <<<"$info" | cut -d= -f2)
    if [ "${restarts:-0}" -gt "$RESTART" ]; then
        state=stopped; [ "$TRAIN_RC" = 75 ] || state="not stopped cleanly"
        finish 0 "$WHAT: $state (SIGTERM from Slurm); already requeued by Slurm (scontrol" \
            "requeue or preemption): it resumes from the latest checkpoint"
    fi
fi
[ "$TRAIN_RC" = 75 ] || finish "$TRAIN_RC" "$WHAT: failed, not requeued"

WHY=${STOP:-${ENDING:-stopped by the trainer (signal to the step, exit duration or interval)}}
if [ -n "$ENDING" ]; then
    if [ "$reason" != TimeLimit ] && [ "$reason" != Preempted ]; then
        finish 0 "$WHAT: stopped ($WHY, job cancelled); not requeued: resubmit to continue"
    fi
    WHY="$WHY, reason $reason"
fi
if [ "$RESTART" -ge "$MAX_RESTARTS" ]; then
    finish 75 "$WHAT: stopped ($WHY); not requeued: $RESTART restarts (MAX_RESTARTS)"
fi
requeue && finish 0 "$WHAT: stopped ($WHY); requeued (scontrol requeue $SLURM_JOB_ID)"
finish 75 "$WHAT: stopped ($WHY); scontrol requeue failed: $REQUEUE_OUT"
