"""megapatch study fit: planted scaling laws recovered, multipliers, determinism, bad input.

Synthetic studies are generated here from planted parameters; their FLOPs come from megapatch's
one FLOP function (``flops_per_step`` over the stage plan: the patch stage runs B/K sequences of
T patch positions for ``patch_context`` KT, B sequences of T/K for T), exactly as
``megapatch study collect`` records them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os

import numpy as np
import pytest

from megapatch.config import ModelConfig
from megapatch.study import analysis_cli
from megapatch.study import fit as F
from megapatch.training.flops import flops_per_step

TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Hoffmann et al.
SIZES = [(4, 256), (6, 384), (8, 512), (12, 768), (16, 1024), (24, 1536)]
RATIOS = [5, 10, 20, 40, 80]  # tokens per parameter: several per model size
VOCAB, SEQ = 32000, 2048


def law(p: dict, n, d):
    return p["E"] + p["A"] * np.power(n, -p["alpha"]) + p["B"] * np.power(d, -p["beta"])


def architecture(layers: int, hidden: int) -> dict:
    """Parameters and FLOPs per token (token stage, patch stage at K for both contexts)."""
    model = ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 64, vocab_size=VOCAB
    )
    ffn = model.resolved_ffn_hidden_size()
    non_emb = layers * (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) + hidden
    vpad = model.padded_vocab_size()

    def per_token(k: int, context: str) -> float:
        if k == 1:
            return flops_per_step(model, 1, SEQ, vpad) / SEQ
        if context == "KT":  # one sequence of K*T tokens = T patch positions
            return flops_per_step(model, 1, SEQ, vpad) / (k * SEQ)
        return flops_per_step(model, 1, SEQ // k, vpad) / SEQ  # T tokens = T/K positions

    return {
        "params": non_emb + 2 * VOCAB * hidden,
        "params_non_embedding": non_emb,
        "per_token": per_token,
    }


def make_rows(
    noise: float = 0.0,
    seed: int = 0,
    patch: tuple | None = None,
    patch_noise: float = 0.0,
    true: dict = TRUE,
    n_column: str = "params",
    sizes: list = SIZES,
    ratios: list = RATIOS,
) -> list[dict]:
    """Token runs on L = law(N, D) (x exp(noise * z)); with ``patch`` = (K, lam, multiplier,
    context) one patch run per cell whose loss is the token law at ``multiplier`` times its
    compute: L_tok(N, multiplier * flops / f1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for layers, hidden in sizes:
        arch = architecture(layers, hidden)
        n = arch["params"] if n_column == "params" else arch["params_non_embedding"]
        f1 = arch["per_token"](1, "KT")
        for ratio in ratios:
            d = int(ratio * n)
            common = {
                "seed": 0,
                "params": arch["params"],
                "params_non_embedding": arch["params_non_embedding"],
                "num_layers": layers,
                "hidden_size": hidden,
                "D": d,
                "source": "megapatch",
            }
            loss = float(law(true, n, d)) * math.exp(noise * rng.standard_normal())
            rows.append(
                dict(
                    common,
                    run_id=f"token-L{layers}-h{hidden}-r{ratio}",
                    status="finished",
                    method="token",
                    K=1,
                    lam=0.0,
                    lam_requested=0.0,
                    patch_context="KT",
                    D_patch=0,
                    D_token=d,
                    flops=f1 * d,
                    val_loss=loss,
                )
            )
            if patch is None:
                continue
            k, lam, mult, context = patch
            d_patch = int(round(lam * d))
            flops = arch["per_token"](k, context) * d_patch + f1 * (d - d_patch)
            d_eff = mult * flops / f1
            loss = float(law(true, n, d_eff)) * math.exp(patch_noise * rng.standard_normal())
            rows.append(
                dict(
                    common,
                    run_id=f"patch-L{layers}-h{hidden}-r{ratio}",
                    status="finished",
                    method="patch",
                    K=k,
                    lam=d_patch / d,
                    lam_requested=lam,
                    patch_context=context,
                    D_patch=d_patch,
                    D_token=d - d_patch,
                    flops=flops,
                    val_loss=loss,
                )
            )
    return rows


def write_study(path, rows: list[dict]) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "results.jsonl"), "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


