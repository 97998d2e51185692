"""``megapatch study report DIR``: DIR/report.md and PNG plots under DIR/plots/ from DIR/fit.json.

Contents: the runs used and left out; the fitted parameters with bootstrap intervals and the
cross-check's agreement; the compute multiplier of each patch method along the compute-optimal
frontier and per run; a held-out check (each method refitted without its largest compute budgets,
which it then predicts); run-to-run noise from repeated seeds; the loss at the (N, D) cells where
the study varies lambda or K. Plots: loss vs compute (runs, fitted frontiers with bands, one
curve per model size), isoFLOP slices, multiplier vs compute and vs tokens per parameter, lambda
and K curves, residuals.

Deterministic: the same fit.json and results give a byte-identical report.md and PNGs (Agg
backend, no date or software metadata in the PNGs).
"""

from __future__ import annotations

import math
import os

import numpy as np

from megapatch.study.fit import (
    ANY,
    PARAM_NAMES,
    FlopsModel,
    Group,
    Run,
    Study,
    StudyInputError,
    cross_check,
    fit_law,
    fit_requirement,
    frontier,
    law_loss,
    load_fit,
    load_study,
    single_thread_blas,
    to_log,
)

PLOT_NAMES = ("loss_vs_compute", "isoflop", "multiplier", "lambda_k", "residuals")
HOLDOUT_SHARE = 0.15  # hold out the largest budgets until at least this share of runs
BUDGET_GAP = 1.1  # runs within 10% of each other's FLOPs form one budget


# ----------------------------------------------------------------------------- helpers


