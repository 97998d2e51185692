"""``megapatch study run DIR --backend slurm``: the missing cells as Slurm job arrays.

Cells are grouped by resource shape (nodes x ranks per node); each group becomes one job array
``sbatch --array=0-(n-1)%P`` whose element i trains the cell on line i+1 of
``DIR/slurm/array-<shape>-<n>.cells`` through the project's launcher
``slurm/pretrain_7b_patch.sh`` (``RECIPE`` = the cell's recipe, ``RUN_DIR`` = its run directory,
``PYTHON``, ``CONTAINER``, ``TRAIN_ARGS``). An element whose cell is already finished (its
run_summary.json says so) exits at once; finished cells are not even put in the array.
Submissions are recorded in ``DIR/slurm/submissions.jsonl``; element logs go to
``DIR/slurm/logs/<array job>_<index>.out``.

The spec's ``slurm`` section sets partition, account, time, cpus_per_task, gpus (false on CPU
clusters: no ``--gpus-per-node``), signal (``--signal``, default ``B:USR1@300``: the launcher
forwards it to the trainers, which save and exit 75, and requeues the element), container
(the launcher's CONTAINER; "" = bare metal) and extra ``sbatch_args``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from megapatch.study.manifest import (
    cell_recipe,
    read_study_json,
    require_manifest,
    run_dir,
    write_atomic,
)
from megapatch.study.runner import RENDEZVOUS_VARS, is_finished, launch_env
from megapatch.study.spec import StudyError

LAUNCHER = Path(__file__).resolve().parents[2] / "slurm" / "pretrain_7b_patch.sh"

ELEMENT_SCRIPT = """#!/bin/bash
# One element of a megapatch study job array (written by megapatch study run --backend slurm):
# trains the cell on line SLURM_ARRAY_TASK_ID+1 of $CELLS through the project's launcher.
set -euo pipefail
: "${STUDY_DIR:?}" "${CELLS:?}" "${PYTHON:?}" "${MEGAPATCH_LAUNCHER:?}"
RUN_ID=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$CELLS")
export RUN_DIR="$STUDY_DIR/runs/$RUN_ID"
export RECIPE="$STUDY_DIR/cells/$RUN_ID.yaml"
if "$PYTHON" - "$RUN_DIR/run_summary.json" <<'EOF'
import json, sys
try:
    sys.exit(0 if json.load(open(sys.argv[1])).get("status") == "finished" else 1)
except (OSError, ValueError):
    sys.exit(1)
EOF
then
    echo "cell $RUN_ID is already finished: nothing to do"
    exit 0
