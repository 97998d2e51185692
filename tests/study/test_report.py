"""megapatch study report / recommend on a synthetic study with planted laws.

The study: token runs on the planted law and patch runs (K=4, λ=1/2) at exactly twice their
compute (no noise, so held-out predictions must be exact), plus one (N, D) cell where λ and K are
varied (one of them with three seeds) and a stopped run.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest

from megapatch.study import fit as F
from megapatch.study import report as R
from tests.study.test_fit import TRUE, make_rows, run_cli, write_study

VARIANTS = {(4, 0.25): 3.702, (4, 0.75): 3.689, (2, 0.5): 3.695, (8, 0.5): 3.71}


def _study_rows() -> list[dict]:
    rows = make_rows(patch=(4, 0.5, 2.0, "KT"))
    cell = next(r for r in rows if r["run_id"] == "token-L8-h512-r20")
    for (k, lam), loss in VARIANTS.items():
        rows.append(
            dict(cell, run_id=f"var-K{k}-lam{lam}", method="patch", K=k, lam=lam, val_loss=loss)
        )
    for seed, delta in ((1, 0.004), (2, -0.002)):
        rows.append(
            dict(cell, run_id=f"var-K4-lam0.25-s{seed}", method="patch", K=4, lam=0.25)
            | {"seed": seed, "val_loss": VARIANTS[(4, 0.25)] + delta}
        )
    rows.append(dict(cell, run_id="stopped-run", status="stopped", val_loss=None))
    return rows


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = write_study(tmp_path_factory.mktemp("study"), _study_rows())
    assert run_cli(["fit", d, "--bootstrap", "30", "--seed", "4"]) == 0
    return d


@pytest.fixture(scope="module")
def reported(study):
    """The study after one `megapatch study report`."""
    assert run_cli(["report", study]) == 0
    return study


def _png_chunks(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return kinds


def test_report_deterministic_with_plots(reported, capsys):
    study = reported
    with open(os.path.join(study, "report.md"), "rb") as fh:
        first = fh.read()
    plots = sorted(os.listdir(os.path.join(study, "plots")))
    assert plots == sorted(f"{n}.png" for n in R.PLOT_NAMES)
    pngs = {}
    for name in plots:
        with open(os.path.join(study, "plots", name), "rb") as fh:
            pngs[name] = fh.read()
        kinds = _png_chunks(os.path.join(study, "plots", name))
        assert b"tIME" not in kinds and b"tEXt" not in kinds, (name, kinds)  # no dates, no tags
    assert run_cli(["report", study]) == 0
    with open(os.path.join(study, "report.md"), "rb") as fh:
        assert fh.read() == first
    for name, data in pngs.items():
        with open(os.path.join(study, "plots", name), "rb") as fh:
            assert fh.read() == data, name
    text = first.decode()
    for section in (
        "## Runs",
        "## Fitted laws",
        "## Compute multiplier",
        "## Held-out check",
        "## Run-to-run noise",
        "## λ and K at fixed (N, D)",
    ):
        assert section in text
    assert "**60 runs used in the fits**" in text
    assert "1 stopped (stopped-run)" in text
    assert "patch K=4 λ=0.25 (`patch_K4_lam0.25`): 3 finished run(s)" in text
    for name in R.PLOT_NAMES:
        assert f"(plots/{name}.png)" in text
    assert "wrote" in capsys.readouterr().out  # the second report


def test_report_numbers_against_direct_computation(reported):
    study = reported
    with open(os.path.join(study, "report.md"), encoding="utf-8") as fh:
        text = fh.read()
    # noiseless laws: the held-out runs are predicted exactly
    s = F.load_study(study)
    for name in ("token", "patch_K4_lam0.5"):
        h = R.holdout_check(s.groups[name])
        assert len(h["rows"]) >= 5 and h["max_abs_rel_error"] < 1e-6
        top = sorted(r.flops for r in s.groups[name].runs)[-len(h["rows"]) :]
        assert sorted(r["flops"] for r in h["rows"]) == top  # the largest budgets held out
    assert text.count("mean absolute error 0.00%, largest 0.00%") == 2
    # seed noise of the repeated cell
    losses = [VARIANTS[(4, 0.25)] + d for d in (0.0, 0.004, -0.002)]
    assert f"{np.std(losses, ddof=1):.4f} | {np.std(np.log(losses), ddof=1):.4f} |" in text
    # λ and K curves at the varied cell (token run = λ 0 / K 1; λ=1/2, K=4 from the patch group)
    best = min(VARIANTS.values())
    assert "best λ=0.75" in text and best == VARIANTS[(4, 0.75)]
    # the fitted parameters with intervals, as in fit.json
    fit = F.load_fit(study)
    e = fit["methods"]["token"]["params"]["E"]
    lo, hi = fit["methods"]["token"]["intervals"]["E"]
    assert f"| token level | 30 | {e:.4g} [{lo:.3g}, {hi:.3g}] |" in text
    assert math.isclose(e, TRUE["E"], rel_tol=1e-6)


def test_report_needs_a_current_fit(tmp_path, capsys):
    d = write_study(tmp_path, make_rows())
    assert run_cli(["report", d]) == 2
    assert "run `megapatch study fit" in capsys.readouterr().err
    assert run_cli(["fit", d, "--bootstrap", "0"]) == 0
    with open(os.path.join(d, "results.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(make_rows(seed=1)[0] | {"run_id": "late"}) + "\n")
    capsys.readouterr()
    assert run_cli(["report", d]) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "re-run `megapatch study fit" in err


def _brute_force_optimum(fit: dict, name: str, c: float) -> tuple[float, float]:
    m = fit["methods"][name]
    p = np.array([m["params"][k] for k in F.PARAM_NAMES])
    fm = fit["flops_model"]
    n = np.geomspace(1e6, 1e12, 300_001)
    d = c / (m["cost_ratio"] * fm["kappa"] * n ** fm["exponent"])
    losses = F.law_loss(p, n, d)
    i = int(np.argmin(losses))
    return float(n[i]), float(losses[i])


def test_recommend_matches_brute_force_and_prefers_the_planted_patch_gain(study, capsys):
    fit = F.load_fit(study)
    c = 1e19  # inside the fitted runs' compute
    capsys.readouterr()
    assert run_cli(["recommend", study, "--flops", str(c), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    by = {r["method"]: r for r in rec["methods"]}
    assert rec["best"]["method"] == "patch_K4_lam0.5" and rec["best"]["K"] == 4
    for name in ("token", "patch_K4_lam0.5"):
        n_ref, l_ref = _brute_force_optimum(fit, name, c)
        assert math.isclose(by[name]["loss"], l_ref, rel_tol=1e-9)
        assert math.isclose(by[name]["N"], n_ref, rel_tol=1e-3)
        lo, hi = by[name]["interval"]
        assert lo <= by[name]["loss"] <= hi
        assert not by[name]["warnings"]
    assert math.isclose(by["patch_K4_lam0.5"]["multiplier_vs_token"], 2.0, rel_tol=1e-6)
    assert by["patch_K4_lam0.5"]["p_best"] == 1.0


def test_recommend_max_tokens_and_extrapolation_warning(study, capsys):
    fit = F.load_fit(study)
    capsys.readouterr()
    assert run_cli(["recommend", study, "--flops", "1e22", "--max-tokens", "1e10"]) == 0
    out = capsys.readouterr().out
    assert "(max tokens)" in out and "best: patch K=4 λ=0.5" in out
    assert "warning: token level: C = 1e+22 is" in out and "extrapolation" in out
    from megapatch.study.recommend import recommend

    rec = recommend(fit, 1e22, 1e10)
    fm = fit["flops_model"]
    for r in rec["methods"]:
        assert r["D"] == 1e10 and r["constrained_by_max_tokens"]
        cost = fit["methods"][r["method"]]["cost_ratio"]
        assert math.isclose(cost * fm["kappa"] * r["N"] ** fm["exponent"] * r["D"], 1e22)
    assert run_cli(["recommend", study, "--flops", "1e18"]) == 0
    assert "warning" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        run_cli(["recommend", study, "--flops", "-5"])
    assert exc.value.code == 2


def test_recommend_without_fit(tmp_path, capsys):
    d = write_study(tmp_path, make_rows())
    assert run_cli(["recommend", d, "--flops", "1e20"]) == 2
    assert "no fit" in capsys.readouterr().err
