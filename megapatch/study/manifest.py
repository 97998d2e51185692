"""``megapatch study plan``: a spec's cells into ``DIR/manifest.jsonl`` (one row per run).

Files of a study directory:

* ``manifest.jsonl``: one JSON row per cell ever planned, in the order first planned: run id,
  ``in_spec`` (false once the cell was removed from the spec: kept, never deleted), size,
  method, K, λ, seed, budget, layout, planned tokens per stage, FLOPs, parameters and the fully
  resolved config;
* ``cells/<run_id>.yaml``: the cell's ``megapatch train`` recipe (what ``study run`` launches);
* ``study.json``: the spec's name, path and Slurm settings at the last plan;
* ``runs/<run_id>/``: the run directories (written by ``study run``).

Re-planning (the same command after editing the spec) keeps every existing row and its id:
new cells are appended; a cell whose run has started keeps its stored config; a cell not yet
started takes the re-resolved one (same id, so the same science; e.g. a new save interval).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from megapatch.config import to_yaml
from megapatch.study.spec import Cell, Spec, StudyError, expand, heldout_key, load_spec

MANIFEST = "manifest.jsonl"
STUDY_JSON = "study.json"


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cell_row(cell: Cell) -> dict[str, Any]:
    """The manifest row of a cell."""
    budget = (
        {"tokens": cell.budget.tokens}
        if cell.budget.flops is None
        else {"flops": cell.budget.flops}
    )
    m = cell.config.model
    return dict(
        run_id=cell.run_id,
        in_spec=True,
        size=cell.size,
        origin=cell.origin,
        method=cell.method.name,
        K=cell.method.K,
        lam=cell.method.lam,
        patch_context=cell.method.patch_context,
        seed=cell.seed,
        budget=budget,
        layout=dict(vars(cell.layout)),
        world_size=cell.layout.world_size,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        params=cell.params,
        params_non_embedding=cell.params_non_embedding,
        tokens=cell.tokens,
        stage_tokens=cell.stage_tokens(),
        flops=cell.flops,
        plan=[s.as_dict() for s in cell.plan],
        config=cell.config.to_dict(),
    )


def read_manifest(study_dir: str) -> list[dict[str, Any]]:
    """The manifest rows of ``study_dir`` ([] when not planned yet)."""
    path = os.path.join(study_dir, MANIFEST)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise StudyError(f"{path}:{lineno}: not valid JSON ({err.msg}); re-plan") from None
    return rows


def require_manifest(study_dir: str) -> list[dict[str, Any]]:
    """The manifest rows, or a clear error when ``study_dir`` was never planned."""
    rows = read_manifest(study_dir)
    if not rows:
        raise StudyError(
            f"{study_dir}: no {MANIFEST}; plan the study first: megapatch study plan SPEC.yaml "
            f"--out {study_dir}"
        )
    return rows


def run_dir(study_dir: str, run_id: str) -> str:
    """The run directory of a cell."""
    return os.path.join(study_dir, "runs", run_id)


def cell_recipe(study_dir: str, run_id: str) -> str:
    """The ``megapatch train`` recipe of a cell."""
    return os.path.join(study_dir, "cells", f"{run_id}.yaml")


# ---------------------------------------------------------------------------- checks


def check_heldout(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Refuse cells that would be validated on different held-out sets.

    Every cell must share the data, split, sequence length, EOD masking and the number of
    validation samples. Cells may differ in ``data.seed`` (seed replicates): it orders the
    training data and draws the initial weights, never the held-out set (whose document order
    megapatch train draws from a fixed seed), so replicates are scored on the same tokens.
    Returns notes for the planner's output (none at present).
    """
    first: tuple[str, dict] | None = None
    for row in rows:
        key = heldout_key(row["config"])
        if first is None:
            first = (row["run_id"], key)
            continue
        for name, value in key.items():
            if value != first[1][name]:
                raise StudyError(
                    f"cells {first[0]} and {row['run_id']} would be validated on different "
                    f"held-out sets: {name} is {first[1][name]!r} vs {value!r}; every cell of a "
                    "study needs the same data, split, seq length, EOD masking and eval samples"
                )
    return []