def run_cli(argv: list[str]) -> int:
    """The sub-commands exactly as ``megapatch study`` registers them."""
    parser = argparse.ArgumentParser(prog="megapatch study")
    analysis_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def num(x) -> float:
    """A fit.json multiplier bound as a float ("> any" is +inf)."""
    return math.inf if x == F.ANY else float(x)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------ recovery


@pytest.fixture(scope="module")
def exact_patch_world(tmp_path_factory):
    """No noise: token runs on the planted law, patch runs (K=4, λ=1/2, KT) at multiplier 2."""
    d = write_study(tmp_path_factory.mktemp("exact"), make_rows(patch=(4, 0.5, 2.0, "KT")))
    return d, F.fit_study(d, bootstrap=0)


def test_planted_parameters_recovered_without_noise(exact_patch_world):
    _, fit = exact_patch_world
    token = fit["methods"]["token"]
    for k, v in TRUE.items():
        assert rel(token["params"][k], v) < 1e-6, (k, token["params"][k], v)
        assert rel(token["cross_check"]["params"][k], v) < 1e-6, k
    # The patch law is the token law at D_eff = 2 * flops / f1 = 2 * rho * D: the same form with
    # B_patch = B * (2 rho)^-beta, rho = lam/K + 1 - lam (exact for the KT context).
    rho = 0.5 / 4 + 0.5
    patch = fit["methods"]["patch_K4_lam0.5"]
    want = dict(TRUE, B=TRUE["B"] * (2 * rho) ** -TRUE["beta"])
    for k, v in want.items():
        assert rel(patch["params"][k], v) < 1e-6, (k, patch["params"][k], v)
    assert rel(patch["cost_ratio"], rho) < 1e-3  # D_patch rounded to whole tokens
    assert token["cross_check"]["max_relative_loss_difference"] < 1e-8
    assert fit["input"]["fitted_runs"] == 60 and fit["skipped_methods"] == {}


def test_planted_multiplier_two_exact_per_run_and_on_frontier(exact_patch_world):
    _, fit = exact_patch_world
    per_run = fit["multiplier"]["per_run"]
    assert len(per_run) == 30
    for rec in per_run:
        assert rel(rec["multiplier"], 2.0) < 1e-6, rec
        assert rec["f1_source"] == "flops/D of a token run, same model"
    frontier = fit["multiplier"]["frontier"]["patch_K4_lam0.5"]["multiplier"]
    assert len(frontier) == len(fit["compute_grid"]) > 10
    assert max(rel(m, 2.0) for m in frontier) < 1e-6


def test_shared_e_joint_fit_recovers_planted_parameters(exact_patch_world):
    d, _ = exact_patch_world
    fit = F.fit_study(d, bootstrap=0, shared_e=True)
    assert fit["joint"]["converged"]
    e_values = {m["params"]["E"] for m in fit["methods"].values()}
    assert len(e_values) == 1 and rel(e_values.pop(), TRUE["E"]) < 1e-6
    for k in ("A", "alpha", "beta"):
        assert rel(fit["methods"]["token"]["params"][k], TRUE[k]) < 1e-6
        assert rel(fit["methods"]["patch_K4_lam0.5"]["params"][k], TRUE[k]) < 1e-6


def test_params_non_embedding_column(tmp_path):
    """A law planted in the non-embedding count is recovered only with that column."""
    d = write_study(tmp_path, make_rows(n_column="params_non_embedding"))
    fit = F.fit_study(d, bootstrap=0, params_column="params_non_embedding")
    for k, v in TRUE.items():
        assert rel(fit["methods"]["token"]["params"][k], v) < 1e-6, k
    other = F.fit_study(d, bootstrap=0)  # same data read with total parameters: a worse fit
    assert other["methods"]["token"]["objective"] > 1e3 * fit["methods"]["token"]["objective"]


# ----------------------------------------------------------- closed forms vs numerics


def test_frontier_closed_form_matches_brute_force_minimum():
    fm = F.FlopsModel(kappa=7.3, c=0.99, points=())
    p = np.array([TRUE[k] for k in F.PARAM_NAMES])
    cost = 0.625
    for c in (1e17, 1e19, 1e21):
        n_opt, d_opt, l_opt = F.frontier(p, np.float64(c), cost, fm)
        n_axis = np.geomspace(1e5, 1e13, 400_001)
        losses = F.law_loss(p, n_axis, c / (cost * fm.f1(n_axis)))
        i = int(np.argmin(losses))
        assert rel(float(l_opt), float(losses[i])) < 1e-9
        assert rel(float(n_opt), float(n_axis[i])) < 1e-3
        assert rel(float(d_opt) * cost * float(fm.f1(n_opt)), c) < 1e-9
        # compute_to_reach inverts the frontier
        back = F.compute_to_reach(p, l_opt, cost, fm)
        assert rel(float(back), c) < 1e-9
    assert np.isinf(F.compute_to_reach(p, TRUE["E"] - 0.01, cost, fm))