def _g(x: object, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    x = float(x)
    if math.isinf(x):
        return ANY if x > 0 else "–"
    if math.isnan(x):
        return "–"
    return f"{x:.{digits}g}"


def _interval(iv: list | None, digits: int = 3) -> str:
    if not iv:
        return ""
    return f"[{_g(iv[0], digits)}, {_g(iv[1], digits)}]"


def _num(x: object) -> float:
    """A fit.json number as float: "> any" is +inf, null is NaN."""
    if x is None:
        return float("nan")
    if isinstance(x, str):
        return float("inf")
    return float(x)


def budgets(flops: list[float]) -> list[list[int]]:
    """Indices of runs grouped into compute budgets (sorted FLOPs within 10% of the previous)."""
    order = sorted(range(len(flops)), key=lambda i: (flops[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and flops[i] <= flops[out[-1][-1]] * BUDGET_GAP:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def method_names(fit: dict) -> list[str]:
    """Fitted methods, token level first (fit.json stores keys sorted)."""
    return sorted(fit["methods"], key=lambda n: (n != "token", n))


def _method_params(fit: dict, name: str) -> np.ndarray:
    p = fit["methods"][name]["params"]
    return np.array([p[k] for k in PARAM_NAMES])


def _flops_model(fit: dict) -> FlopsModel:
    fm = fit["flops_model"]
    return FlopsModel(fm["kappa"], fm["exponent"], tuple(tuple(p) for p in fm["points"]))


# ------------------------------------------------------------------------- analyses


def holdout_check(group: Group) -> dict:
    """Refit ``group`` without its largest compute budgets; predict them."""
    runs = group.runs
    bud = budgets([r.flops for r in runs])
    held: list[int] = []
    while bud and len(held) < max(1, math.ceil(HOLDOUT_SHARE * len(runs))):
        held = bud.pop() + held
    train = [runs[i] for i in range(len(runs)) if i not in set(held)]
    probe = Group(group.name, group.label, group.K, group.lam_key, group.patch_context, train)
    reason = fit_requirement(probe, shared_e=False)
    if reason is not None:
        return {"method": group.name, "skipped": f"without the largest budgets: {reason}"}
    n = np.array([r.N for r in train])
    d = np.array([r.D for r in train])
    loss = np.array([r.loss for r in train])
    xc = cross_check(n, d, loss)
    extra = [to_log(xc)] if np.all(xc[[0, 1, 3]] > 0) else []
    lf = fit_law(n, d, loss, extra_starts=extra)
    rows = []
    for i in sorted(held, key=lambda j: (runs[j].flops, runs[j].run_id)):
        r = runs[i]
        pred = float(law_loss(lf.params, r.N, r.D))
        rows.append(
            {
                "run_id": r.run_id,
                "N": r.N,
                "D": r.D,
                "flops": r.flops,
                "loss": r.loss,
                "predicted": pred,
                "rel_error": (pred - r.loss) / r.loss,
            }
        )
    errs = np.abs([row["rel_error"] for row in rows])
    return {
        "method": group.name,
        "n_train": len(train),
        "max_train_flops": max(r.flops for r in train),
        "rows": rows,
        "mean_abs_rel_error": float(np.mean(errs)),
        "max_abs_rel_error": float(np.max(errs)),
    }


def seed_noise(study: Study) -> list[dict]:
    """Spread of the final loss over runs that repeat one (method, N, D) cell with other seeds."""
    cells: dict[tuple, list[Run]] = {}
    for r in study.runs:
        cells.setdefault((r.group, r.N, r.D), []).append(r)
    out = []
    for (grp, n, d), runs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        if len(runs) < 2 or len({r.seed for r in runs}) < 2:
            continue
        losses = np.array([r.loss for r in runs])
        out.append(
            {
                "method": grp,
                "N": n,
                "D": d,
                "n": len(runs),
                "mean": float(losses.mean()),
                "std": float(losses.std(ddof=1)),
                "log_std": float(np.log(losses).std(ddof=1)),
            }
        )
    return out


def pooled_log_std(noise: list[dict]) -> float | None:
    """Pooled standard deviation of log loss over the repeated cells."""
    dof = sum(c["n"] - 1 for c in noise)
    if not dof:
        return None
    return math.sqrt(sum((c["n"] - 1) * c["log_std"] ** 2 for c in noise) / dof)


def variation_cells(study: Study) -> tuple[list[dict], list[dict]]:
    """(N, D) cells where the study varies lambda (at one K) or K (at one lambda).

    Each cell: N, D and points (K or lambda, mean loss, std over seeds, runs); token runs of the
    cell are the lambda=0 point of every lambda curve and the K=1 point of every K curve.
    """
    by_cell: dict[tuple, list[Run]] = {}
    for r in study.runs:
        by_cell.setdefault((r.N, r.D), []).append(r)
    lam_curves, k_curves = [], []
    for (n, d), runs in sorted(by_cell.items()):
        token = [r for r in runs if r.K == 1]
        patch = [r for r in runs if r.K > 1]
        for k in sorted({r.K for r in patch}):
            sel = [r for r in patch if r.K == k]
            keys = sorted({study.groups[r.group].lam_key for r in sel})
            if len(keys) + (1 if token else 0) >= 3 and len(keys) >= 2:
                pts = [_point(0.0, token)] if token else []
                pts += [
                    _point(lk, [r for r in sel if study.groups[r.group].lam_key == lk])
                    for lk in keys
                ]
                lam_curves.append({"N": n, "D": d, "K": k, "points": pts})
        for lk in sorted({study.groups[r.group].lam_key for r in patch}):
            sel = [r for r in patch if study.groups[r.group].lam_key == lk]
            ks = sorted({r.K for r in sel})
            if len(ks) + (1 if token else 0) >= 3 and len(ks) >= 2:
                pts = [_point(1, token)] if token else []
                pts += [_point(k, [r for r in sel if r.K == k]) for k in ks]
                k_curves.append({"N": n, "D": d, "lam": lk, "points": pts})
    return lam_curves, k_curves


def _point(x: float, runs: list[Run]) -> dict:
    losses = np.array([r.loss for r in runs])
    return {
        "x": x,
        "loss": float(losses.mean()),
        "std": float(losses.std(ddof=1)) if len(runs) > 1 else None,
        "runs": len(runs),
    }


def isoflop_budgets(study: Study, fit: dict) -> list[tuple[float, list[Run]]]:
    """Budgets with runs at >= 3 model sizes (the study's isoFLOP slices), else 3 spread budgets."""
    runs = study.runs
    out = []
    for idx in budgets([r.flops for r in runs]):
        sel = [runs[i] for i in idx]
        if len({r.N for r in sel}) >= 3:
            out.append((float(np.exp(np.mean(np.log([r.flops for r in sel])))), sel))
    if not out:
        lo = min(r.flops for r in runs)
        hi = max(r.flops for r in runs)
        out = [(float(c), []) for c in np.geomspace(lo, hi, 3)]
    if len(out) > 4:
        pick = np.unique(np.round(np.linspace(0, len(out) - 1, 4)).astype(int))
        out = [out[i] for i in pick]
    return out


# ---------------------------------------------------------------------------- plots


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "megapatch", "figure.dpi": 100})
    return plt


def _save(fig: object, path: str) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None})  # type: ignore[attr-defined]
    _plt().close(fig)