def split_tokens(data_cfg: Any) -> tuple[list[str], list[float], list[int], int]:
    """(prefixes, blend shares, train-split tokens per prefix, validation-split tokens)."""
    import dataclasses

    import numpy as np

    from megapatch.data.config import DataError
    from megapatch.data.stream import build_streams, parse_blend

    prefixes, weights = parse_blend(data_cfg.data_path)
    if weights is None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        weights = []
        for p in prefixes:
            ds = IndexedDataset(p)
            weights.append(float(np.asarray(ds.sequence_lengths).sum()))
            del ds
    with tempfile.TemporaryDirectory() as cache:
        cfg = dataclasses.replace(data_cfg, data_cache_path=cache)
        try:
            train, valid, _ = build_streams(cfg, (1, 1, 0))
        except DataError as err:
            raise StudyError(str(err)) from None
        train_tokens = [int(ds.tokens_per_epoch) for ds in train.datasets]
        valid_tokens = sum(int(ds.tokens_per_epoch) for ds in valid.datasets)
    total = sum(weights)
    return prefixes, [w / total for w in weights], train_tokens, valid_tokens


def check_data(rows: list[dict[str, Any]], allow_repeated: bool) -> list[str]:
    """Refuse cells that would read their training data more than once (unless allowed).

    Needs the data files (call where the runs start). Returns lines describing the data.
    """
    from megapatch.config import config_from_dict

    if not rows:
        return []
    cfg = config_from_dict(rows[0]["config"])
    prefixes, shares, train, valid = split_tokens(cfg.data)
    notes = [
        f"data {' + '.join(prefixes)}: train split {sum(train):,} tokens, validation split "
        f"{valid:,} tokens (validation reads {cfg.training.eval_samples * cfg.data.seq_length:,})"
    ]
    worst = max(rows, key=lambda r: r["tokens"] + r["K"])
    for row in rows:
        need = row["tokens"] + row["K"]  # the last sample's labels look K tokens further
        for prefix, share, have in zip(prefixes, shares, train):
            if need * share > have and not allow_repeated:
                part = f" (its share: {need * share:,.0f})" if len(prefixes) > 1 else ""
                raise StudyError(
                    f"cell {row['run_id']} trains on {row['tokens']:,} tokens{part} but the train "
                    f"split of {prefix} holds {have:,}: it would repeat data; lower the "
                    "budget, add data, or set allow_repeated_data: true in the spec"
                )
    notes.append(
        f"largest cell {worst['run_id']} reads {worst['tokens'] + worst['K']:,} tokens"
        + (" (repeated data allowed)" if allow_repeated else ": no data repeated")
    )
    return notes


# ---------------------------------------------------------------------------- plan


