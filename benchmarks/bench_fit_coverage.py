"""Coverage of the study fit's 95% bootstrap intervals on synthetic studies with 1% noise.

Each trial draws a synthetic study from planted parameters (Hoffmann et al.'s E, A, alpha, B,
beta; 6 model sizes x 5 tokens-per-parameter ratios, FLOPs from megapatch's FLOP function):
token runs, and patch runs (K=4, lambda=1/2) whose loss is the token law at twice their compute,
both with 1% multiplicative noise. ``fit_study`` (the code behind ``megapatch study fit``) is run
with ``--bootstrap`` resamples and a per-trial seed, and the benchmark counts how often the
intervals contain the truth:

* each parameter of the token fit and of the patch fit (the patch law is the token law with
  B * (2 rho)^-beta, rho = lambda/K + 1 - lambda);
* the frontier multiplier (planted: 2) at the geometric middle of the fitted compute range;
* per-run multipliers of noiseless probe runs (patch runs exactly at twice their compute),
  evaluated with the trial's token bootstrap: their intervals carry the token fit's uncertainty.

Goal (issue): every parameter covered in >= 90% of 100 trials. Optionally (--grid-check N) the
first N trials also run L-BFGS-B from all 4500 Hoffmann grid starts and compare the optimum with
the screened starts used by the fit.

    python benchmarks/bench_fit_coverage.py                    # 100 trials x 1000 resamples
    python benchmarks/bench_fit_coverage.py --trials 20 --bootstrap 200 --jobs 2

Prints a table and writes benchmarks/results/fit_coverage.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K, LAM, MULT, NOISE = 4, 0.5, 2.0, 0.01


def trial(args: tuple) -> dict:
    """One synthetic study, fitted; what the intervals cover."""
    index, bootstrap, noise, grid_check = args
    import numpy as np

    from megapatch.study import fit as F
    from tests.study.test_fit import TRUE, architecture, make_rows, write_study

    t0 = time.process_time()
    rows = make_rows(
        noise=noise, seed=10_000 + index, patch=(K, LAM, MULT, "KT"), patch_noise=noise
    )
    with tempfile.TemporaryDirectory() as tmp:
        fit = F.fit_study(write_study(tmp, rows), bootstrap=bootstrap, seed=index)
    rho = LAM / K + 1 - LAM
    truth = {
        "token": TRUE,
        "patch_K4_lam0.5": dict(TRUE, B=TRUE["B"] * (MULT * rho) ** -TRUE["beta"]),
    }
    out: dict = {"trial": index, "params": {}, "estimates": {}}
    for name, true in truth.items():
        m = fit["methods"][name]
        out["params"][name] = {
            k: bool(m["intervals"][k][0] <= true[k] <= m["intervals"][k][1]) for k in true
        }
        out["estimates"][name] = {
            k: [m["params"][k], m["intervals"][k][0], m["intervals"][k][1]] for k in true
        }
    # frontier multiplier at the middle of the fitted compute range
    lo, hi = fit["methods"]["token"]["data_range"]["C"]
    grid = np.array(fit["compute_grid"])
    i = int(np.argmin(np.abs(np.log(grid) - 0.5 * (math.log(lo) + math.log(hi)))))
    fr = fit["multiplier"]["frontier"]["patch_K4_lam0.5"]
    a, b = fr["interval"][i]
    b = math.inf if b == F.ANY else b
    out["frontier"] = {"C": float(grid[i]), "estimate": fr["multiplier"][i], "covered": a <= 2 <= b}
    # per-run multipliers of noiseless probes, from the token bootstrap
    samples = F.to_linear(np.array(fit["methods"]["token"]["bootstrap"]["samples"]))
    probes = [r for r in make_rows(patch=(K, LAM, MULT, "KT")) if r["method"] == "patch"]
    hits = 0
    for r in probes:
        arch = architecture(r["num_layers"], r["hidden_size"])
        f1 = arch["per_token"](1, "KT")
        mb = f1 * F.tokens_to_reach(samples, r["params"], r["val_loss"]) / r["flops"]
        plo, phi = F.percentile_interval(mb)
        hits += bool(plo <= MULT <= phi)
    out["per_run"] = {"covered": hits, "runs": len(probes)}
    if grid_check:
        out["grid_check"] = grid_start_check(rows)
    out["cpu_seconds"] = time.process_time() - t0
    return out


def grid_start_check(rows: list[dict]) -> dict:
    """The fit's screened starts vs L-BFGS-B from every one of the 4500 Hoffmann grid points."""
    import numpy as np

    from megapatch.study import fit as F

    tok = [r for r in rows if r["method"] == "token"]
    n = np.array([r["params"] for r in tok], dtype=float)
    d = np.array([r["D"] for r in tok], dtype=float)
    loss = np.array([r["val_loss"] for r in tok])
    with F.single_thread_blas():
        xc = F.cross_check(n, d, loss)
        screened = F.fit_law(n, d, loss, extra_starts=[F.to_log(xc)])
        full = F.fit_law(n, d, loss, screened_starts=4500)
    return {
        "screened_objective": screened.objective,
        "full_grid_objective": full.objective,
        "max_param_rel_diff": float(
            np.max(np.abs(screened.params - full.params) / np.abs(full.params))
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=NOISE)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--grid-check", type=int, default=2, help="trials with the 4500-start check")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fit_coverage.json"))
    args = ap.parse_args()

    t0 = time.time()
    work = [(i, args.bootstrap, args.noise, i < args.grid_check) for i in range(args.trials)]
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = []
            for res in pool.imap(trial, work):
                results.append(res)
                print(f"trial {res['trial']:3d} done ({res['cpu_seconds']:.1f} s CPU)", flush=True)
    else:
        results = []
        for w in work:
            results.append(trial(w))
            print(f"trial {w[0]:3d} done ({results[-1]['cpu_seconds']:.1f} s CPU)", flush=True)

    import numpy as np

    table = []
    for name in ("token", "patch_K4_lam0.5"):
        for k in ("E", "A", "alpha", "B", "beta"):
            cov = float(np.mean([r["params"][name][k] for r in results]))
            est = np.array([r["estimates"][name][k] for r in results])
            table.append(
                {
                    "method": name,
                    "quantity": k,
                    "coverage": cov,
                    "median_estimate": float(np.median(est[:, 0])),
                    "median_interval": [float(np.median(est[:, 1])), float(np.median(est[:, 2]))],
                }
            )
    fr_cov = float(np.mean([r["frontier"]["covered"] for r in results]))
    fr_est = float(np.median([r["frontier"]["estimate"] for r in results]))
    pr_cov = sum(r["per_run"]["covered"] for r in results) / sum(
        r["per_run"]["runs"] for r in results
    )
    print()
    print(
        f"{args.trials} trials x {args.bootstrap} bootstrap resamples, {100 * args.noise:g}% noise"
    )
    print(f"{'method':<18}{'quantity':<26}{'coverage':>9}  {'median estimate [median 95% CI]'}")
    for row in table:
        lo, hi = row["median_interval"]
        print(
            f"{row['method']:<18}{row['quantity']:<26}{100 * row['coverage']:>8.0f}%  "
            f"{row['median_estimate']:.4g} [{lo:.4g}, {hi:.4g}]"
        )
    print(
        f"{'patch_K4_lam0.5':<18}{'frontier multiplier (2)':<26}{100 * fr_cov:>8.0f}%  {fr_est:.4g}"
    )
    print(f"{'patch_K4_lam0.5':<18}{'per-run multiplier (2)':<26}{100 * pr_cov:>8.0f}%")
    checks = [r["grid_check"] for r in results if "grid_check" in r]
    for c in checks:
        print(
            f"4500-start check: screened objective {c['screened_objective']:.6g}, full grid "
            f"{c['full_grid_objective']:.6g}, largest parameter difference "
            f"{c['max_param_rel_diff']:.2e}"
        )
    worst = min(row["coverage"] for row in table)
    goal = worst >= 0.9
    print(f"goal: every parameter covered in >= 90% of trials: {'met' if goal else 'NOT met'}")
    elapsed = time.time() - t0
    print(f"{elapsed:.0f} s wall, {sum(r['cpu_seconds'] for r in results):.0f} s CPU in trials")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(
            {
                "trials": args.trials,
                "bootstrap": args.bootstrap,
                "noise": args.noise,
                "table": table,
                "frontier_multiplier_coverage": fr_cov,
                "per_run_multiplier_coverage": pr_cov,
                "grid_checks": checks,
                "goal_met": goal,
                "wall_seconds": elapsed,
                "results": results,
            },
            fh,
            indent=1,
        )
    print(f"wrote {args.out}")
    return 0 if goal else 1


if __name__ == "__main__":
    sys.exit(main())