def test_flops_per_token_from_patch_rows_without_token_twin(tmp_path):
    """f1 of a patch run with no token run of its model: flops / (D_token + D_patch/K) equals
    the FLOP function at K=1 for the KT context (and underestimates it slightly for T)."""
    rows = make_rows(patch=(4, 0.5, 2.0, "KT"))
    arch = architecture(5, 320)
    extra = []
    for context in ("KT", "T"):
        d = 1_000_000_000
        flops = arch["per_token"](4, context) * (d // 2) + arch["per_token"](1, "KT") * (d // 2)
        extra.append(
            {
                "run_id": f"lone-{context}",
                "status": "finished",
                "method": "patch",
                "K": 4,
                "lam": 0.5,
                "lam_requested": 0.5,
                "patch_context": context,
                "params": arch["params"],
                "num_layers": 5,
                "hidden_size": 320,
                "D": d,
                "D_patch": d // 2,
                "D_token": d // 2,
                "flops": flops,
                "val_loss": 3.3,
            }
        )
    study = F.load_study(write_study(tmp_path, rows + extra))
    runs = {r.run_id: r for r in study.runs}
    f1 = arch["per_token"](1, "KT")
    assert rel(runs["lone-KT"].f1, f1) < 1e-12
    assert runs["lone-KT"].f1_source == "flops/(D_token + D_patch/K)"
    assert 0.95 * f1 < runs["lone-T"].f1 < f1  # attention over T/K positions, not T


def test_multiplier_undefined_below_token_asymptote(tmp_path):
    rows = make_rows()
    best = rows[-1]  # largest model, most tokens
    n = best["params"]
    floor = TRUE["E"] + TRUE["A"] * n ** -TRUE["alpha"]
    rows += make_rows(patch=(4, 0.5, 2.0, "KT"))[1::2]  # the patch runs (fit the patch group)
    rows.append(dict(best, run_id="too-good", method="patch", K=4, lam=0.5, val_loss=floor - 0.01))
    fit = F.fit_study(write_study(tmp_path, rows), bootstrap=20)
    rec = next(r for r in fit["multiplier"]["per_run"] if r["run_id"] == "too-good")
    assert rec["multiplier"] == F.ANY and rec["interval"][1] == F.ANY


def test_frontier_marks_optima_beyond_the_runs(exact_patch_world):
    _, fit = exact_patch_world
    fr = fit["multiplier"]["frontier"]["patch_K4_lam0.5"]
    token = fit["methods"]["token"]
    n_lo, n_hi = token["data_range"]["N"]
    for c, inside, n_opt in zip(
        fit["compute_grid"], fr["inside_data"], fit["methods"]["patch_K4_lam0.5"]["frontier"]["N"]
    ):
        if not n_lo <= n_opt <= n_hi:
            assert not inside, c
    assert any(fr["inside_data"]) and not all(fr["inside_data"])


def test_bootstrap_refit_leaves_a_flat_direction():
    """A resample fit started where E -> 0 (the gradient in e = log E vanishes) must still
    reach the optimum: the refit also starts from the resample's own VP solution."""
    rows = make_rows()
    n = np.array([r["params"] for r in rows], dtype=float)
    d = np.array([r["D"] for r in rows], dtype=float)
    loss = np.array([r["val_loss"] for r in rows])
    fit = F.fit_law(n, d, loss)
    stuck = F.LawFit(np.array([-30.0, *fit.theta[1:]]), 0.0, True, fit.centre)
    theta, _ = F.refit_bootstrap(n, d, loss, np.ones(len(loss)), stuck)
    for i, k in enumerate(F.PARAM_NAMES):
        assert rel(F.to_linear(theta)[i], TRUE[k]) < 1e-5, k


# ------------------------------------------------------------------ intervals


def test_multiplier_two_inside_bootstrap_intervals_with_noisy_token_runs(tmp_path):
    """Token runs with 1% noise, patch runs exactly at twice their compute: 2 lies inside the
    per-run intervals (they carry the token fit's uncertainty) and the frontier's interval.

    The intervals are pointwise 95%: over many data sets a few runs or budgets miss (measured on
    8 data sets: 28-30 of 30 runs, 31-36 of 36 budgets inside; the benchmark measures the
    coverage over 100), so the test asks for >= 90% of the runs and >= 80% of the budgets."""
    rows = make_rows(noise=0.01, seed=5, patch=(4, 0.5, 2.0, "KT"))
    fit = F.fit_study(write_study(tmp_path, rows), bootstrap=200, seed=3)
    per_run = fit["multiplier"]["per_run"]
    inside = [r["interval"][0] <= 2.0 <= num(r["interval"][1]) for r in per_run]
    assert sum(inside) >= 0.9 * len(per_run), [r["interval"] for r in per_run]
    fr = fit["multiplier"]["frontier"]["patch_K4_lam0.5"]
    lo, hi = fit["methods"]["token"]["data_range"]["C"]
    grid = fit["compute_grid"]
    ins = [a <= 2.0 <= num(b) for c, (a, b) in zip(grid, fr["interval"]) if lo <= c <= hi]
    assert len(ins) >= 20 and sum(ins) >= 0.8 * len(ins), fr["interval"]
    # and the intervals are informative: within the data they exclude multipliers 1 and 4
    mid = [iv for c, iv in zip(grid, fr["interval"]) if lo * 10 <= c <= hi / 10]
    assert all(1.0 < a and num(b) < 4.0 for a, b in mid)


def test_bootstrap_coverage_reduced(tmp_path):
    """95% percentile intervals under 1% noise (10 trials x 100 resamples here; the 100-trial x
    1000-resample run is benchmarks/bench_fit_coverage.py). Each parameter must be covered in at
    least 8 of 10 trials (P >= 0.99 at 95% coverage; a 60%-coverage method fails with P 0.83)
    and >= 90% over all 50 checks; the interval widths must match the spread of the estimates
    across trials (bootstrap ~ sampling distribution), so over-wide intervals fail too."""
    trials, covered, estimates, widths = 10, np.zeros(5), [], []
    for t in range(trials):
        d = write_study(tmp_path / f"t{t}", make_rows(noise=0.01, seed=1000 + t))
        fit = F.fit_study(d, bootstrap=100, seed=t)
        m = fit["methods"]["token"]
        covered += [m["intervals"][k][0] <= TRUE[k] <= m["intervals"][k][1] for k in F.PARAM_NAMES]
        estimates.append([m["params"]["alpha"], m["params"]["beta"]])
        widths.append([np.subtract(*m["intervals"][k][::-1]) for k in ("alpha", "beta")])
    assert covered.min() >= 8, covered
    assert covered.sum() >= 0.9 * 5 * trials, covered
    spread = np.std(estimates, axis=0, ddof=1)
    implied = np.median(widths, axis=0) / (2 * 1.96)
    assert np.all((implied > 0.4 * spread) & (implied < 2.5 * spread)), (implied, spread)


# ------------------------------------------------------------------ command line


def test_fit_json_byte_identical_for_a_seed(tmp_path, capsys):
    from megapatch.cli import main

    d = write_study(tmp_path, make_rows(noise=0.01, seed=9, patch=(4, 0.5, 2.0, "KT")))
    outs = []
    for name, seed in (("a.json", 0), ("b.json", 0), ("c.json", 1)):
        out = str(tmp_path / name)
        argv = ["study", "fit", d, "--bootstrap", "40", "--seed", str(seed), "--output", out]
        assert main(argv) == 0
        with open(out, "rb") as fh:
            outs.append(fh.read())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]  # the seed drives the resampling
    fit = json.loads(outs[0])
    assert len(fit["methods"]["token"]["bootstrap"]["samples"]) == 40
    assert "wrote" in capsys.readouterr().out


