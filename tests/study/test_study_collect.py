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