fi
mkdir -p "$RUN_DIR"
echo "cell $RUN_ID: array job ${SLURM_ARRAY_JOB_ID:-?} element $SLURM_ARRAY_TASK_ID on $(hostname)"
exec bash "$MEGAPATCH_LAUNCHER"
"""


def shape_of(row: dict[str, Any]) -> tuple[int, int]:
    """(nodes, ranks per node) of a cell."""
    return row["layout"]["nodes"], row["layout"]["gpus_per_node"]


def sbatch_command(
    study_dir: str,
    name: str,
    shape: tuple[int, int],
    count: int,
    parallel: int,
    slurm: dict[str, Any],
    element: str,
) -> list[str]:
    """The sbatch command line of one array."""
    nodes, per_node = shape
    logs = os.path.join(study_dir, "slurm", "logs")
    cmd = [
        "sbatch",
        "--parsable",
        f"--array=0-{count - 1}%{parallel}",
        f"--job-name=megapatch-study-{name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={per_node}",
        f"--time={slurm['time']}",
        "--requeue",
        "--open-mode=append",
        f"--output={logs}/%A_%a.out",
    ]
    if slurm.get("gpus", True):
        cmd.append(f"--gpus-per-node={per_node}")
    if slurm.get("signal"):
        cmd.append(f"--signal={slurm['signal']}")
    for key in ("partition", "account", "cpus_per_task"):
        if slurm.get(key) is not None:
            cmd.append(f"--{key.replace('_', '-')}={slurm[key]}")
    cmd += [str(a) for a in slurm.get("sbatch_args") or []]
    return [*cmd, element]


def submit_study(
    study_dir: str,
    parallel: int = 1,
    only: list[str] | None = None,
    python: str | None = None,
    dry_run: bool = False,
    report=print,  # noqa: ANN001
) -> int:
    """Write and submit one job array per resource shape; returns 0 (2 raised as StudyError)."""
    if parallel < 1:
        raise StudyError(f"--parallel must be >= 1, got {parallel}")
    if not LAUNCHER.is_file():
        raise StudyError(f"the Slurm launcher {LAUNCHER} is missing; run from a megapatch checkout")
    study_dir = os.path.abspath(study_dir)
    meta = read_study_json(study_dir)
    rows = [r for r in require_manifest(study_dir) if r["in_spec"]]
    if only:
        rows = [r for r in rows if any(fnmatch.fnmatch(r["run_id"], p) for p in only)]
        if not rows:
            raise StudyError(f"--only {' '.join(only)} matches no cell of the study")
    todo = [r for r in rows if not is_finished(run_dir(study_dir, r["run_id"]))]
    if not todo:
        report(f"[study] all {len(rows)} cells are finished")
        return 0
    for r in todo:
        if not os.path.isfile(cell_recipe(study_dir, r["run_id"])):
            raise StudyError(f"cell {r['run_id']}: its recipe is missing; re-plan the study")
    slurm_dir = os.path.join(study_dir, "slurm")
    os.makedirs(os.path.join(slurm_dir, "logs"), exist_ok=True)
    element = os.path.join(slurm_dir, "element.sh")
    write_atomic(element, ELEMENT_SCRIPT)
    os.chmod(element, 0o755)
    groups: dict[tuple[int, int], list[str]] = {}
    for r in todo:
        groups.setdefault(shape_of(r), []).append(r["run_id"])
    slurm = meta.get("slurm") or {}
    # Elements of an array share nodes: each needs its own rendezvous (the launcher picks a
    # port per job), so none is inherited from the submitting shell.
    env = dict(
        launch_env(os.environ, drop=RENDEZVOUS_VARS[:5]),
        STUDY_DIR=study_dir,
        PYTHON=python or sys.executable,
        MEGAPATCH_LAUNCHER=str(LAUNCHER),
        TRAIN_ARGS=os.environ.get("TRAIN_ARGS", ""),
    )
    if slurm.get("container") is not None:
        env["CONTAINER"] = str(slurm["container"])
    record_path = os.path.join(slurm_dir, "submissions.jsonl")
    n = sum(1 for _ in open(record_path)) if os.path.isfile(record_path) else 0
    for shape, ids in sorted(groups.items()):
        n += 1
        cells = os.path.join(slurm_dir, f"array-{shape[0]}x{shape[1]}-{n}.cells")
        write_atomic(cells, "".join(i + "\n" for i in ids))
        cmd = sbatch_command(study_dir, meta["name"], shape, len(ids), parallel, slurm, element)
        shown = f"CELLS={cells} STUDY_DIR={study_dir} " + shlex.join(cmd)
        if dry_run:
            report(
                f"[study] would submit {len(ids)} cells ({shape[0]} node(s) x {shape[1]}): {shown}"
            )
            continue
        proc = subprocess.run(
            cmd, env=dict(env, CELLS=cells), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise StudyError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}; {shown}")
        job = proc.stdout.strip().split(";")[0]
        with open(record_path, "a") as f:
            f.write(
                json.dumps(dict(job_id=job, shape=list(shape), cells=cells, run_ids=ids)) + "\n"
            )
        report(
            f"[study] submitted job array {job}: {len(ids)} cells, {shape[0]} node(s) x "
            f"{shape[1]} rank(s), at most {parallel} at a time; logs {slurm_dir}/logs/{job}_*.out"
        )
    return 0
