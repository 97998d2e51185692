"""``megapatch study recommend DIR --flops C [--max-tokens D]``: the best (N, K, lambda) for C.

For every fitted method (token level, each patch (K, lambda) group) the compute-optimal model
size N* and token count D* at compute C follow in closed form from its fitted law and compute
model ``C = rho * kappa * N^c * D`` (see megapatch.study.fit). With ``--max-tokens`` a method
whose optimum needs more tokens trains on exactly that many, with the model size the budget then
allows (along the fixed-C line the loss has one minimum, so the boundary is the constrained
optimum). The predicted loss comes with a 95% bootstrap interval (the resampled laws evaluated at
the same N, D), and P(best) is the share of bootstrap resamples in which the method has the
lowest loss at its recommended point. A warning is printed when C, N or D lie more than 10x
beyond the method's fitted runs.
"""

from __future__ import annotations

import json
import math

import numpy as np

from megapatch.study.fit import (
    PARAM_NAMES,
    FlopsModel,
    StudyInputError,
    compute_to_reach,
    frontier,
    law_loss,
    load_fit,
    percentile_interval,
    to_linear,
)

EXTRAPOLATION_FACTOR = 10.0


def _params(m: dict) -> np.ndarray:
    return np.array([m["params"][k] for k in PARAM_NAMES])


def _outside(value: float, lo: float, hi: float) -> float:
    """How many times ``value`` lies beyond [lo, hi] (1 inside)."""
    return max(value / hi, lo / value, 1.0)


def recommend(fit: dict, flops: float, max_tokens: float | None = None) -> dict:
    """Recommended (N, D) per fitted method at compute ``flops``, best first."""
    if not (flops > 0 and math.isfinite(flops)):
        raise StudyInputError(f"--flops must be a finite number > 0, got {flops!r}")
    if max_tokens is not None and not (max_tokens > 0 and math.isfinite(max_tokens)):
        raise StudyInputError(f"--max-tokens must be a finite number > 0, got {max_tokens!r}")
    fmj = fit["flops_model"]
    fm = FlopsModel(fmj["kappa"], fmj["exponent"], tuple(tuple(p) for p in fmj["points"]))
    token = fit["methods"]["token"]
    rows = []
    boot_losses = []
    for name in sorted(fit["methods"], key=lambda n: (n != "token", n)):
        m = fit["methods"][name]
        p = _params(m)
        n_opt, d_opt, l_opt = (
            float(v) for v in frontier(p, np.float64(flops), m["cost_ratio"], fm)
        )
        warnings = []
        if not math.isfinite(l_opt):
            warnings.append("an exponent of the fit is 0: no compute-optimal model size")
            rows.append({"method": name, "label": m["label"], "loss": None, "warnings": warnings})
            boot_losses.append(None)
            continue
        constrained = max_tokens is not None and d_opt > max_tokens
        if constrained:
            d_opt = float(max_tokens)
            n_opt = float((flops / (m["cost_ratio"] * fm.kappa * d_opt)) ** (1.0 / fm.c))
            l_opt = float(law_loss(p, n_opt, d_opt))
        interval = None
        samples = m["bootstrap"]["samples"]
        if samples:
            lb = law_loss(to_linear(np.array(samples)), n_opt, d_opt)
            lo, hi = percentile_interval(lb)
            interval = [float(lo), float(hi)]
            boot_losses.append(lb)
        else:
            boot_losses.append(None)
        rng = m["data_range"]
        for what, value, (lo, hi) in (
            ("C", flops, rng["C"]),
            ("N", n_opt, rng["N"]),
            ("D", d_opt, rng["D"]),
        ):
            factor = _outside(value, lo, hi)
            if factor > EXTRAPOLATION_FACTOR:
                warnings.append(
                    f"{what} = {value:.3g} is {factor:.0f}x beyond the fitted runs "
                    f"({lo:.3g} to {hi:.3g}): extrapolation"
                )
        multiplier = None
        if name != "token":
            need = float(compute_to_reach(_params(token), l_opt, token["cost_ratio"], fm))
            multiplier = need / flops
        rows.append(
            {
                "method": name,
                "label": m["label"],
                "K": m["K"],
                "lam": m["lam"],
                "patch_context": m["patch_context"],
                "N": n_opt,
                "D": d_opt,
                "D_patch": d_opt * m["lam_trained_mean"],
                "tokens_per_param": d_opt / n_opt,
                "loss": l_opt,
                "interval": interval,
                "constrained_by_max_tokens": constrained,
                "multiplier_vs_token": multiplier,
                "warnings": warnings,
            }
        )
    ok = [i for i, b in enumerate(boot_losses) if b is not None]
    if ok and all(b is not None for b in boot_losses):
        stack = np.stack([boot_losses[i] for i in ok])  # [methods, B]
        wins = np.bincount(np.argmin(stack, axis=0), minlength=len(ok)) / stack.shape[1]
        for j, i in enumerate(ok):
            rows[i]["p_best"] = float(wins[j])
    rows.sort(key=lambda r: (r["loss"] is None, r["loss"] if r["loss"] is not None else 0.0))
    return {
        "flops": flops,
        "max_tokens": max_tokens,
        "params_column": fit["settings"]["params_column"],
        "methods": rows,
        "best": rows[0] if rows and rows[0]["loss"] is not None else None,
    }


