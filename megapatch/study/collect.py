"""``megapatch study collect DIR``: one results row per run, in ``results.jsonl`` and ``.csv``.

Rows come from the manifest (every cell of the current spec, and cells removed from the spec
whose run started) and from imported tables (``--import CSV``, copied into ``DIR/imports/``
and read again by every later collect). The columns, in this order, are the study results
contract read by ``megapatch study fit|report|recommend``:

=====================  =========================================================================
column                 meaning
=====================  =========================================================================
run_id                 the cell's id (imported rows: the CSV's run_id, or ``<file>:<line>``)
status                 finished | stopped | failed | pending (see below)
method                 token | patch
K                      patch size (1 for token)
lam                    share of the training tokens actually trained at patch level (0 for token)
lam_requested          the λ asked for (the plan rounds the patch stage to whole steps)
patch_context          KT | T
seed                   the run's seed (data.seed)
params                 total parameters with the unpadded vocabulary
params_non_embedding   without the input embedding and the output layer
num_layers, hidden_size
D, D_patch, D_token    planned training tokens of the run and of each stage
flops                  planned training FLOPs (flops_per_step over the stage plan)
wall_seconds           seconds of training steps over all sessions (run_summary.json)
device_hours           wall_seconds x ranks / 3600
tokens_per_s_patch     patch-stage tokens / patch-stage step seconds (null for token runs)
tokens_per_s_token     token-stage tokens / token-stage step seconds
val_loss, val_ppl      final token-level validation loss on the study's shared held-out set
source                 megapatch, or the imported CSV's file name
=====================  =========================================================================

Status of a cell: ``finished`` when its run_summary.json says so; ``failed`` when the last
attempt of ``study run`` failed; ``stopped`` when it started (a summary, metrics or a
checkpoint) but did not finish; ``pending`` otherwise. Seconds and throughputs come from the
run summary (or, for a run killed before writing one, from its metrics.jsonl); losses only from
finished runs.

Imported CSV columns: ``method, params, D, val_loss`` always, ``K, lam`` for patch rows; any
other column of the table above is optional (``flops`` left empty is computed by the fit as
6·params·D·(λ/K + 1 − λ) and noted in the report; ``val_ppl`` defaults to exp(val_loss),
``D_patch`` to round(lam·D), ``status`` to finished, ``lam_requested`` to lam). A missing
column or a value that is not a finite number is one error naming the file, line and column.

Both files are byte-identical when collected twice from the same runs: rows sorted (source,
parameters, D, method, K, λ, seed, run id), floats written by ``repr``, no timestamps.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from typing import Any

from megapatch.study.manifest import read_manifest, require_manifest, run_dir, write_atomic
from megapatch.study.runner import has_checkpoint, read_attempts, read_summary
from megapatch.study.spec import StudyError, heldout_key

COLUMNS = (
    "run_id",
    "status",
    "method",
    "K",
    "lam",
    "lam_requested",
    "patch_context",
    "seed",
    "params",
    "params_non_embedding",
    "num_layers",
    "hidden_size",
    "D",
    "D_patch",
    "D_token",
    "flops",
    "wall_seconds",
    "device_hours",
    "tokens_per_s_patch",
    "tokens_per_s_token",
    "val_loss",
    "val_ppl",
    "source",
)
STATUSES = ("finished", "stopped", "failed", "pending")
IMPORT_REQUIRED = ("method", "params", "D", "val_loss")
INT_COLUMNS = ("K", "seed", "params", "params_non_embedding", "num_layers", "hidden_size", "D")
INT_COLUMNS += ("D_patch", "D_token")
FLOAT_COLUMNS = ("lam", "lam_requested", "flops", "wall_seconds", "device_hours")
FLOAT_COLUMNS += ("tokens_per_s_patch", "tokens_per_s_token", "val_loss", "val_ppl")
IMPORTS_DIR = "imports"


# ---------------------------------------------------------------------------- our runs


def _metrics_fallback(rdir: str) -> dict[str, Any]:
    """Seconds and tokens per stage from metrics.jsonl (a run killed before any summary)."""
    steps: dict[int, dict] = {}
    path = os.path.join(rdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("kind") == "train":
                steps[rec["step"]] = rec  # a step trained again after a resume: the last one
    if not steps:
        return {}
    seconds: dict[str, float] = {}
    tokens: dict[str, int] = {}
    prev = 0
    for step in sorted(steps):
        rec = steps[step]
        seconds[rec["stage"]] = seconds.get(rec["stage"], 0.0) + rec["step_seconds"]
        tokens[rec["stage"]] = tokens.get(rec["stage"], 0) + rec["tokens"] - prev
        prev = rec["tokens"]
    return dict(seconds=sum(seconds.values()), stage_seconds=seconds, stage_tokens=tokens)


def cell_status(rdir: str) -> str:
    """finished | failed | stopped | pending (see the module docstring)."""
    summary = read_summary(rdir)
    if summary and summary.get("status") == "finished":
        return "finished"
    attempts = read_attempts(rdir)
    if attempts and attempts[-1].get("state") == "failed":
        return "failed"
    started = summary or os.path.isfile(os.path.join(rdir, "metrics.jsonl"))
    return "stopped" if started or has_checkpoint(rdir) else "pending"


def _rate(tokens: dict, seconds: dict, stage: str) -> float | None:
    t, s = tokens.get(stage), seconds.get(stage)
    return t / s if t and s else None


def cell_result(study_dir: str, row: dict[str, Any]) -> dict[str, Any]:
    """The results row of one manifest cell."""
    rdir = run_dir(study_dir, row["run_id"])
    status = cell_status(rdir)
    summary = read_summary(rdir) if status != "pending" else None
    timing = summary or (_metrics_fallback(rdir) if status != "pending" else {})
    seconds = timing.get("seconds")
    stage_s, stage_t = timing.get("stage_seconds") or {}, timing.get("stage_tokens") or {}
    world = (summary or {}).get("world_size") or row["world_size"]
    d = row["tokens"]
    d_patch = row["stage_tokens"].get("patch", 0)
    finished = status == "finished"
    return dict(
        run_id=row["run_id"],
        status=status,
        method=row["method"],
        K=row["K"],
        lam=d_patch / d,
        lam_requested=float(row["lam"]),
        patch_context=row["patch_context"],
        seed=row["seed"],
        params=row["params"],
        params_non_embedding=row["params_non_embedding"],
        num_layers=row["num_layers"],
        hidden_size=row["hidden_size"],
        D=d,
        D_patch=d_patch,
        D_token=row["stage_tokens"].get("token", 0),
        flops=float(row["flops"]),
        wall_seconds=float(seconds) if seconds is not None else None,
        device_hours=float(seconds) * world / 3600 if seconds is not None else None,
        tokens_per_s_patch=_rate(stage_t, stage_s, "patch") if row["K"] > 1 else None,
        tokens_per_s_token=_rate(stage_t, stage_s, "token"),
        val_loss=_finite(summary.get("val_loss")) if finished else None,
        val_ppl=_finite(summary.get("val_ppl")) if finished else None,
        source="megapatch",
    )


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def check_run_heldout(study_dir: str, rows: list[dict[str, Any]]) -> None:
    """Refuse runs that were validated on different held-out sets (their own config.yaml)."""
    import yaml

    first = None
    for row in rows:
        path = os.path.join(run_dir(study_dir, row["run_id"]), "config.yaml")
        cfg = row["config"]
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    cfg = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise StudyError(f"{path}: not valid YAML ({err})") from None
        key = heldout_key(cfg)
        if first is None:
            first = (row["run_id"], key)
            continue
        for name, value in key.items():
            if value != first[1][name]:
                raise StudyError(
                    f"runs {first[0]} and {row['run_id']} were validated on different held-out "
                    f"sets ({name}: {first[1][name]!r} vs {value!r}); their losses are not "
                    "comparable: re-plan one of them into another study"
                )


# ---------------------------------------------------------------------------- imports


def _parse(value: str, column: str, where: str, integer: bool) -> Any:
    try:
        x = float(value)
    except ValueError:
        raise StudyError(f"{where}, column '{column}': {value!r} is not a number") from None
    if not math.isfinite(x):
        raise StudyError(f"{where}, column '{column}': {value!r} is not a finite number")
    if integer:
        if x != int(x):
            raise StudyError(f"{where}, column '{column}': {value!r} must be a whole number")
        return int(x)
    return x


def read_import(path: str) -> list[dict[str, Any]]:
    """Rows of an external results CSV, checked (see the module docstring)."""
    name = os.path.basename(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            records = list(reader)
    except FileNotFoundError:
        raise StudyError(f"--import {path}: no such file") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise StudyError(f"--import {path}: not a readable UTF-8 CSV ({err})") from None
    missing = [c for c in IMPORT_REQUIRED if c not in header]
    if missing:
        raise StudyError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; an imported "
            f"table needs {', '.join(IMPORT_REQUIRED)} (and K, lam for patch rows)"
        )
    if not records:
        raise StudyError(f"{path}: no rows")
    out = []
    for line, rec in enumerate(records, 2):
        where = f"{path} line {line}"
        if None in rec:
            raise StudyError(f"{where}: more fields than the header has columns")
        get = {k: (v or "").strip() for k, v in rec.items() if k in COLUMNS}
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        method = get.get("method")
        if method not in ("token", "patch"):
            raise StudyError(f"{where}, column 'method': {method!r} must be token or patch")
        status = get.get("status") or "finished"
        if status not in STATUSES:
            raise StudyError(f"{where}, column 'status': {status!r} must be one of {STATUSES}")
        needed = ["params", "D"] + (["val_loss"] if status == "finished" else [])
        needed += ["K", "lam"] if method == "patch" else []
        for column in needed:
            if column not in header:
                raise StudyError(f"{path}: missing column '{column}' (needed by line {line})")
            if not get.get(column):
                raise StudyError(f"{where}, column '{column}': empty (it is required)")
        for column, value in get.items():
            if column in INT_COLUMNS + FLOAT_COLUMNS and value:
                row[column] = _parse(value, column, where, column in INT_COLUMNS)
        for column in ("params", "D", "val_loss", "val_ppl", "flops"):
            if row[column] is not None and row[column] <= 0:
                raise StudyError(f"{where}, column '{column}': {row[column]!r} must be > 0")
        if method == "token":
            row["K"], row["lam"] = row["K"] or 1, row["lam"] or 0.0
            if row["K"] != 1 or row["lam"] != 0:
                raise StudyError(f"{where}: a token row has K=1 and lam=0")
        elif row["K"] < 2 or not 0 < row["lam"] <= 1:
            raise StudyError(f"{where}: a patch row needs K >= 2 and 0 < lam <= 1")
        row.update(method=method, status=status, source=name)
        row["run_id"] = get.get("run_id") or f"{name}:{line}"
        row["patch_context"] = get.get("patch_context") or "KT"
        if row["patch_context"] not in ("KT", "T"):
            raise StudyError(f"{where}, column 'patch_context': must be KT or T")
        row["lam"] = float(row["lam"])
        if row["lam_requested"] is None:
            row["lam_requested"] = row["lam"]
        if row["D_patch"] is None:
            row["D_patch"] = round(row["lam"] * row["D"])
        if row["D_token"] is None:
            row["D_token"] = row["D"] - row["D_patch"]
        if row["val_ppl"] is None and row["val_loss"] is not None:
            row["val_ppl"] = math.exp(row["val_loss"])
        out.append(row)
    return out


def add_import(study_dir: str, path: str) -> str:
    """Check an external table and keep a copy in DIR/imports/ (read by every collect)."""
    read_import(path)
    dest_dir = os.path.join(study_dir, IMPORTS_DIR)
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, os.path.basename(path))
    if os.path.abspath(dest) != os.path.abspath(path):
        shutil.copyfile(path, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
    return dest


# ---------------------------------------------------------------------------- output


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _sort_key(row: dict[str, Any]) -> tuple:
    def num(x: Any) -> float:
        return -1.0 if x is None else float(x)

    return (
        row["source"] != "megapatch",
        row["source"],
        num(row["params"]),
        num(row["D"]),
        row["method"],
        num(row["K"]),
        num(row["lam_requested"]),
        num(row["seed"]),
        row["run_id"],
    )


def render(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(results.jsonl, results.csv) text of ``rows``."""
    rows = sorted(rows, key=_sort_key)
    jsonl = "".join(
        json.dumps({c: r[c] for c in COLUMNS}, allow_nan=False, ensure_ascii=False) + "\n"
        for r in rows
    )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([_cell(r[c]) for c in COLUMNS])
    return jsonl, buf.getvalue()


