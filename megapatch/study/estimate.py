"""How long a planned study takes here, from a calibration study run on the same machine.

A calibration study (e.g. ``studies/reference/calibration.yaml``) trains each model size
briefly at K=1 and at K=4 with the study's recipe; ``megapatch study collect`` gives its
throughputs. For a cell of the same shape (layers, hidden size):

    seconds = D_patch / tokens_per_s_patch(K) + D_token / tokens_per_s_token
              + evaluations x eval_seconds + other_seconds

* ``tokens_per_s_patch(K)`` is the calibrated K=4 rate times K/4 for another K (the patch
  stage's work per token scales as 1/K; an approximation, marked in the table);
* ``eval_seconds``: one validation pass of ``eval_samples`` x T tokens, forward only, taken as
  a third of a training step's cost per token: ``eval_samples * T / (3 * tokens_per_s_token)``;
  a run validates every ``eval_interval`` steps and at the end;
* ``other_seconds``: what the calibration runs spent outside training steps (process start,
  data, checkpoints) less their one validation, per size (the mean over its calibration runs).

The study's wall time at ``--parallel P`` is the makespan of the runner's order (cells in
manifest order, each to the first free slot).
"""

from __future__ import annotations

import heapq
import json
import os
from typing import Any

from megapatch.study.runner import read_attempts
from megapatch.study.spec import StudyError


def calibration_rates(calib_dir: str) -> dict[tuple[int, int], dict[str, float]]:
    """Per (layers, hidden): token rate, K=4 patch rate and other seconds per cell."""
    path = os.path.join(calib_dir, "results.jsonl")
    if not os.path.isfile(path):
        raise StudyError(f"{calib_dir}: no results.jsonl; run and collect the calibration first")
    rates: dict[tuple[int, int], dict[str, Any]] = {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        if row["status"] != "finished" or row["source"] != "megapatch":
            continue
        key = (row["num_layers"], row["hidden_size"])
        entry = rates.setdefault(key, {"other": []})
        if row["method"] == "token":
            entry["token"] = row["tokens_per_s_token"]
        elif row["K"] == 4:
            entry["patch4"] = row["tokens_per_s_patch"]
        attempts = read_attempts(os.path.join(calib_dir, "runs", row["run_id"]))
        if attempts:
            entry["other"].append(sum(a["seconds"] for a in attempts) - row["wall_seconds"])
    out = {}
    for key, entry in rates.items():
        if "token" in entry and "patch4" in entry and entry["other"]:
            out[key] = dict(
                token=entry["token"],
                patch4=entry["patch4"],
                other=sum(entry["other"]) / len(entry["other"]),
            )
    if not out:
        raise StudyError(f"{path}: no size with finished K=1 and K=4 runs to calibrate from")
    return out


def cell_seconds(row: dict[str, Any], rates: dict[str, float]) -> float:
    """Estimated seconds of one cell (see the module docstring)."""
    cfg = row["config"]
    eval_tokens = cfg["training"]["eval_samples"] * cfg["data"]["seq_length"]
    eval_s = eval_tokens / (3 * rates["token"])
    steps = sum(s["steps"] for s in row["plan"])
    interval = cfg["training"]["eval_interval"]
    evals = steps // interval + (1 if steps % interval else 0)
    other = max(0.0, rates["other"] - eval_s)
    patch_rate = rates["patch4"] * row["K"] / 4
    train = row["stage_tokens"].get("patch", 0) / patch_rate
    train += row["stage_tokens"].get("token", 0) / rates["token"]
    return train + evals * eval_s + other


def estimate(
    rows: list[dict[str, Any]], calib_dir: str, parallel: int
) -> tuple[dict[str, float], float]:
    """(seconds per run id, wall seconds at ``parallel``) for the cells in ``rows``."""
    rates = calibration_rates(calib_dir)
    per_cell = {}
    for row in rows:
        key = (row["num_layers"], row["hidden_size"])
        if key not in rates:
            raise StudyError(
                f"cell {row['run_id']}: no calibration run of a {key[0]}-layer, hidden "
                f"{key[1]} model in {calib_dir}; add the size to the calibration study"
            )
        per_cell[row["run_id"]] = cell_seconds(row, rates[key])
    slots = [0.0] * max(1, parallel)
    for row in rows:
        start = heapq.heappop(slots)
        heapq.heappush(slots, start + per_cell[row["run_id"]])
    return per_cell, max(slots)