def _g(x: object, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}"


def format_recommendation(rec: dict) -> str:
    """The table and the best choice, as printed."""
    lines = [
        f"compute budget C = {rec['flops']:.4g} FLOPs"
        + (f", at most {rec['max_tokens']:.4g} tokens" if rec["max_tokens"] else "")
        + f"; N counts {rec['params_column']}"
    ]
    lines.append(
        f"{'method':<28}{'N':>11}{'D':>11}{'D/N':>10}  {'loss [95% interval]':<26}"
        f"{'P(best)':>8}{'x token':>9}"
    )
    for r in rec["methods"]:
        if r["loss"] is None:
            lines.append(f"{r['label']:<28}  no recommendation ({'; '.join(r['warnings'])})")
            continue
        iv = f" [{r['interval'][0]:.4g}, {r['interval'][1]:.4g}]" if r["interval"] else ""
        tag = " (max tokens)" if r["constrained_by_max_tokens"] else ""
        loss_txt = f"{r['loss']:.4f}{iv}"
        lines.append(
            f"{r['label'] + tag:<28}{r['N']:>11.3e}{r['D']:>11.3e}{r['tokens_per_param']:>10.3g}  "
            f"{loss_txt:<26}"
            f"{_g(r.get('p_best'), 3):>8}{_g(r['multiplier_vs_token'], 3):>9}"
        )
    best = rec["best"]
    if best is not None:
        if best["K"] > 1:
            stages = (
                f"; the first {best['D_patch']:.3g} tokens (λ={best['lam']:g}) at patch level "
                f"K={best['K']}, the remaining {best['D'] - best['D_patch']:.3g} at token level"
            )
        else:
            stages = "; token level throughout"
        iv = f" [{best['interval'][0]:.4g}, {best['interval'][1]:.4g}]" if best["interval"] else ""
        if best["warnings"]:
            iv += " (an extrapolation: see the warnings)"
        lines.append(
            f"best: {best['label']}: N = {best['N']:.3g} parameters, D = {best['D']:.3g} "
            f"tokens{stages}; predicted loss {best['loss']:.4f}{iv}"
        )
    for r in rec["methods"]:
        for w in r["warnings"]:
            lines.append(f"warning: {r['label']}: {w}")
    return "\n".join(lines)


def run_recommend_command(args: object) -> int:
    """``megapatch study recommend DIR --flops C``."""
    fit = load_fit(args.dir, args.fit)  # type: ignore[attr-defined]
    rec = recommend(fit, args.flops, args.max_tokens)  # type: ignore[attr-defined]
    if args.json:  # type: ignore[attr-defined]
        print(json.dumps(rec, indent=2, sort_keys=True))
    else:
        print(format_recommendation(rec))
    return 0