def test_only_finished_rows_are_fitted(tmp_path, capsys):
    rows = make_rows(noise=0.005, seed=2)
    base = rows[0]
    rows += [
        dict(base, run_id="s1", status="stopped", val_loss=None),
        dict(base, run_id="f1", status="failed", val_loss=None),
        dict(base, run_id="p1", status="pending", val_loss=None, flops=None),
    ]
    d = write_study(tmp_path, rows)
    assert run_cli(["fit", d, "--bootstrap", "0"]) == 0
    fit = F.load_fit(d)
    assert fit["input"]["finished"] == 30 and fit["input"]["rows"] == 33
    assert fit["input"]["left_out"] == {"failed": ["f1"], "pending": ["p1"], "stopped": ["s1"]}
    assert "left out: 1 failed, 1 pending, 1 stopped" in capsys.readouterr().out


def test_imported_csv_without_flops(tmp_path):
    """External rows: flops computed as 6·params·D·(λ/K + 1 − λ), noted; f1 = 6N."""
    rows = make_rows(patch=(2, 0.25, 1.0, "KT"))
    with open(tmp_path / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["method", "params", "D", "val_loss", "K", "lam"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in w.fieldnames})
    study = F.load_study(str(tmp_path))
    assert any("without flops" in n for n in study.notes)
    assert any("no status column" in n for n in study.notes)
    for run in study.runs:
        lam, k = run.lam, run.K
        assert rel(run.flops, 6 * run.N * run.D * (lam / k + 1 - lam)) < 1e-12
        assert run.f1 == 6 * run.N
    assert set(study.groups) == {"token", "patch_K2_lam0.25"}


