"""Scaling-law fits of a study: L(N, D) = E + A/N^alpha + B/D^beta per method, and multipliers.

Input: ``DIR/results.jsonl`` (or ``DIR/results.csv``), one row per run as written by ``megapatch
study collect``. Only rows with status "finished" are fitted; the others are counted and named.

Methods
-------
Rows are grouped into methods: ``token`` (K=1, lambda=0) and one group per patch setting
``patch_K{K}_lam{lambda}`` (``_ctxT`` appended for ``patch_context`` "T"), where lambda is the
requested patch share (``lam_requested``; ``lam`` when absent) rounded to 3 decimals. The token
group is always fitted; a patch group is fitted when it has at least as many runs as parameters
and 3 distinct N and D (fewer cannot separate E, A/N^alpha and B/D^beta); smaller groups are
listed as not fitted (they still appear in the report's lambda and K curves).

Fit
---
Written in logs (a = log A, b = log B, e = log E) with log-sum-exp:
``log L = LSE(a - alpha log N, b - beta log D, e)``. Objective: the Huber loss (delta 1e-3) of
``log L_pred - log L_obs``, summed over runs (bootstrap resamples weight each run by its count).
Minimiser: L-BFGS-B (exponents bounded to [0, 5]) in centred coordinates (``a - alpha
mean(log N)``, the same for b), which are far better conditioned than (a, alpha) and give the same
optimum. Starts: the objective is evaluated at every point of Hoffmann et al.'s grid (alpha, beta
in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}: 4500 points); L-BFGS-B runs
from the 16 best of them and from the cross-check's solution, and the best optimum is kept.

Cross-check (well conditioned): a variable-projection fit. For each (alpha, beta) on a grid, then
refined by Nelder-Mead, E, A, B >= 0 are solved by non-negative linear least squares of the
relative residual ``(E + A N^-alpha + B D^-beta) / L_obs - 1``. Its agreement with the Huber fit
(relative parameter differences, largest relative difference of the predicted losses) is reported.

``--shared-e``: one E for all fitted methods (a joint fit, started from the per-method fits).

Intervals: bootstrap over runs (resampled with replacement within each method), each resample
fitted by L-BFGS-B from the full-data optimum and from its own coarse variable-projection
solution (so a resample can leave a flat direction such as E -> 0), the better kept; 95%
percentile intervals. The resampling uses one seeded generator, so fit.json is byte-identical
for a fixed seed.

Compute multiplier
------------------
FLOPs per token at K=1 of a run's model (``f1``), in this order:

1. a token-level run of the same architecture (same N, num_layers, hidden_size) with recorded
   flops: median of its ``flops / D`` (exactly megapatch's FLOP function at K=1);
2. otherwise ``flops / (D_token + D_patch / K)``: exact for ``patch_context`` "KT" (the patch stage
   runs B/K sequences of T patch positions, i.e. 1/K of the token stage's FLOPs per token); for
   "T" the patch stage's attention term uses T/K positions, so this slightly underestimates f1;
3. rows without flops (imported CSVs): ``flops = 6 N D (lambda/K + 1 - lambda)`` and ``f1 = 6 N``.

Per run: the token-level fit at the run's N needs ``D_tok = (B / (L - E - A/N^alpha))^(1/beta)``
tokens to reach the run's loss L; the multiplier is ``f1 * D_tok / flops``. When L is at or below
the token fit's asymptote at that N (``E + A/N^alpha``) no token budget reaches it: "> any".

Frontier: compute is modelled as ``C = rho * kappa * N^c * D`` where ``kappa N^c`` is a power law
fitted (least squares in logs) to the f1 of the study's architectures, and rho the method's
median ``flops / (f1 D)`` (about lambda/K + 1 - lambda). Minimising L over N at fixed C has the
closed form ``N* = (alpha A C^beta / (beta c B (rho kappa)^beta))^(1/(alpha + c beta))``, and the
frontier is ``L*(C) = E + G C^-gamma`` with ``gamma = alpha beta / (alpha + c beta)``. The
multiplier at C is the compute the token frontier needs to reach the patch frontier's loss at C,
divided by C ("> any" when that loss is below the token E).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

FIT_FORMAT = "megapatch-study-fit/1"
HUBER_DELTA = 1e-3
PERCENTILES = (2.5, 97.5)
PARAM_NAMES = ("E", "A", "alpha", "B", "beta")
EXPONENT_BOUNDS = (0.0, 5.0)
N_SCREENED_STARTS = 16
N_LAW_PARAMS = 5
MIN_DISTINCT = 3
STATUSES = ("finished", "stopped", "failed", "pending")
ANY = "> any"  # a multiplier no token-level budget reaches

# Hoffmann et al. (2022), approach 3: the grid of initialisations.
GRID_EXPONENTS = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)

# The cross-check's coarse (alpha, beta) grid.
XCHECK_GRID = np.round(np.arange(0.05, 2.0001, 0.05), 10)
XBOOT_GRID = np.round(np.arange(0.1, 2.0001, 0.1), 10)  # coarser: a start for each resample


class StudyInputError(ValueError):
    """Bad study input (missing column, non-finite loss, too few runs, ...): exit code 2."""


# ------------------------------------------------------------------ BLAS threads


@contextlib.contextmanager
def single_thread_blas() -> Iterator[None]:
    """Run OpenBLAS single-threaded inside the block (restored afterwards).

    L-BFGS-B calls BLAS/LAPACK on 5x5 problems thousands of times; OpenBLAS's thread hand-offs
    then cost ~10x the work (measured: 9 ms vs 65-130 ms per bootstrap fit on a loaded 2-core
    machine). The loaded OpenBLAS libraries (numpy's and scipy's) are found in /proc/self/maps and
    set through their ``openblas_set_num_threads`` entry points, as threadpoolctl does; where
    that is not possible (no /proc, other BLAS) nothing changes.
    """
    import scipy.optimize  # noqa: F401  (loads scipy's OpenBLAS before the scan)

    changed = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            libs = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and "/" in ln})
    except OSError:
        libs = []
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    changed.append((setter, int(getter())))
                    setter(1)
                    break
            else:
                continue
            break
    try:
        yield
    finally:
        for setter, previous in changed:
            setter(previous)


# ----------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Run:
    """One finished run, as fitted."""

    run_id: str
    row: int  # 1-based row (line) in the results file
    group: str
    N: float
    D: float
    loss: float
    flops: float
    flops_computed: bool
    f1: float  # FLOPs per token at K=1 of this run's model
    f1_source: str
    K: int
    lam: float
    patch_context: str | None
    seed: int | None
    num_layers: int | None
    hidden_size: int | None


@dataclass
class Group:
    """A method: token level, or one patch (K, lambda, context) setting."""

    name: str
    label: str
    K: int
    lam_key: float
    patch_context: str | None
    runs: list[Run] = field(default_factory=list)

    @property
    def lam(self) -> float:
        """Mean patch share actually trained."""
        return float(np.mean([r.lam for r in self.runs])) if self.runs else self.lam_key


@dataclass
class Study:
    """The finished runs of a study, grouped by method."""

    path: str
    sha256: str
    n_rows: int
    params_column: str
    runs: list[Run]
    groups: dict[str, Group]
    left_out: dict[str, list[str]]
    notes: list[str]


def results_path(study_dir: str) -> str:
    """``DIR/results.jsonl``, else ``DIR/results.csv``."""
    for name in ("results.jsonl", "results.csv"):
        path = os.path.join(study_dir, name)
        if os.path.isfile(path):
            return path
    raise StudyInputError(
        f"{study_dir}: no results.jsonl or results.csv; run `megapatch study collect "
        f"{study_dir}` first (or import a CSV with at least method, params, D, val_loss)"
    )


def _read_rows(path: str) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    if path.endswith(".jsonl"):
        columns: dict[str, None] = {}
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise StudyInputError(f"{path} line {lineno}: not valid JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise StudyInputError(f"{path} line {lineno}: expected a JSON object")
                obj["_row"] = lineno
                rows.append(obj)
                columns.update(dict.fromkeys(k for k in obj if k != "_row"))
        return rows, list(columns)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for lineno, rec in enumerate(reader, 2):
            rows.append(
                {k: (None if v in ("", None) else v) for k, v in rec.items()} | {"_row": lineno}
            )
        return rows, list(reader.fieldnames or [])


def _entry(path: str, row: dict) -> str:
    name = os.path.basename(path)
    rid = row.get("run_id")
    where = "line" if path.endswith(".jsonl") else "row"
    return f"{name} {where} {row['_row']}" + (f" (run {rid})" if rid not in (None, "") else "")


def _number(path: str, row: dict, column: str, required: bool = True) -> float | None:
    value = row.get(column)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        if required:
            raise StudyInputError(
                f"{_entry(path, row)}: no value in column '{column}' (a finished run needs it)"
            )
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise StudyInputError(
            f"{_entry(path, row)}: column '{column}' is {value!r}, not a number"
        ) from None


def _lam_text(lam: float) -> str:
    return f"{lam:.3f}".rstrip("0").rstrip(".")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_study(study_dir: str, params_column: str = "params") -> Study:
    """Read, check and group the finished runs of ``study_dir``; raise StudyInputError."""
    if params_column not in ("params", "params_non_embedding"):
        raise StudyInputError(
            f"--params-column must be params or params_non_embedding, got {params_column!r}"
        )
    path = results_path(study_dir)
    rows, columns = _read_rows(path)
    name = os.path.basename(path)
    if not rows:
        raise StudyInputError(f"{path}: no rows; collect the study's runs first")
    needed = ["method", params_column, "D", "val_loss"]
    if "params" not in needed:
        needed.append("params")
    missing = [c for c in needed if c not in columns]
    if missing:
        raise StudyInputError(
            f"{name}: missing column(s) {', '.join(missing)} (every row needs method, params, "
            f"D, val_loss{', params_non_embedding' if params_column != 'params' else ''}; "
            "patch rows also K and lam)"
        )
    notes: list[str] = []
    has_status = "status" in columns
    if not has_status:
        notes.append(f"{name} has no status column: every row is taken as finished")
    left_out: dict[str, list[str]] = {}
    finished: list[dict] = []
    for row in rows:
        status = row.get("status") if has_status else "finished"
        if status not in STATUSES:
            raise StudyInputError(
                f"{_entry(path, row)}: status is {status!r}; expected one of {', '.join(STATUSES)}"
            )
        if status == "finished":
            finished.append(row)
        else:
            left_out.setdefault(status, []).append(str(row.get("run_id") or f"row {row['_row']}"))

    runs: list[Run] = []
    groups: dict[str, Group] = {}
    n_computed = 0
    seen_ids: set[str] = set()
    for row in finished:
        entry = _entry(path, row)
        method = row.get("method")
        if method not in ("token", "patch"):
            raise StudyInputError(
                f"{entry}: unknown method {method!r}; expected 'token' or 'patch'"
            )
        run_id = str(row.get("run_id") or f"row {row['_row']}")
        if run_id in seen_ids:
            raise StudyInputError(f"{entry}: run_id {run_id!r} appears twice")
        seen_ids.add(run_id)
        loss = _number(path, row, "val_loss")
        if not math.isfinite(loss) or loss <= 0:
            raise StudyInputError(
                f"{entry}, method {method}: val_loss is {loss!r}; a finished run needs a finite "
                "positive validation loss (re-collect it, or mark the run failed)"
            )
        n_val = _number(path, row, params_column)
        d_val = _number(path, row, "D")
        params = _number(path, row, "params")
        for col, val in ((params_column, n_val), ("D", d_val), ("params", params)):
            if not math.isfinite(val) or val <= 0:
                raise StudyInputError(f"{entry}: {col} is {val!r}; expected a finite number > 0")
        if method == "token":
            k_val = _number(path, row, "K", required=False)
            lam = _number(path, row, "lam", required=False)
            if (k_val is not None and k_val != 1) or (lam is not None and lam != 0):
                raise StudyInputError(
                    f"{entry}: method token with K={k_val}, lam={lam}; token rows have K=1, lam=0"
                )
            k, lam, context, gname = 1, 0.0, None, "token"
            if gname not in groups:
                groups[gname] = Group("token", "token level", 1, 0.0, None)
        else:
            if "K" not in columns or "lam" not in columns:
                raise StudyInputError(
                    f"{name}: patch rows need columns K and lam (missing: "
                    f"{', '.join(c for c in ('K', 'lam') if c not in columns)})"
                )
            k_val = _number(path, row, "K")
            lam = _number(path, row, "lam")
            if k_val != int(k_val) or k_val < 2:
                raise StudyInputError(
                    f"{entry}: patch run with K={k_val}; expected an integer >= 2"
                )
            if not 0 < lam <= 1:
                raise StudyInputError(f"{entry}: patch run with lam={lam}; expected 0 < lam <= 1")
            k = int(k_val)
            lam_req = _number(path, row, "lam_requested", required=False)
            lam_key = round(lam_req if lam_req is not None and 0 < lam_req <= 1 else lam, 3)
            context = row.get("patch_context") or None
            if context not in (None, "KT", "T"):
                raise StudyInputError(f"{entry}: patch_context is {context!r}; expected KT or T")
            gname = f"patch_K{k}_lam{_lam_text(lam_key)}" + ("_ctxT" if context == "T" else "")
            if gname not in groups:
                label = f"patch K={k} λ={_lam_text(lam_key)}" + (
                    " (T context)" if context == "T" else ""
                )
                groups[gname] = Group(gname, label, k, lam_key, context)
        flops = _number(path, row, "flops", required=False)
        computed = flops is None
        if computed:
            flops = 6.0 * params * d_val * (lam / k + 1.0 - lam)
            n_computed += 1
        elif not math.isfinite(flops) or flops <= 0:
            raise StudyInputError(f"{entry}: flops is {flops!r}; expected a finite number > 0")
        d_patch = _number(path, row, "D_patch", required=False)
        d_token = _number(path, row, "D_token", required=False)
        if d_patch is None or d_token is None:
            d_patch, d_token = lam * d_val, (1.0 - lam) * d_val
        seed = _number(path, row, "seed", required=False)
        layers = _number(path, row, "num_layers", required=False)
        hidden = _number(path, row, "hidden_size", required=False)
        if computed:
            f1, f1_source = 6.0 * params, "6N (no flops recorded)"
        elif k == 1:
            f1, f1_source = flops / d_val, "flops/D (token run)"
        else:
            f1, f1_source = flops / (d_token + d_patch / k), "flops/(D_token + D_patch/K)"
        runs.append(
            Run(
                run_id=run_id,
                row=int(row["_row"]),
                group=gname,
                N=n_val,
                D=d_val,
                loss=loss,
                flops=flops,
                flops_computed=computed,
                f1=f1,
                f1_source=f1_source,
                K=k,
                lam=lam,
                patch_context=context,
                seed=None if seed is None else int(seed),
                num_layers=None if layers is None else int(layers),
                hidden_size=None if hidden is None else int(hidden),
            )
        )
    if not runs:
        raise StudyInputError(
            f"{name}: no finished runs ({', '.join(f'{len(v)} {k}' for k, v in left_out.items())})"
        )
    if n_computed:
        notes.append(
            f"{n_computed} run(s) without flops: computed as 6·params·D·(λ/K + 1 − λ) "
            "(approximate: no attention or LM-head FLOPs)"
        )
    runs = _resolve_f1(runs)
    for run in runs:
        groups[run.group].runs.append(run)
    groups = {k: groups[k] for k in sorted(groups, key=_group_order)}
    return Study(
        path=path,
        sha256=_file_sha256(path),
        n_rows=len(rows),
        params_column=params_column,
        runs=runs,
        groups=groups,
        left_out={k: left_out[k] for k in sorted(left_out)},
        notes=notes,
    )


def _group_order(name: str) -> tuple:
    return (name != "token", name)


def _arch(run: Run) -> tuple:
    return (run.N, run.num_layers, run.hidden_size)


def _resolve_f1(runs: list[Run]) -> list[Run]:
    from dataclasses import replace

    per_arch: dict[tuple, list[float]] = {}
    for run in runs:
        if run.K == 1 and not run.flops_computed:
            per_arch.setdefault(_arch(run), []).append(run.f1)
    out = []
    for run in runs:
        token_f1 = per_arch.get(_arch(run))
        if run.K > 1 and not run.flops_computed and token_f1:
            run = replace(
                run, f1=float(np.median(token_f1)), f1_source="flops/D of a token run, same model"
            )
        out.append(run)
    return out


# ----------------------------------------------------------------------------- the law


def law_loss(params: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """L = E + A/N^alpha + B/D^beta; ``params[..., :]`` = (E, A, alpha, B, beta)."""
    p = np.asarray(params, dtype=float)
    e, a, alpha, b, beta = (p[..., i] for i in range(5))
    return e + a * np.power(n, -alpha) + b * np.power(d, -beta)


def to_linear(theta: np.ndarray) -> np.ndarray:
    """(e, a, alpha, b, beta) in logs -> (E, A, alpha, B, beta)."""
    t = np.asarray(theta, dtype=float)
    return np.stack(
        [np.exp(t[..., 0]), np.exp(t[..., 1]), t[..., 2], np.exp(t[..., 3]), t[..., 4]], -1
    )


def to_log(params: np.ndarray) -> np.ndarray:
    """(E, A, alpha, B, beta) -> (e, a, alpha, b, beta)."""
    p = np.asarray(params, dtype=float)
    with np.errstate(divide="ignore"):
        return np.stack(
            [np.log(p[..., 0]), np.log(p[..., 1]), p[..., 2], np.log(p[..., 3]), p[..., 4]], -1
        )


def _huber(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Huber value and slope: slope = clip(r, ±delta), value = slope * (r - slope / 2)."""
    slope = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    return slope * (r - 0.5 * slope), slope


