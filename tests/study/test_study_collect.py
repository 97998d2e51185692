"""`megapatch study collect --import`: external result tables join the study's rows; bad tables
are one error naming the file, line and column (exit code 2)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from megapatch.cli import main
from megapatch.study.collect import COLUMNS
from tests.study.conftest import write_study

GRID = {
    "sizes": {"S": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2}},
    "grids": [{"sizes": ["S"], "budgets": [16384], "methods": ["token"]}],
}
TABLE = """run_id,method,params,D,K,lam,val_loss,flops,seed
paper-370m-token,token,370000000,360000000000,,,2.39,,1
paper-370m-patch,patch,370000000,360000000000,4,0.6667,2.36,4.0e20,1
"""


def test_imported_rows_join_the_study_and_stay_for_later_collects(tmp_path, study_data, capsys):
    study = tmp_path / "study"
    assert (
        main(["study", "plan", str(write_study(tmp_path, study_data, GRID)), "--out", str(study)])
        == 0
    )
    table = tmp_path / "paper.csv"
    table.write_text(TABLE)
    assert main(["study", "collect", str(study), "--import", str(table)]) == 0
    first = [(study / n).read_bytes() for n in ("results.jsonl", "results.csv")]
    assert main(["study", "collect", str(study)]) == 0  # the import is kept in DIR/imports
    assert [(study / n).read_bytes() for n in ("results.jsonl", "results.csv")] == first
    rows = [json.loads(x) for x in first[0].decode().splitlines()]
    assert [r["source"] for r in rows] == ["megapatch", "paper.csv", "paper.csv"]
    ours, patch, token = rows  # sorted: source, N, D, method, ...
    assert (token["run_id"], patch["run_id"]) == ("paper-370m-token", "paper-370m-patch")
    assert ours["status"] == "pending" and ours["val_loss"] is None and ours["flops"] > 0
    assert token["status"] == "finished" and token["K"] == 1 and token["lam"] == 0.0
    assert token["flops"] is None  # left to the fit (6·N·D·(λ/K + 1 − λ), noted in the report)
    assert token["val_ppl"] == math.exp(2.39)
    assert patch["D_patch"] == round(0.6667 * 360e9) and patch["flops"] == 4.0e20
    assert patch["D_patch"] + patch["D_token"] == patch["D"] == 360_000_000_000
    # The CSV holds the same rows and columns as the JSONL.
    with open(study / "results.csv", newline="") as f:
        table_rows = list(csv.DictReader(f))
    assert list(table_rows[0]) == list(COLUMNS)
    for row, back in zip(rows, table_rows):
        for key in COLUMNS:
            value = row[key]
            assert back[key] == ("" if value is None else str(value)), key


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("method,params,D\ntoken,1e6,1e9\n", "bad.csv: missing column(s) 'val_loss'"),
        (
            "method,params,D,val_loss\ntoken,1e6,1e9,2.5\ntoken,2e6,1e9,nan\n",
            "bad.csv line 3, column 'val_loss': 'nan' is not a finite number",
        ),
        (
            "method,params,D,val_loss\ntoken,1e6,1e9,inf\n",
            "bad.csv line 2, column 'val_loss': 'inf' is not a finite number",
        ),
        (
            "method,params,D,val_loss\npatch,1e6,1e9,2.5\n",
            "bad.csv: missing column 'K' (needed by line 2)",
        ),
        (
            "method,params,D,val_loss,K,lam\ntoken,1e6,1e9,2.5,,\npatch,1e6,,2.4,4,0.5\n",
            "bad.csv line 3, column 'D': empty (it is required)",
        ),
    ],
)
def test_bad_import_tables_are_refused_naming_file_line_and_column(
    tmp_path, capsys, table, message
):
    bad = tmp_path / "bad.csv"
    bad.write_text(table)
    assert main(["study", "collect", str(tmp_path / "study"), "--import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "study" / "imports").exists()
    assert not (tmp_path / "study" / "results.jsonl").exists()


def test_time_estimate_follows_the_calibration_runs(tmp_path, study_data, capsys):
    """The estimate is what the calibration's own numbers give (see megapatch.study.estimate)."""
    from megapatch.study.estimate import estimate

    calib = tmp_path / "calib"
    rows = []
    for rid, method, k, rate_patch, rate_token, wall, total in (
        ("c-token", "token", 1, None, 1000.0, 50.0, 80.0),
        ("c-patch", "patch", 4, 4000.0, 900.0, 20.0, 60.0),
    ):
        run = calib / "runs" / rid
        run.mkdir(parents=True)
        (run / "study_attempts.jsonl").write_text(json.dumps({"seconds": total}) + "\n")
        rows.append(
            dict(
                run_id=rid,
                status="finished",
                source="megapatch",
                method=method,
                K=k,
                num_layers=2,
                hidden_size=64,
                tokens_per_s_patch=rate_patch,
                tokens_per_s_token=rate_token,
                wall_seconds=wall,
            )
        )
    (calib / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = json.loads(json.dumps(GRID))
    spec["grids"][0]["methods"] = ["token", {"patch": {"K": [4, 8], "lam": 0.5}}]
    spec["overrides"] = {"training": {"micro_batch_size": 2}}  # K=8: 2 samples per step
    study = tmp_path / "study"
    assert (
        main(["study", "plan", str(write_study(tmp_path, study_data, spec)), "--out", str(study)])
        == 0
    )
    manifest = [json.loads(x) for x in (study / "manifest.jsonl").read_text().splitlines()]
    seconds, wall = estimate(manifest, str(calib), parallel=2)
    eval_s = 8 * 64 / (3 * 1000.0)  # eval_samples x T at a third of the token step cost
    other = (30.0 + 40.0) / 2 - eval_s  # time outside steps, less the one validation
    token, k4, k8 = manifest
    assert seconds[token["run_id"]] == pytest.approx(16384 / 1000 + eval_s + other)
    assert seconds[k4["run_id"]] == pytest.approx(8192 / 4000 + 8192 / 1000 + eval_s + other)
    assert seconds[k8["run_id"]] == pytest.approx(8192 / 8000 + 8192 / 1000 + eval_s + other)
    # two slots: token and k4 start at once, k8 follows the shorter k4
    assert wall == pytest.approx(
        max(seconds[token["run_id"]], seconds[k4["run_id"]] + seconds[k8["run_id"]])
    )