# ---------------------------------------------------------------------- bad input


def _bad(tmp_path, capsys, rows=None, argv=(), csv_rows=None):
    if csv_rows is not None:
        with open(tmp_path / "results.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, list(csv_rows[0]))
            w.writeheader()
            w.writerows(csv_rows)
        d = str(tmp_path)
    else:
        d = write_study(tmp_path, rows)
    capsys.readouterr()
    rc = run_cli(["fit", d, "--bootstrap", "0", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(d, "fit.json"))
    return err


def test_bad_input_too_few_runs(tmp_path, capsys):
    rows = make_rows()[:4]
    err = _bad(tmp_path, capsys, rows)
    assert "method token" in err and "4 finished run(s)" in err and "5 parameters" in err


def test_bad_input_too_few_distinct_sizes(tmp_path, capsys):
    rows = make_rows(sizes=SIZES[:2])
    err = _bad(tmp_path, capsys, rows)
    assert "method token" in err and "2 distinct model size(s)" in err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, -1.0])
def test_bad_input_non_finite_loss(tmp_path, capsys, value):
    rows = make_rows()
    rows[7]["val_loss"] = value
    err = _bad(tmp_path, capsys, rows)
    assert "line 8" in err and rows[7]["run_id"] in err and "val_loss" in err


def test_bad_input_missing_column(tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "D"} for r in make_rows()]
    err = _bad(tmp_path, capsys, csv_rows=rows)
    assert "results.csv" in err and "missing column(s) D" in err


def test_bad_input_missing_value_in_a_row(tmp_path, capsys):
    rows = make_rows()
    rows[3]["params"] = None
    err = _bad(tmp_path, capsys, rows)
    assert "line 4" in err and rows[3]["run_id"] in err and "'params'" in err


def test_bad_input_missing_params_non_embedding(tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "params_non_embedding"} for r in make_rows()]
    err = _bad(tmp_path, capsys, rows, argv=["--params-column", "params_non_embedding"])
    assert "params_non_embedding" in err


def test_bad_input_unknown_method_group(tmp_path, capsys):
    rows = make_rows(patch=(4, 0.5, 2.0, "KT"))
    err = _bad(tmp_path, capsys, rows, argv=["--method", "patch_K3_lam0.5"])
    assert "patch_K3_lam0.5" in err and "token, patch_K4_lam0.5" in err


def test_bad_input_unknown_method_value(tmp_path, capsys):
    rows = make_rows()
    rows[2]["method"] = "bag"
    err = _bad(tmp_path, capsys, rows)
    assert "line 3" in err and "unknown method 'bag'" in err


def test_requested_patch_group_with_too_few_runs(tmp_path, capsys):
    rows = make_rows() + make_rows(patch=(8, 0.5, 1.5, "KT"))[1:6:2]  # 3 patch runs
    d = write_study(tmp_path, rows)
    fit = F.fit_study(d, bootstrap=0)  # by default the small group is listed, not fitted
    assert "fewer than the 5 parameters" in fit["skipped_methods"]["patch_K8_lam0.5"]
    err = _bad(tmp_path, capsys, rows, argv=["--method", "patch_K8_lam0.5"])
    assert "method patch_K8_lam0.5: 3 finished run(s)" in err