def collect(study_dir: str, imports: list[str] | None = None, report=print) -> list[dict]:  # noqa: ANN001
    """Collect every run and imported table of ``study_dir``; write results.jsonl/.csv."""
    for path in imports or []:
        dest = add_import(study_dir, path)
        report(f"imported {path} -> {dest}")
    manifest = require_manifest(study_dir) if not imports else read_manifest(study_dir)
    rows = [r for r in manifest if r["in_spec"] or os.path.isdir(run_dir(study_dir, r["run_id"]))]
    check_run_heldout(study_dir, rows)
    results = [cell_result(study_dir, r) for r in rows]
    imp_dir = os.path.join(study_dir, IMPORTS_DIR)
    if os.path.isdir(imp_dir):
        for name in sorted(os.listdir(imp_dir)):
            if name.endswith(".csv"):
                results += read_import(os.path.join(imp_dir, name))
    seen: dict[str, str] = {}
    for r in results:
        if r["run_id"] in seen:
            raise StudyError(
                f"run id {r['run_id']} appears twice ({seen[r['run_id']]} and {r['source']}); "
                "give the imported rows distinct run_id values"
            )
        seen[r["run_id"]] = r["source"]
    jsonl, csv_text = render(results)
    write_atomic(os.path.join(study_dir, "results.jsonl"), jsonl)
    write_atomic(os.path.join(study_dir, "results.csv"), csv_text)
    counts = {s: sum(r["status"] == s for r in results) for s in STATUSES}
    report(format_results(results))
    report(
        f"wrote {os.path.join(study_dir, 'results.jsonl')} and results.csv: {len(results)} rows ("
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + ")"
    )
    return results


def format_results(rows: list[dict[str, Any]]) -> str:
    """A short table of results rows."""
    lines = [
        f"{'run id':46} {'status':8} {'D':>11} {'val loss':>8} {'patch tok/s':>11} "
        f"{'token tok/s':>11} {'wall s':>7}"
    ]

    def f(x: Any, spec: str, width: int) -> str:
        return f"{x:{width}{spec}}" if x is not None else f"{'-':>{width}}"

    for r in sorted(rows, key=_sort_key):
        lines.append(
            f"{r['run_id'][:46]:46} {r['status']:8} {f(r['D'], ',d', 11)} "
            f"{f(r['val_loss'], '.4f', 8)} {f(r['tokens_per_s_patch'], ',.0f', 11)} "
            f"{f(r['tokens_per_s_token'], ',.0f', 11)} {f(r['wall_seconds'], '.0f', 7)}"
        )
    return "\n".join(lines)