def _objective_grad(
    z: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[float, np.ndarray]:
    """Summed Huber loss and gradient in centred coordinates z = (e, a_c, alpha, b_c, beta)."""
    e, a_c, alpha, b_c, beta = z
    u1 = a_c - alpha * ln_n
    u2 = b_c - beta * ln_d
    m = np.maximum(np.maximum(u1, u2), e)
    s1 = np.exp(u1 - m)
    s2 = np.exp(u2 - m)
    s3 = np.exp(e - m)
    tot = s1 + s2 + s3
    r = m + np.log(tot) - y
    value, slope = _huber(r)
    g = w * slope / tot
    g1, g2 = g * s1, g * s2
    gl1, gl2 = g1 @ ln_n, g2 @ ln_d
    grad = np.array([g @ s3, g1.sum(), -gl1, g2.sum(), -gl2])
    return float(w @ value), grad


def _objective_batch(
    z: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, y: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """The objective at many points z[G, 5] (no gradient)."""
    u1 = z[:, 1:2] - z[:, 2:3] * ln_n
    u2 = z[:, 3:4] - z[:, 4:5] * ln_d
    u3 = np.broadcast_to(z[:, 0:1], u1.shape)
    lse = np.logaddexp(np.logaddexp(u1, u2), u3)
    value, _ = _huber(lse - y)
    return (w * value).sum(axis=1)


@dataclass
class Centre:
    """Centring of log N and log D (a_c = a - alpha * n0, b_c = b - beta * d0)."""

    n0: float
    d0: float

    def to_internal(self, theta: np.ndarray) -> np.ndarray:
        t = np.array(theta, dtype=float)
        t[..., 1] = t[..., 1] - t[..., 2] * self.n0
        t[..., 3] = t[..., 3] - t[..., 4] * self.d0
        return t

    def to_external(self, z: np.ndarray) -> np.ndarray:
        t = np.array(z, dtype=float)
        t[..., 1] = t[..., 1] + t[..., 2] * self.n0
        t[..., 3] = t[..., 3] + t[..., 4] * self.d0
        return t


_BOUNDS5 = [(None, None), (None, None), EXPONENT_BOUNDS, (None, None), EXPONENT_BOUNDS]
_LBFGS_OPTIONS = {"maxiter": 3000, "maxfun": 6000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20}


def _lbfgs(fun: object, z0: np.ndarray, bounds: list) -> tuple[np.ndarray, float, bool]:
    from scipy.optimize import minimize

    res = minimize(fun, z0, jac=True, method="L-BFGS-B", bounds=bounds, options=_LBFGS_OPTIONS)
    # "ABNORMAL" line-search ends happen at machine precision; the point is still the optimum.
    ok = bool(res.success) or "ABNORMAL" in str(res.message).upper()
    return np.asarray(res.x, dtype=float), float(res.fun), ok


def hoffmann_grid() -> np.ndarray:
    """The 4500 starting points (e, a, alpha, b, beta) of Hoffmann et al.'s approach 3."""
    g = np.array(
        np.meshgrid(GRID_E, GRID_AB, GRID_EXPONENTS, GRID_AB, GRID_EXPONENTS, indexing="ij")
    )
    return g.reshape(5, -1).T


@dataclass
class LawFit:
    """One Huber fit: theta = (e, a, alpha, b, beta) in logs."""

    theta: np.ndarray
    objective: float
    converged: bool
    centre: Centre

    @property
    def params(self) -> np.ndarray:
        """(E, A, alpha, B, beta)."""
        return to_linear(self.theta)


def fit_law(
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    weights: np.ndarray | None = None,
    extra_starts: list[np.ndarray] | None = None,
    screened_starts: int = N_SCREENED_STARTS,
) -> LawFit:
    """Huber fit of L(N, D) to runs (N, D, loss): grid screening, then L-BFGS-B."""
    ln_n, ln_d, y = np.log(n), np.log(d), np.log(loss)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    centre = Centre(float(np.mean(ln_n)), float(np.mean(ln_d)))
    ln_nc, ln_dc = ln_n - centre.n0, ln_d - centre.d0
    grid = centre.to_internal(hoffmann_grid())
    values = _objective_batch(grid, ln_nc, ln_dc, y, w)
    order = np.lexsort((np.arange(len(values)), values))[:screened_starts]
    starts = [grid[i] for i in order]
    starts += [centre.to_internal(s) for s in (extra_starts or [])]

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        return _objective_grad(z, ln_nc, ln_dc, y, w)

    best: tuple[np.ndarray, float, bool] | None = None
    for z0 in starts:
        z, val, ok = _lbfgs(fun, _clip(z0), _BOUNDS5)
        if best is None or val < best[1]:
            best = (z, val, ok)
    assert best is not None
    return LawFit(centre.to_external(best[0]), best[1], best[2], centre)


def _clip(z: np.ndarray) -> np.ndarray:
    z = np.array(z, dtype=float)
    z[[2, 4]] = np.clip(z[[2, 4]], *EXPONENT_BOUNDS)
    return z


def refit_bootstrap(
    n: np.ndarray, d: np.ndarray, loss: np.ndarray, weights: np.ndarray, start: LawFit
) -> tuple[np.ndarray, bool]:
    """A bootstrap resample's fit: L-BFGS-B from the full-data optimum and from the resample's
    own coarse variable-projection solution; the better optimum is kept.

    Restarting only from the full-data optimum pins parameters on flat directions (with E -> 0
    the gradient in e = log E vanishes) and collapses their intervals; the VP start, a global
    search over (alpha, beta), lets a resample reach another basin."""
    centre = start.centre
    ln_n, ln_d = np.log(n), np.log(d)
    ln_nc, ln_dc, y = ln_n - centre.n0, ln_d - centre.d0, np.log(loss)
    w = np.asarray(weights, dtype=float)

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        return _objective_grad(z, ln_nc, ln_dc, y, w)

    best = None
    for theta in (start.theta, _vp_start(ln_n, ln_d, loss, w, XBOOT_GRID)):
        z, val, ok = _lbfgs(fun, _clip(centre.to_internal(theta)), _BOUNDS5)
        if best is None or val < best[1]:
            best = (z, val, ok)
    assert best is not None
    return centre.to_external(best[0]), best[2]


def _vp_start(
    ln_n: np.ndarray, ln_d: np.ndarray, loss: np.ndarray, w: np.ndarray, grid: np.ndarray
) -> np.ndarray:
    """(e, a, alpha, b, beta) from the coarse VP grid (zero coefficients made tiny)."""
    alpha, beta = _vp_grid(ln_n, ln_d, loss, w, grid)
    _, coef = _vp_profile(alpha, beta, ln_n, ln_d, loss, w)
    coef = np.maximum(coef, 1e-12 * float(np.min(loss)))
    return to_log(np.array([coef[0], coef[1], alpha, coef[2], beta]))


# --------------------------------------------------------------- shared E (joint fit)


def fit_joint(
    data: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    weights: list[np.ndarray] | None,
    starts: list[np.ndarray],
    centres: list[Centre],
) -> tuple[np.ndarray, float, bool]:
    """Joint Huber fit with one e: returns thetas[M, 5] (column 0 equal), objective, converged.

    ``starts`` are flat vectors (e, a_1, alpha_1, b_1, beta_1, a_2, ...) in logs.
    """
    m = len(data)
    prepared = []
    for i, (n, d, loss) in enumerate(data):
        w = np.ones(len(loss)) if weights is None else np.asarray(weights[i], dtype=float)
        prepared.append((np.log(n) - centres[i].n0, np.log(d) - centres[i].d0, np.log(loss), w))

    def to_int(flat: np.ndarray) -> np.ndarray:
        z = np.array(flat, dtype=float)
        for i in range(m):
            z[1 + 4 * i] -= z[2 + 4 * i] * centres[i].n0
            z[3 + 4 * i] -= z[4 + 4 * i] * centres[i].d0
        return z

    def to_ext(z: np.ndarray) -> np.ndarray:
        t = np.array(z, dtype=float)
        for i in range(m):
            t[1 + 4 * i] += t[2 + 4 * i] * centres[i].n0
            t[3 + 4 * i] += t[4 + 4 * i] * centres[i].d0
        return t

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        total, grad = 0.0, np.zeros_like(z)
        for i, (ln_n, ln_d, y, w) in enumerate(prepared):
            zi = np.concatenate([[z[0]], z[1 + 4 * i : 5 + 4 * i]])
            v, g = _objective_grad(zi, ln_n, ln_d, y, w)
            total += v
            grad[0] += g[0]
            grad[1 + 4 * i : 5 + 4 * i] += g[1:]
        return total, grad

    bounds = [(None, None)] + [(None, None), EXPONENT_BOUNDS, (None, None), EXPONENT_BOUNDS] * m
    best: tuple[np.ndarray, float, bool] | None = None
    for s in starts:
        z, val, ok = _lbfgs(fun, to_int(s), bounds)
        if best is None or val < best[1]:
            best = (z, val, ok)
    assert best is not None
    flat = to_ext(best[0])
    thetas = np.array([np.concatenate([[flat[0]], flat[1 + 4 * i : 5 + 4 * i]]) for i in range(m)])
    return thetas, best[1], best[2]


# ------------------------------------------------------------- cross-check (VP + NNLS)


def _vp_grid(
    x_ln_n: np.ndarray, ln_d: np.ndarray, loss: np.ndarray, w: np.ndarray, grid: np.ndarray
) -> tuple:
    """Best (alpha, beta) on a grid, NNLS solved exactly by active-set enumeration."""
    alphas, betas = np.meshgrid(grid, grid, indexing="ij")
    alphas, betas = alphas.ravel(), betas.ravel()
    sw = np.sqrt(w) / loss
    cols = np.stack(
        [
            np.broadcast_to(sw, (len(alphas), len(loss))),
            sw * np.exp(-alphas[:, None] * x_ln_n),
            sw * np.exp(-betas[:, None] * ln_d),
        ],
        axis=-1,
    )  # [G, n, 3]
    target = np.sqrt(w)
    norms = np.linalg.norm(cols, axis=1)  # [G, 3]
    cols = cols / norms[:, None, :]
    gram = np.einsum("gni,gnj->gij", cols, cols)
    rhs = np.einsum("gni,n->gi", cols, target)
    tt = float(target @ target)
    best = np.full(len(alphas), tt)
    for mask in range(1, 8):
        idx = [i for i in range(3) if mask >> i & 1]
        g = gram[:, idx][:, :, idx] + 1e-12 * np.eye(len(idx))
        z = np.linalg.solve(g, rhs[:, idx][..., None])[..., 0]
        resid = tt - np.einsum("gi,gi->g", z, rhs[:, idx])
        ok = np.all(z >= 0, axis=1)
        best = np.where(ok & (resid < best), resid, best)
    i = int(np.argmin(best))
    return float(alphas[i]), float(betas[i])


def _vp_profile(
    alpha: float, beta: float, ln_n: np.ndarray, ln_d: np.ndarray, loss: np.ndarray, w: np.ndarray
) -> tuple[float, np.ndarray]:
    from scipy.optimize import nnls

    sw = np.sqrt(w) / loss
    x = np.stack([sw, sw * np.exp(-alpha * ln_n), sw * np.exp(-beta * ln_d)], axis=1)
    norms = np.linalg.norm(x, axis=0)
    norms[norms == 0] = 1.0
    coef, rnorm = nnls(x / norms, np.sqrt(w))
    return float(rnorm**2), coef / norms


def cross_check(
    n: np.ndarray, d: np.ndarray, loss: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Variable-projection fit: (E, A, alpha, B, beta) minimising the relative squared error."""
    from scipy.optimize import minimize

    ln_n, ln_d = np.log(n), np.log(d)
    loss = np.asarray(loss, dtype=float)
    w = np.ones_like(loss) if weights is None else np.asarray(weights, dtype=float)
    a0, b0 = _vp_grid(ln_n, ln_d, loss, w, XCHECK_GRID)

    def prof(x: np.ndarray) -> float:
        alpha, beta = np.clip(x, 1e-6, EXPONENT_BOUNDS[1])
        return _vp_profile(float(alpha), float(beta), ln_n, ln_d, loss, w)[0]

    res = minimize(
        prof,
        np.array([a0, b0]),
        method="Nelder-Mead",
        options={"xatol": 1e-11, "fatol": 1e-22, "maxiter": 4000, "initial_simplex": None},
    )
    alpha, beta = (float(v) for v in np.clip(res.x, 1e-6, EXPONENT_BOUNDS[1]))
    _, coef = _vp_profile(alpha, beta, ln_n, ln_d, loss, w)
    return np.array([coef[0], coef[1], alpha, coef[2], beta])


# -------------------------------------------------------------------- multipliers


@dataclass(frozen=True)
class FlopsModel:
    """FLOPs per token at K=1 as a power law of N: f1(N) = kappa * N^c."""

    kappa: float
    c: float
    points: tuple[tuple[float, float], ...]

    def f1(self, n: np.ndarray) -> np.ndarray:
        return self.kappa * np.power(n, self.c)


def flops_model(runs: list[Run]) -> FlopsModel:
    """Least-squares power law through the median f1 of each model size."""
    per_n: dict[float, list[float]] = {}
    for run in runs:
        per_n.setdefault(run.N, []).append(run.f1)
    pts = tuple(sorted((n, float(np.median(v))) for n, v in per_n.items()))
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    if len(pts) >= 2:
        c, logk = np.polyfit(x, y, 1)
    else:
        c, logk = 1.0, float(y[0] - x[0])
    return FlopsModel(float(math.exp(logk)), float(c), pts)


def tokens_to_reach(params: np.ndarray, n: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Tokens the law needs at model size N to reach ``loss`` (inf when below its asymptote)."""
    p = np.asarray(params, dtype=float)
    e, a, alpha, b, beta = (p[..., i] for i in range(5))
    gap = loss - e - a * np.power(n, -alpha)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = np.exp((np.log(b) - np.log(np.where(gap > 0, gap, np.nan))) / beta)
    return np.where(gap > 0, d, np.inf)


def frontier(
    params: np.ndarray, compute: np.ndarray, cost: float, fm: FlopsModel
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute-optimal (N*, D*, L*) at compute C for C = cost * kappa * N^c * D (closed form)."""
    p = np.asarray(params, dtype=float)
    e, a, alpha, b, beta = (p[..., i] for i in range(5))
    c = fm.c
    q = cost * fm.kappa
    ln_c = np.log(compute)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ln_n = (
            np.log(alpha)
            + np.log(a)
            + beta * ln_c
            - np.log(beta)
            - np.log(c)
            - np.log(b)
            - beta * np.log(q)
        ) / (alpha + c * beta)
        ln_d = ln_c - np.log(q) - c * ln_n
        loss = e + np.exp(np.log(a) - alpha * ln_n) + np.exp(np.log(b) - beta * ln_d)
    bad = (alpha <= 1e-9) | (beta <= 1e-9)
    nan = np.nan
    return (
        np.where(bad, nan, np.exp(ln_n)),
        np.where(bad, nan, np.exp(ln_d)),
        np.where(bad, nan, loss),
    )


def compute_to_reach(
    params: np.ndarray, loss: np.ndarray, cost: float, fm: FlopsModel
) -> np.ndarray:
    """Compute the law's frontier needs to reach ``loss`` (inf at or below E)."""
    p = np.asarray(params, dtype=float)
    e, alpha, beta = p[..., 0], p[..., 2], p[..., 4]
    gamma = alpha * beta / (alpha + fm.c * beta)
    ln_c0 = math.log(1e20)
    _, _, l0 = frontier(p, np.float64(1e20), cost, fm)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ln_g = np.log(l0 - e) + gamma * ln_c0
        gap = loss - e
        ln_c = (ln_g - np.log(np.where(gap > 0, gap, np.nan))) / gamma
        out = np.exp(ln_c)
    return np.where(gap > 0, out, np.where(np.isnan(l0), np.nan, np.inf))


def percentile_interval(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile interval: +inf samples allowed (a bound touching one is +inf); NaN ignored."""
    s = np.asarray(samples, dtype=float)
    big = np.finfo(float).max
    s = np.where(np.isposinf(s), big, s)
    with np.errstate(all="ignore"):
        lo, hi = np.nanpercentile(s, PERCENTILES, axis=axis)
    lo = np.where(lo >= 1e300, np.inf, lo)
    hi = np.where(hi >= 1e300, np.inf, hi)
    return lo, hi


def _jnum(x: float) -> float | str | None:
    """A JSON number: +inf as "> any" (multipliers no token budget reaches), NaN as null."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return ANY if x > 0 else None
    return x


# --------------------------------------------------------------------- the study fit


def fit_requirement(group: Group, shared_e: bool) -> str | None:
    """Why ``group`` cannot be fitted (None when it can)."""
    n_params = N_LAW_PARAMS - (1 if shared_e else 0)
    runs = group.runs
    if len(runs) < n_params:
        return f"{len(runs)} finished run(s), fewer than the {n_params} parameters of its law"
    n_distinct = len({r.N for r in runs})
    d_distinct = len({r.D for r in runs})
    if n_distinct < MIN_DISTINCT or d_distinct < MIN_DISTINCT:
        return (
            f"{n_distinct} distinct model size(s) N and {d_distinct} distinct token count(s) D; "
            f"the law needs at least {MIN_DISTINCT} of each to separate E, A/N^alpha and B/D^beta"
        )
    return None


def select_groups(
    study: Study, methods: list[str] | None, shared_e: bool
) -> tuple[list[Group], dict[str, str]]:
    """The groups to fit and the skipped ones with their reason; errors for bad requests."""
    if "token" not in study.groups:
        raise StudyInputError(
            f"{os.path.basename(study.path)}: no finished token-level runs (method token); the "
            "token-level fit is the reference of every compute multiplier"
        )
    if methods:
        unknown = [m for m in methods if m not in study.groups]
        if unknown:
            raise StudyInputError(
                f"--method {', '.join(unknown)}: no such method group among the finished runs; "
                f"the groups are: {', '.join(study.groups)}"
            )
    wanted = set(methods or []) | {"token"}
    fitted, skipped = [], {}
    for name, group in study.groups.items():
        reason = fit_requirement(group, shared_e)
        explicit = name in wanted
        if reason is not None and (explicit or methods is None and name == "token"):
            raise StudyInputError(
                f"method {name}: {reason}; add runs"
                + (" or leave it out (drop --method " + name + ")" if name != "token" else "")
                + f" (runs: {', '.join(r.run_id for r in group.runs)})"
            )
        if methods is not None and not explicit:
            skipped[name] = "not requested (--method)"
        elif reason is not None:
            skipped[name] = reason
        else:
            fitted.append(group)
    return fitted, skipped


def _arrays(group: Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.array([r.N for r in group.runs]),
        np.array([r.D for r in group.runs]),
        np.array([r.loss for r in group.runs]),
    )


def cost_ratio(group: Group) -> float:
    """Median actual compute over token-level compute of the same tokens (lambda/K + 1 - lambda)."""
    return float(np.median([r.flops / (r.f1 * r.D) for r in group.runs]))


def compute_grid(runs: list[Run]) -> np.ndarray:
    """Frontier budgets: a tenth of the smallest run to 10x the largest, 8 per decade."""
    lo = math.floor(math.log10(min(r.flops for r in runs)) * 8) / 8 - 1
    hi = math.ceil(math.log10(max(r.flops for r in runs)) * 8) / 8 + 1
    return 10.0 ** np.linspace(lo, hi, int(round((hi - lo) * 8)) + 1)


def fit_study(
    study_dir: str,
    *,
    shared_e: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
    params_column: str = "params",
    methods: list[str] | None = None,
) -> dict:
    """Fit every method of a study; returns the content of fit.json."""
    with single_thread_blas():
        return _fit_study(study_dir, shared_e, bootstrap, seed, params_column, methods)


def _fit_study(
    study_dir: str,
    shared_e: bool,
    bootstrap: int,
    seed: int,
    params_column: str,
    methods: list[str] | None,
) -> dict:
    study = load_study(study_dir, params_column)
    fitted, skipped = select_groups(study, methods, shared_e)
    data = {g.name: _arrays(g) for g in fitted}

    # Per-method fits with their cross-checks (the joint fit starts from them).
    single: dict[str, LawFit] = {}
    xcheck: dict[str, np.ndarray] = {}
    for g in fitted:
        n, d, loss = data[g.name]
        xcheck[g.name] = cross_check(n, d, loss)
        extra = [to_log(xcheck[g.name])] if np.all(xcheck[g.name][[0, 1, 3]] > 0) else []
        single[g.name] = fit_law(n, d, loss, extra_starts=extra)

    names = [g.name for g in fitted]
    centres = [single[nm].centre for nm in names]
    if shared_e:
        per = [single[nm].theta for nm in names]
        e_starts = sorted({float(t[0]) for t in per} | {float(np.mean([t[0] for t in per]))})
        starts = [np.concatenate([[e]] + [t[1:] for t in per]) for e in e_starts]
        thetas, objective, converged = fit_joint([data[nm] for nm in names], None, starts, centres)
        main = {nm: thetas[i] for i, nm in enumerate(names)}
        objectives = {nm: None for nm in names}
        joint = {"objective": objective, "converged": converged}
    else:
        main = {nm: single[nm].theta for nm in names}
        objectives = {nm: single[nm].objective for nm in names}
        joint = None

    # Bootstrap: resample runs with replacement within each method, one seeded generator.
    rng = np.random.Generator(np.random.PCG64(seed))
    counts = {
        nm: rng.multinomial(
            len(data[nm][2]), np.full(len(data[nm][2]), 1 / len(data[nm][2])), size=bootstrap
        )
        for nm in names
    }
    boot = {nm: np.empty((bootstrap, 5)) for nm in names}
    failures = {nm: 0 for nm in names}
    if shared_e and bootstrap:
        flat = np.concatenate([[main[names[0]][0]]] + [main[nm][1:] for nm in names])
        for b in range(bootstrap):
            # starts: the joint optimum, and the resample's per-method VP solutions (mean e)
            vp = [
                _vp_start(
                    np.log(data[nm][0]),
                    np.log(data[nm][1]),
                    data[nm][2],
                    counts[nm][b].astype(float),
                    XBOOT_GRID,
                )
                for nm in names
            ]
            vp_flat = np.concatenate([[float(np.mean([v[0] for v in vp]))]] + [v[1:] for v in vp])
            th, _, ok = fit_joint(
                [data[nm] for nm in names],
                [counts[nm][b] for nm in names],
                [flat, vp_flat],
                centres,
            )
            for i, nm in enumerate(names):
                boot[nm][b] = th[i]
                failures[nm] += 0 if ok else 1
    else:
        for nm in names:
            n, d, loss = data[nm]
            for b in range(bootstrap):
                boot[nm][b], ok = refit_bootstrap(n, d, loss, counts[nm][b], single[nm])
                failures[nm] += 0 if ok else 1

    fm = flops_model(study.runs)
    grid = compute_grid([r for g in fitted for r in g.runs])
    cost = {g.name: cost_ratio(g) for g in fitted}
    lin_main = {nm: to_linear(main[nm]) for nm in names}
    lin_boot = {nm: to_linear(boot[nm]) for nm in names}

    out_methods = {}
    for g in fitted:
        nm = g.name
        n, d, loss = data[nm]
        p = lin_main[nm]
        pred = law_loss(p, n, d)
        xc = xcheck[nm]
        xpred = law_loss(xc, n, d)
        if bootstrap:
            lo, hi = percentile_interval(lin_boot[nm])
            intervals = {k: [_jnum(lo[i]), _jnum(hi[i])] for i, k in enumerate(PARAM_NAMES)}
        else:
            intervals = None
        n_opt, d_opt, l_opt = frontier(p, grid, cost[nm], fm)
        fr = {
            "N": [_jnum(v) for v in n_opt],
            "D": [_jnum(v) for v in d_opt],
            "loss": [_jnum(v) for v in l_opt],
            "inside_data": [bool(v) for v in _inside(g, n_opt, d_opt)],
        }
        if bootstrap:
            _, _, lb = frontier(lin_boot[nm][:, None, :], grid[None, :], cost[nm], fm)
            blo, bhi = percentile_interval(lb)
            fr["loss_interval"] = [[_jnum(a), _jnum(b)] for a, b in zip(blo, bhi)]
        out_methods[nm] = {
            "label": g.label,
            "K": g.K,
            "lam": g.lam_key,
            "lam_trained_mean": g.lam,
            "patch_context": g.patch_context,
            "cost_ratio": cost[nm],
            "n_runs": len(g.runs),
            "runs": [r.run_id for r in g.runs],
            "params": {k: float(p[i]) for i, k in enumerate(PARAM_NAMES)},
            "log_params": {
                k: float(main[nm][i]) for i, k in enumerate(("e", "a", "alpha", "b", "beta"))
            },
            "intervals": intervals,
            "objective": objectives[nm],
            "converged": bool(single[nm].converged),
            "residuals": {
                r.run_id: float(math.log(r.loss) - math.log(pr)) for r, pr in zip(g.runs, pred)
            },
            "cross_check": {
                "params": {k: float(xc[i]) for i, k in enumerate(PARAM_NAMES)},
                "relative_difference": {
                    k: float(abs(xc[i] - p[i]) / abs(p[i])) if p[i] != 0 else None
                    for i, k in enumerate(PARAM_NAMES)
                },
                "max_relative_loss_difference": float(np.max(np.abs(xpred - pred) / pred)),
            },
            "data_range": {
                "N": [float(n.min()), float(n.max())],
                "D": [float(d.min()), float(d.max())],
                "C": [min(r.flops for r in g.runs), max(r.flops for r in g.runs)],
            },
            "frontier": fr,
            "bootstrap": {
                "columns": ["e", "a", "alpha", "b", "beta"],
                "n": bootstrap,
                "not_converged": failures[nm],
                "samples": [[float(v) for v in row] for row in boot[nm]],
            },
        }

    multiplier = _multipliers(study, fitted, lin_main, lin_boot, bootstrap, cost, fm, grid)
    return {
        "format": FIT_FORMAT,
        "input": {
            "file": os.path.basename(study.path),
            "sha256": study.sha256,
            "rows": study.n_rows,
            "finished": len(study.runs),
            "fitted_runs": sum(len(g.runs) for g in fitted),
            "left_out": study.left_out,
        },
        "settings": {
            "params_column": params_column,
            "shared_e": shared_e,
            "bootstrap": bootstrap,
            "seed": seed,
            "huber_delta": HUBER_DELTA,
            "percentiles": list(PERCENTILES),
            "exponent_bounds": list(EXPONENT_BOUNDS),
            "starts": f"Hoffmann grid (4500 points) screened, L-BFGS-B from the best "
            f"{N_SCREENED_STARTS} and the cross-check solution",
            "methods": methods,
        },
        "notes": study.notes,
        "joint": joint,
        "flops_model": {
            "kappa": fm.kappa,
            "exponent": fm.c,
            "points": [list(pt) for pt in fm.points],
        },
        "methods": out_methods,
        "skipped_methods": skipped,
        "compute_grid": [float(c) for c in grid],
        "multiplier": multiplier,
    }


def _inside(group: Group, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Whether frontier points (N*, D*) lie within the N and D ranges of ``group``'s runs."""
    ns = [r.N for r in group.runs]
    ds = [r.D for r in group.runs]
    with np.errstate(invalid="ignore"):
        return (n >= min(ns)) & (n <= max(ns)) & (d >= min(ds)) & (d <= max(ds))


def _multipliers(
    study: Study,
    fitted: list[Group],
    lin_main: dict[str, np.ndarray],
    lin_boot: dict[str, np.ndarray],
    bootstrap: int,
    cost: dict[str, float],
    fm: FlopsModel,
    grid: np.ndarray,
) -> dict:
    tok, tok_boot = lin_main["token"], lin_boot["token"]
    per_run = []
    for run in study.runs:
        if run.K == 1:
            continue
        d_tok = tokens_to_reach(tok, run.N, run.loss)
        mult = float(run.f1 * d_tok / run.flops)
        rec = {
            "run_id": run.run_id,
            "method": run.group,
            "N": run.N,
            "D": run.D,
            "tokens_per_param": run.D / run.N,
            "loss": run.loss,
            "flops": run.flops,
            "f1": run.f1,
            "f1_source": run.f1_source,
            "token_tokens": _jnum(d_tok),
            "multiplier": _jnum(mult),
        }
        if bootstrap:
            mb = run.f1 * tokens_to_reach(tok_boot, run.N, run.loss) / run.flops
            lo, hi = percentile_interval(mb)
            rec["interval"] = [_jnum(lo), _jnum(hi)]
            rec["share_undefined"] = float(np.mean(np.isinf(mb)))
        per_run.append(rec)
    fr = {}
    for g in fitted:
        if g.name == "token":
            continue
        p = lin_main[g.name]
        n_opt, d_opt, l_opt = frontier(p, grid, cost[g.name], fm)
        need = compute_to_reach(tok, l_opt, cost["token"], fm)
        mult = need / grid
        with np.errstate(invalid="ignore"):
            n_tok, d_tok, _ = frontier(
                tok, np.where(np.isfinite(need), need, np.nan), cost["token"], fm
            )
        token_group = next(t for t in fitted if t.name == "token")
        inside = _inside(g, n_opt, d_opt) & _inside(token_group, n_tok, d_tok)
        rec = {
            "multiplier": [_jnum(v) for v in mult],
            "tokens_per_param": [_jnum(v) for v in d_opt / n_opt],
            "inside_data": [bool(v) for v in inside],
        }
        if bootstrap:
            _, _, lb = frontier(lin_boot[g.name][:, None, :], grid[None, :], cost[g.name], fm)
            nb = compute_to_reach(tok_boot[:, None, :], lb, cost["token"], fm)
            lo, hi = percentile_interval(nb / grid[None, :])
            rec["interval"] = [[_jnum(a), _jnum(b)] for a, b in zip(lo, hi)]
        fr[g.name] = rec
    return {"per_run": per_run, "frontier": fr}


# ------------------------------------------------------------------------- output


def dumps_fit(obj: object) -> str:
    """JSON with sorted keys; lists of numbers on one line (deterministic, diff-friendly)."""

    def enc(o: object, indent: int) -> str:
        pad = "  " * (indent + 1)
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{pad}{json.dumps(str(k))}: {enc(o[k], indent + 1)}" for k in sorted(o)]
            return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
        if isinstance(o, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in o):
                return "[" + ", ".join(json.dumps(v, allow_nan=False) for v in o) + "]"
            items = [pad + enc(v, indent + 1) for v in o]
            return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
        return json.dumps(o, allow_nan=False)

    return enc(obj, 0) + "\n"


def write_fit(fit: dict, path: str) -> None:
    """Write fit.json atomically."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(dumps_fit(fit))
    os.replace(tmp, path)


def load_fit(study_dir: str, path: str | None = None, check_results: bool = True) -> dict:
    """Read fit.json; refuse one whose results file has changed since the fit."""
    path = path or os.path.join(study_dir, "fit.json")
    if not os.path.isfile(path):
        raise StudyInputError(f"{path}: no fit; run `megapatch study fit {study_dir}` first")
    try:
        with open(path, encoding="utf-8") as fh:
            fit = json.load(fh)
    except json.JSONDecodeError as exc:
        raise StudyInputError(
            f"{path}: not valid JSON ({exc}); re-run megapatch study fit"
        ) from None
    if fit.get("format") != FIT_FORMAT:
        raise StudyInputError(f"{path}: format {fit.get('format')!r}, expected {FIT_FORMAT}")
    if check_results:
        res = os.path.join(study_dir, fit["input"]["file"])
        if os.path.isfile(res) and _file_sha256(res) != fit["input"]["sha256"]:
            raise StudyInputError(
                f"{res} changed since {path} was fitted; re-run `megapatch study fit {study_dir}`"
            )
    return fit


def _fmt(x: object, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}"


def fit_summary(fit: dict) -> str:
    """Plain-text summary of a fit (printed by ``megapatch study fit``)."""
    lines = []
    inp = fit["input"]
    left = ", ".join(f"{len(v)} {k}" for k, v in inp["left_out"].items()) or "none"
    lines.append(
        f"{inp['file']}: {inp['rows']} rows, {inp['finished']} finished, "
        f"{inp['fitted_runs']} fitted; left out: {left}"
    )
    lines.extend(f"note: {n}" for n in fit["notes"])
    header = f"{'method':<24}{'runs':>5}  " + "  ".join(f"{k:>24}" for k in PARAM_NAMES)
    lines.append(header)
    for nm, m in fit["methods"].items():
        cells = []
        for k in PARAM_NAMES:
            v = m["params"][k]
            if m["intervals"]:
                lo, hi = m["intervals"][k]
                cells.append(f"{_fmt(v)} [{_fmt(lo, 3)},{_fmt(hi, 3)}]".rjust(24))
            else:
                cells.append(_fmt(v).rjust(24))
        lines.append(f"{nm:<24}{m['n_runs']:>5}  " + "  ".join(cells))
    for nm, m in fit["methods"].items():
        xc = m["cross_check"]
        worst = max(v for v in xc["relative_difference"].values() if v is not None)
        lines.append(
            f"cross-check {nm}: predicted losses within "
            f"{100 * xc['max_relative_loss_difference']:.3g}%, "
            f"largest parameter difference {100 * worst:.3g}%"
        )
    for nm, why in fit["skipped_methods"].items():
        lines.append(f"not fitted: {nm}: {why}")
    grid = fit["compute_grid"]
    for nm, fr in fit["multiplier"]["frontier"].items():
        picks = sorted({0, len(grid) // 2, len(grid) - 1})
        parts = []
        for i in picks:
            txt = _fmt(fr["multiplier"][i], 3) + ("" if fr["inside_data"][i] else "†")
            if "interval" in fr:
                lo, hi = fr["interval"][i]
                txt += f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
            parts.append(f"C={grid[i]:.2e}: {txt}")
        lines.append(f"frontier multiplier {nm}: " + "; ".join(parts))
    if any(not all(fr["inside_data"]) for fr in fit["multiplier"]["frontier"].values()):
        lines.append("† optimal N or D beyond the fitted runs: an extrapolation of the laws")
    return "\n".join(lines)


def run_fit_command(args: object) -> int:
    """``megapatch study fit DIR``."""
    fit = fit_study(
        args.dir,  # type: ignore[attr-defined]
        shared_e=args.shared_e,  # type: ignore[attr-defined]
        bootstrap=args.bootstrap,  # type: ignore[attr-defined]
        seed=args.seed,  # type: ignore[attr-defined]
        params_column=args.params_column,  # type: ignore[attr-defined]
        methods=args.method,  # type: ignore[attr-defined]
    )
    out = args.output or os.path.join(args.dir, "fit.json")  # type: ignore[attr-defined]
    write_fit(fit, out)
    print(fit_summary(fit))
    print(f"wrote {out}")
    return 0