def _colors(fit: dict) -> dict[str, str]:
    cycle = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    names = method_names(fit) + sorted(fit["skipped_methods"])
    return {n: ("black" if n == "token" else cycle[i % len(cycle)]) for i, n in enumerate(names)}


def plot_loss_vs_compute(fit: dict, study: Study, path: str) -> None:
    plt = _plt()
    col = _colors(fit)
    grid = np.array(fit["compute_grid"])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for nm, m in ((n, fit["methods"][n]) for n in method_names(fit)):
        p = _method_params(fit, nm)
        fr = m["frontier"]
        loss = np.array([_num(v) for v in fr["loss"]])
        ax.plot(grid, loss, color=col[nm], lw=1, ls="--")
        ax.plot(
            grid, np.where(fr["inside_data"], loss, np.nan), color=col[nm], lw=2, label=m["label"]
        )
        if "loss_interval" in fr:
            lo = [_num(a) for a, _ in fr["loss_interval"]]
            hi = [_num(b) for _, b in fr["loss_interval"]]
            ax.fill_between(grid, lo, hi, color=col[nm], alpha=0.15, lw=0)
        group = study.groups[nm]
        for n in sorted({r.N for r in group.runs}):
            f1 = float(np.median([r.f1 for r in group.runs if r.N == n]))
            d = grid / (m["cost_ratio"] * f1)
            ax.plot(grid, law_loss(p, n, d), color=col[nm], lw=0.6, alpha=0.35)
    for nm, group in study.groups.items():
        ax.scatter(
            [r.flops for r in group.runs],
            [r.loss for r in group.runs],
            s=14,
            color=col.get(nm, "grey"),
            marker="o" if nm in fit["methods"] else "x",
            label=None if nm in fit["methods"] else f"{group.label} (not fitted)",
            zorder=3,
        )
    losses = [r.loss for r in study.runs]
    ax.set_ylim(min(losses) * 0.9, max(losses) * 1.1)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final validation loss (token level)")
    ax.set_title(
        "Loss vs compute: runs; frontiers with 95% bands (dashed: optimal N, D beyond the "
        "runs); thin: one line per N",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_isoflop(fit: dict, study: Study, path: str) -> None:
    plt = _plt()
    col = _colors(fit)
    fm = _flops_model(fit)
    slices = isoflop_budgets(study, fit)
    fig, axes = plt.subplots(
        1, len(slices), figsize=(max(8.0, 4.2 * len(slices)), 4.4), squeeze=False
    )
    n_all = [r.N for r in study.runs]
    n_axis = np.geomspace(min(n_all) / 3, max(n_all) * 3, 200)
    for ax, (c, runs) in zip(axes[0], slices):
        for nm, m in ((n, fit["methods"][n]) for n in method_names(fit)):
            p = _method_params(fit, nm)
            d = c / (m["cost_ratio"] * fm.f1(n_axis))
            ax.plot(n_axis, law_loss(p, n_axis, d), color=col[nm], label=m["label"])
            n_opt, _, l_opt = frontier(p, np.float64(c), m["cost_ratio"], fm)
            ax.scatter([float(n_opt)], [float(l_opt)], color=col[nm], marker="*", s=60, zorder=4)
        for r in runs:
            ax.scatter([r.N], [r.loss], color=col.get(r.group, "grey"), s=16, zorder=3)
        sel = [r.loss for r in runs] or [
            float(law_loss(_method_params(fit, "token"), n, c / fm.f1(n))) for n in n_all
        ]
        ax.set_ylim(min(sel) * 0.95, max(sel) * 1.08)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_title(f"C = {c:.3g} FLOPs" + ("" if runs else " (no runs)"), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("validation loss")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("isoFLOP slices: fitted loss vs N at fixed compute (stars: optimum)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_multiplier(fit: dict, study: Study, path: str) -> None:
    plt = _plt()
    col = _colors(fit)
    grid = np.array(fit["compute_grid"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    c_lo = min(r.flops for g in fit["methods"] for r in study.groups[g].runs)
    c_hi = max(r.flops for g in fit["methods"] for r in study.groups[g].runs)
    finite = [1.0]
    per_run = fit["multiplier"]["per_run"]
    for rec in per_run:
        if not isinstance(rec["multiplier"], str) and rec["multiplier"] is not None:
            finite.append(rec["multiplier"])
    for nm, fr in fit["multiplier"]["frontier"].items():
        mult = np.array([_num(v) for v in fr["multiplier"]])
        inside = np.array(fr["inside_data"]) & (grid >= c_lo) & (grid <= c_hi)
        finite += [v for v in mult[inside] if np.isfinite(v)]
        ins = np.array(fr["inside_data"])
        ax1.plot(grid, mult, color=col[nm], lw=1, ls="--")
        ax1.plot(
            grid,
            np.where(ins, mult, np.nan),
            color=col[nm],
            lw=2,
            label=f"{fit['methods'][nm]['label']} frontier (dashed: N*, D* beyond the runs)",
        )
        if "interval" in fr:
            lo = np.array([_num(a) for a, _ in fr["interval"]])
            hi = np.array([_num(b) for _, b in fr["interval"]])
            ax1.fill_between(
                grid,
                np.where(ins, lo, np.nan),
                np.where(ins, np.minimum(hi, 1e6), np.nan),
                color=col[nm],
                alpha=0.15,
                lw=0,
            )
        tpp = np.array([_num(v) for v in fr["tokens_per_param"]])
        ax2.plot(tpp[inside], mult[inside], color=col[nm], lw=2, label=f"{nm} frontier")
    top = max(finite) * 1.5
    points: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for rec in per_run:
        m = _num(rec["multiplier"])
        y, marker = (top, "^") if not np.isfinite(m) else (m, "o")
        key = (col.get(rec["method"], "grey"), marker)
        points.setdefault(key, []).append((rec["flops"], rec["tokens_per_param"], y))
    for (c, marker), pts in sorted(points.items()):
        xs, tpp, ys = zip(*pts)
        ax1.scatter(xs, ys, color=c, marker=marker, s=14, zorder=3)
        ax2.scatter(tpp, ys, color=c, marker=marker, s=14, zorder=3)
    for ax in (ax1, ax2):
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_ylim(0, top * 1.05)
        ax.set_ylabel("compute multiplier vs token level")
        ax.grid(True, which="major", alpha=0.3)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax2.xaxis.set_major_formatter(ScalarFormatter())
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax1.axvspan(grid[0], c_lo, color="grey", alpha=0.08, lw=0)
    ax1.axvspan(c_hi, grid[-1], color="grey", alpha=0.08, lw=0)
    ax1.set_xlabel("compute C (FLOPs); shaded: outside the fitted runs")
    ax2.set_xlabel("tokens per parameter D/N")
    ax1.set_title("multiplier vs compute (dots: runs; ^: > any)", fontsize=9)
    ax2.set_title("multiplier vs tokens per parameter", fontsize=9)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_lambda_k(lam_curves: list[dict], k_curves: list[dict], path: str) -> None:
    plt = _plt()
    panels = [("λ", c) for c in lam_curves[:3]] + [("K", c) for c in k_curves[:3]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (kind, cell) in zip(axes[0], panels):
        xs = [p["x"] for p in cell["points"]]
        ys = [p["loss"] for p in cell["points"]]
        es = [p["std"] or 0.0 for p in cell["points"]]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3)
        what = f"K={cell['K']}" if kind == "λ" else f"λ={cell['lam']:g}"
        ax.set_title(f"N={cell['N']:.3g}, D={cell['D']:.3g}, {what}", fontsize=9)
        ax.set_xlabel("λ (0 = token level)" if kind == "λ" else "K (1 = token level)")
        if kind == "K":
            ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("validation loss (mean over seeds)")
    fig.tight_layout()
    _save(fig, path)


def plot_residuals(fit: dict, study: Study, path: str) -> None:
    plt = _plt()
    col = _colors(fit)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for nm, m in ((n, fit["methods"][n]) for n in method_names(fit)):
        runs = {r.run_id: r for r in study.groups[nm].runs}
        ids = sorted(m["residuals"])
        res = [m["residuals"][i] for i in ids]
        ax1.scatter([runs[i].N for i in ids], res, color=col[nm], s=12, label=m["label"])
        ax2.scatter([runs[i].D for i in ids], res, color=col[nm], s=12)
    for ax, lab in ((ax1, "parameters N"), (ax2, "tokens D")):
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(lab)
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("log L_observed − log L_fitted")
    ax1.legend(fontsize=7)
    fig.suptitle("residuals of the fits")
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- report


def _param_table(fit: dict) -> list[str]:
    lines = [
        "| method | runs | E | A | α | B | β |",
        "|---|---:|---|---|---|---|---|",
    ]
    for m in (fit["methods"][n] for n in method_names(fit)):
        cells = []
        for k in PARAM_NAMES:
            iv = _interval(m["intervals"][k]) if m["intervals"] else ""
            cells.append(f"{_g(m['params'][k])} {iv}".strip())
        lines.append(f"| {m['label']} | {m['n_runs']} | " + " | ".join(cells) + " |")
    return lines


def build_report(study_dir: str, fit_path: str | None = None) -> tuple[str, list[str]]:
    """Write the plots; return the report text and the plot files written."""
    fit = load_fit(study_dir, fit_path)
    study = load_study(study_dir, fit["settings"]["params_column"])
    missing = [nm for nm in fit["methods"] if nm not in study.groups]
    if missing:
        raise StudyInputError(
            f"fit.json has method(s) {', '.join(missing)} that the results no longer contain; "
            f"re-run `megapatch study fit {study_dir}`"
        )
    plots_dir = os.path.join(study_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    lam_curves, k_curves = variation_cells(study)
    written = []

    def plot(name: str, func: object, *args: object) -> None:
        path = os.path.join(plots_dir, f"{name}.png")
        func(*args, path)  # type: ignore[operator]
        written.append(path)

    plot("loss_vs_compute", plot_loss_vs_compute, fit, study)
    plot("isoflop", plot_isoflop, fit, study)
    if fit["multiplier"]["frontier"] or fit["multiplier"]["per_run"]:
        plot("multiplier", plot_multiplier, fit, study)
    if lam_curves or k_curves:
        plot("lambda_k", plot_lambda_k, lam_curves, k_curves)
    plot("residuals", plot_residuals, fit, study)
    for name in PLOT_NAMES:  # a plot not made this time must not linger from an older report
        path = os.path.join(plots_dir, f"{name}.png")
        if path not in written and os.path.exists(path):
            os.remove(path)

    inp, st = fit["input"], fit["settings"]
    out: list[str] = [f"# Scaling study report: {os.path.basename(os.path.abspath(study_dir))}", ""]
    out.append("## Runs")
    out.append("")
    left = "; ".join(f"{len(v)} {k} ({', '.join(v)})" for k, v in inp["left_out"].items())
    out.append(
        f"- `{inp['file']}` (sha256 `{inp['sha256'][:16]}…`): {inp['rows']} rows, "
        f"{inp['finished']} finished, **{inp['fitted_runs']} runs used in the fits**."
    )
    out.append(f"- Left out (not finished): {left or 'none'}.")
    for nm, why in fit["skipped_methods"].items():
        label = study.groups[nm].label if nm in study.groups else nm
        out.append(f"- Not fitted: {label} (`{nm}`): {why}.")
    for note in fit["notes"]:
        out.append(f"- Note: {note}.")
    out.append(
        f"- N is the `{st['params_column']}` column; L is the final token-level validation loss."
    )
    out.append("")
    out.append("## Fitted laws: L(N, D) = E + A/N^α + B/D^β")
    out.append("")
    boot = st["bootstrap"]
    out.append(
        f"Huber loss (δ = {st['huber_delta']:g}) on log loss, summed over runs; L-BFGS-B; "
        f"{st['starts']}. "
        + ("One E shared by all methods (joint fit). " if st["shared_e"] else "")
        + (
            f"Brackets: 95% percentile intervals from {boot} bootstrap resamples of the runs "
            f"(seed {st['seed']})."
            if boot
            else "No bootstrap (--bootstrap 0): no intervals."
        )
    )
    out.append("")
    out.extend(_param_table(fit))
    out.append("")
    out.append("Cross-check (variable projection: (α, β) searched, E, A, B ≥ 0 by NNLS):")
    out.append("")
    out.append("| method | E | A | α | B | β | largest relative loss difference |")
    out.append("|---|---|---|---|---|---|---:|")
    for m in (fit["methods"][n] for n in method_names(fit)):
        xc = m["cross_check"]
        cells = " | ".join(_g(xc["params"][k]) for k in PARAM_NAMES)
        out.append(f"| {m['label']} | {cells} | {100 * xc['max_relative_loss_difference']:.3g}% |")
    out.append("")
    for m in (fit["methods"][n] for n in method_names(fit)):
        diff = m["cross_check"]["max_relative_loss_difference"]
        res = list(m["residuals"].values())
        rms = math.sqrt(sum(v * v for v in res) / len(res))
        verdict = (
            "they agree within the scatter of the runs"
            if diff <= max(2 * rms, 1e-3)
            else "**they disagree by more than twice the scatter: treat the parameters with care**"
        )
        out.append(
            f"- {m['label']}: predicted losses of the runs differ by at most {100 * diff:.3g}%; "
            f"the runs scatter around the fit by {100 * rms:.3g}% (RMS): {verdict}."
        )
    out.append("")
    out.append(
        "Parameters can differ much more than predictions along the badly conditioned "
        "directions (A with α, B with β); the intervals show how much."
    )
    for m in (fit["methods"][n] for n in method_names(fit)):
        if m["bootstrap"]["not_converged"]:
            out.append(
                f"- {m['label']}: {m['bootstrap']['not_converged']} bootstrap fits did not "
                "report convergence (kept)."
            )
    out.append("")
    out.append("![loss vs compute](plots/loss_vs_compute.png)")
    out.append("")
    out.append("![isoFLOP slices](plots/isoflop.png)")
    out.append("")
    out.append("![residuals](plots/residuals.png)")
    out.append("")

    out.extend(_multiplier_section(fit))
    out.extend(_holdout_section(fit, study))
    out.extend(_noise_section(fit, study))
    out.extend(_variation_section(lam_curves, k_curves))
    out.append("## How the numbers are computed")
    out.append("")
    out.append(
        "- FLOPs per token at K=1 of each run's model (f1): from a token run of the same model "
        "(its flops/D), else flops/(D_token + D_patch/K) (exact for the KT patch context), else "
        "6N for rows without flops. Across models f1 ≈ "
        f"{fit['flops_model']['kappa']:.4g}·N^{fit['flops_model']['exponent']:.4f} "
        "(least squares in logs), used for the frontiers."
    )
    out.append(
        "- Per-run multiplier: the token-level compute the token fit needs at the run's N to "
        "reach the run's loss, f1·D_tok, divided by the run's flops. Its interval carries the "
        "token fit's uncertainty only, not the run's own seed noise."
    )
    out.append(
        "- Frontier multiplier at C: the compute the token frontier needs to reach the patch "
        "frontier's loss at C, divided by C; each frontier minimises its law over N with "
        "C = (compute ratio)·f1(N)·D."
    )
    out.append(
        "- Held-out check: each method refitted (no bootstrap) without its largest compute "
        f"budgets (at least {100 * HOLDOUT_SHARE:.0f}% of its runs; runs within 10% in FLOPs "
        "form one budget), then asked for the held-out runs' losses."
    )
    out.append("")
    return "\n".join(out), written


def _multiplier_section(fit: dict) -> list[str]:
    out = ["## Compute multiplier of patch-level training", ""]
    fr_all = fit["multiplier"]["frontier"]
    per_run = fit["multiplier"]["per_run"]
    if not fr_all and not per_run:
        return out + ["No patch runs: no multiplier.", ""]
    grid = fit["compute_grid"]
    if fr_all:
        c_lo = min(m["data_range"]["C"][0] for m in fit["methods"].values())
        c_hi = max(m["data_range"]["C"][1] for m in fit["methods"].values())
        out.append(
            "Along the compute-optimal frontiers (> 1: patch-level training reaches the loss "
            "with less compute). * = C outside the fitted runs' compute; † = the optimal N or D "
            "of the patch frontier, or of the token frontier at the compute it needs, lies "
            "outside the fitted runs (an extrapolation of the laws):"
        )
        out.append("")
        names = list(fr_all)
        out.append(
            "| C (FLOPs) | "
            + " | ".join(f"{fit['methods'][n]['label']} | D/N" for n in names)
            + " |"
        )
        out.append("|---:|" + "---|---:|" * len(names))
        for i in range(0, len(grid), 4):
            c = grid[i]
            star = "" if c_lo <= c <= c_hi else "*"
            if not all(fr_all[n]["inside_data"][i] for n in names):
                star += "†"
            cells = []
            for n in names:
                fr = fr_all[n]
                iv = _interval(fr["interval"][i]) if "interval" in fr else ""
                cells.append(f"{_g(fr['multiplier'][i], 3)} {iv}".strip())
                cells.append(_g(fr["tokens_per_param"][i], 3))
            out.append(f"| {c:.3g}{star} | " + " | ".join(cells) + " |")
        out.append("")
        if not any(any(fr["inside_data"]) for fr in fr_all.values()):
            out.append(
                "**At no compute do the frontiers stay within the fitted runs' N and D: the "
                "frontier multiplier is an extrapolation throughout; the per-run multipliers "
                "below are the measured comparison.**"
            )
            out.append("")
    if per_run:
        out.append("Per run (the token law at the run's N asked for the run's loss):")
        out.append("")
        out.append("| run | method | N | D | D/N | loss | flops | multiplier | interval |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for rec in per_run:
            out.append(
                f"| {rec['run_id']} | {rec['method']} | {_g(rec['N'])} | {_g(rec['D'])} | "
                f"{_g(rec['tokens_per_param'], 3)} | {rec['loss']:.4f} | {_g(rec['flops'])} | "
                f"{_g(rec['multiplier'], 3)} | {_interval(rec.get('interval'))} |"
            )
        n_any = sum(isinstance(r["multiplier"], str) for r in per_run)
        if n_any:
            out.append("")
            out.append(
                f"{n_any} run(s) reach a loss below the token fit's asymptote at their N "
                f"(E + A/N^α): no token-level budget reaches it ({ANY})."
            )
        out.append("")
    out.append("![multiplier](plots/multiplier.png)")
    out.append("")
    return out


def _holdout_section(fit: dict, study: Study) -> list[str]:
    out = ["## Held-out check: fit the smaller budgets, predict the largest runs", ""]
    out.append("| method | run | N | D | flops | loss | predicted | error |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    summary = []
    for nm in method_names(fit):
        h = holdout_check(study.groups[nm])
        label = fit["methods"][nm]["label"]
        if "skipped" in h:
            summary.append(f"- {label}: not checked ({h['skipped']}).")
            continue
        for r in h["rows"]:
            out.append(
                f"| {label} | {r['run_id']} | {_g(r['N'])} | {_g(r['D'])} | {_g(r['flops'])} | "
                f"{r['loss']:.4f} | {r['predicted']:.4f} | {100 * r['rel_error']:+.2f}% |"
            )
        summary.append(
            f"- {label}: fitted on {h['n_train']} runs (up to {_g(h['max_train_flops'])} FLOPs), "
            f"{len(h['rows'])} held out: mean absolute error {100 * h['mean_abs_rel_error']:.2f}%, "
            f"largest {100 * h['max_abs_rel_error']:.2f}%."
        )
    return out + [""] + summary + [""]


def _noise_section(fit: dict, study: Study) -> list[str]:
    out = ["## Run-to-run noise (repeated seeds)", ""]
    noise = seed_noise(study)
    if not noise:
        return out + ["No (method, N, D) cell was run with more than one seed.", ""]
    out.append("| method | N | D | runs | mean loss | std | std of log loss |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for c in noise:
        out.append(
            f"| {c['method']} | {_g(c['N'])} | {_g(c['D'])} | {c['n']} | {c['mean']:.4f} | "
            f"{c['std']:.4f} | {c['log_std']:.4f} |"
        )
    pooled = pooled_log_std(noise)
    res = [v for m in fit["methods"].values() for v in m["residuals"].values()]
    rms = math.sqrt(sum(v * v for v in res) / len(res)) if res else float("nan")
    out.append("")
    out.append(
        f"Pooled seed-to-seed std of log loss: {pooled:.4f}; RMS residual of the fits: "
        f"{rms:.4f}"
        + (
            " (the fits explain the data down to the seed noise)."
            if rms <= 2 * pooled
            else " (residuals more than twice the seed-to-seed spread: the law misses structure "
            "in the data, or the few repeats underestimate the noise)."
        )
    )
    out.append("")
    return out


def _variation_section(lam_curves: list[dict], k_curves: list[dict]) -> list[str]:
    out = ["## λ and K at fixed (N, D)", ""]
    if not lam_curves and not k_curves:
        return out + ["The study varies neither λ nor K at a fixed (N, D).", ""]
    for kind, curves in (("λ", lam_curves), ("K", k_curves)):
        for c in curves:
            fixed = f"K={c['K']}" if kind == "λ" else f"λ={c['lam']:g}"
            pts = ", ".join(
                f"{kind}={p['x']:g}: {p['loss']:.4f}"
                + (f"±{p['std']:.4f}" if p["std"] is not None else "")
                for p in c["points"]
            )
            best = min(c["points"], key=lambda p: p["loss"])
            out.append(
                f"- N={_g(c['N'])}, D={_g(c['D'])}, {fixed}: {pts} — best {kind}={best['x']:g}"
            )
    out.append("")
    out.append("![lambda and K](plots/lambda_k.png)")
    out.append("")
    return out


def write_report(study_dir: str, fit_path: str | None = None) -> tuple[str, list[str]]:
    """Write DIR/report.md and the plots; return their paths."""
    with single_thread_blas():
        text, plots = build_report(study_dir, fit_path)
    path = os.path.join(study_dir, "report.md")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path, plots


def run_report_command(args: object) -> int:
    """``megapatch study report DIR``."""
    path, plots = write_report(args.dir, args.fit)  # type: ignore[attr-defined]
    print(f"wrote {path}")
    for p in plots:
        print(f"wrote {p}")
    return 0