def plan_study(
    spec_path: str,
    study_dir: str,
    report=print,  # noqa: ANN001
    calibration: str | None = None,
    parallel: int = 1,
) -> list[dict[str, Any]]:
    """Expand the spec, merge with an existing manifest, check, write; returns the rows.

    With ``calibration`` (a collected calibration study), also estimate each cell's seconds
    and the study's wall time at ``parallel`` cells at a time (:mod:`megapatch.study.estimate`).
    """
    spec: Spec = load_spec(spec_path)
    cells = expand(spec)
    new_rows = [cell_row(c) for c in cells]
    old_rows = read_manifest(study_dir)
    old = {r["run_id"]: r for r in old_rows}
    fresh = {r["run_id"]: r for r in new_rows}
    merged, kept, added, refreshed = [], 0, 0, 0
    for row in old_rows:
        rid = row["run_id"]
        if rid in fresh:
            started = os.path.isdir(run_dir(study_dir, rid))
            merged.append(dict(row, in_spec=True) if started else fresh[rid])
            kept += started
            refreshed += not started
        else:
            merged.append(dict(row, in_spec=False))
    for row in new_rows:
        if row["run_id"] not in old:
            merged.append(row)
            added += 1
    active = [r for r in merged if r["in_spec"]]
    warnings = check_heldout(active)
    seconds: dict[str, float] | None = None
    if calibration:
        from megapatch.study.estimate import estimate

        seconds, wall = estimate(active, calibration, parallel)
    data_notes: list[str] = []
    try:
        data_notes = check_data(active, spec.allow_repeated_data)
    except StudyError as err:
        if "not found" not in str(err):
            raise
        data_notes = [f"{err} -- data checks skipped here; study run repeats them"]
    os.makedirs(os.path.join(study_dir, "cells"), exist_ok=True)
    from megapatch.config import config_from_dict

    for row in merged:
        cfg = config_from_dict(row["config"])
        cfg.run_dir = run_dir(study_dir, row["run_id"])
        path = cell_recipe(study_dir, row["run_id"])
        text = f"# megapatch study cell {row['run_id']} ({row['origin']})\n" + to_yaml(cfg)
        if not os.path.isfile(path) or open(path).read() != text:
            write_atomic(path, text)
    write_atomic(
        os.path.join(study_dir, MANIFEST),
        "".join(json.dumps(r, sort_keys=False) + "\n" for r in merged),
    )
    # the spec relative to the study directory: the study can be moved or committed as is
    spec_rel = os.path.relpath(os.path.abspath(spec_path), os.path.abspath(study_dir))
    meta = dict(name=spec.name, spec=spec_rel, slurm=spec.slurm)
    meta["allow_repeated_data"] = spec.allow_repeated_data
    write_atomic(os.path.join(study_dir, STUDY_JSON), json.dumps(meta, indent=2) + "\n")
    report(format_manifest(active, seconds))
    removed = len(merged) - len(active)
    report(
        f"planned {len(active)} cells in {os.path.join(study_dir, MANIFEST)}: {added} new, "
        f"{kept} already started (kept as planned), {refreshed} planned before, not started"
        + (f"; {removed} no longer in the spec (kept, not run)" if removed else "")
    )
    for line in data_notes + [f"note: {w}" for w in warnings]:
        report(line)
    if seconds is not None:
        longest = max(seconds, key=seconds.get)
        report(
            f"estimated from {calibration}: {sum(seconds.values()) / 3600:.2f} h of cells, "
            f"{wall / 3600:.2f} h wall at --parallel {parallel}; longest cell {longest} "
            f"{seconds[longest] / 60:.1f} min"
        )
    return merged


def read_study_json(study_dir: str) -> dict[str, Any]:
    """``study.json`` of a planned study."""
    path = os.path.join(study_dir, STUDY_JSON)
    if not os.path.isfile(path):
        raise StudyError(f"{study_dir}: no {STUDY_JSON}; plan the study first")
    with open(path) as f:
        return json.load(f)


def format_manifest(rows: list[dict[str, Any]], seconds: dict[str, float] | None = None) -> str:
    """A table of planned cells (with estimated minutes when ``seconds`` is given)."""
    head = (
        f"{'run id':46} {'params':>9} {'non-emb':>9} {'tokens':>11} {'patch tok':>10} "
        f"{'FLOPs':>9} {'ranks':>5}" + (f" {'est. min':>8}" if seconds else "")
    )
    lines = [head]
    for r in rows:
        est = ""
        if seconds:
            approx = "~" if r["K"] not in (1, 4) else " "
            est = f" {approx}{seconds[r['run_id']] / 60:7.1f}"
        lines.append(
            f"{r['run_id']:46} {r['params']:9,d} {r['params_non_embedding']:9,d} "
            f"{r['tokens']:11,d} {r['stage_tokens'].get('patch', 0):10,d} {r['flops']:9.3g} "
            f"{r['world_size']:5d}{est}"
        )
    total = sum(r["flops"] for r in rows)
    lines.append(f"{len(rows)} cells, {total:.3g} training FLOPs in all")
    return "\n".join(lines)
