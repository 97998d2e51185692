"""Study spec -> manifest: parameter counts, size and FLOP-budget rules, stable ids, re-plans,
and one clear error (exit code 2) for each kind of bad spec."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from megapatch.cli import main
from megapatch.config import ModelConfig
from megapatch.study.spec import (
    count_parameters,
    expand,
    load_spec,
    plan_flops,
    shape_for_params,
)
from megapatch.training.plan import make_plan
from tests.study.conftest import write_study

GRID = {
    "sizes": {"S": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2}},
    "grids": [
        {
            "sizes": ["S"],
            "budgets": [16384],
            "methods": ["token", {"patch": {"K": 4, "lam": "1/2"}}],
        }
    ],
}


def _manifest(study_dir) -> list[dict]:
    return [json.loads(line) for line in (study_dir / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "fields",
    [
        dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=250),
        dict(
            num_layers=3,
            hidden_size=96,
            num_attention_heads=6,
            num_query_groups=2,
            ffn_hidden_size=200,
            vocab_size=1000,
        ),
        dict(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            vocab_size=300,
            swiglu=False,
            normalization="LayerNorm",
            add_bias_linear=True,
            qk_layernorm=True,
            position_embedding_type="learned_absolute",
            max_position_embeddings=128,
            untie_embeddings_and_output_weights=False,
        ),
    ],
)
def test_parameter_count_matches_the_built_megatron_model(single_rank, fields):
    from megapatch.model import build_model
    from tests.helpers import fp32, parallel

    model = ModelConfig(make_vocab_size_divisible_by=128, **fields)
    [gpt] = build_model(model, parallel(), fp32())
    named = dict(gpt.named_parameters())
    padding = model.padded_vocab_size() - model.vocab_size
    untied = model.untie_embeddings_and_output_weights
    built = sum(p.numel() for p in named.values()) - padding * model.hidden_size * (1 + untied)
    embed = sum(
        p.numel() for n, p in named.items() if n.startswith(("embedding.", "output_layer."))
    )
    assert count_parameters(model) == (built, sum(p.numel() for p in named.values()) - embed)


def test_size_from_a_parameter_target_is_the_closest_depth_of_the_rule():
    rule = dict(aspect_ratio=32, head_dim=32, ffn_ratio=8 / 3)
    base = ModelConfig(vocab_size=4000)
    for target in (1e5, 5e5, 2e6):
        shape = shape_for_params(target, rule, base)
        assert shape["hidden_size"] == shape["num_attention_heads"] * 32
        assert shape["ffn_hidden_size"] % 32 == 0
        err = abs(math.log(count_parameters(dataclasses.replace(base, **shape))[1] / target))
        for depth in (shape["num_layers"] - 1, shape["num_layers"] + 1):
            if depth < 1:
                continue
            hidden = max(32, round(32 * depth / 32) * 32)
            other = dataclasses.replace(
                base,
                num_layers=depth,
                hidden_size=hidden,
                num_attention_heads=hidden // 32,
                ffn_hidden_size=32 * math.ceil(8 / 3 * hidden / 32),
            )
            assert err <= abs(math.log(count_parameters(other)[1] / target))


def test_flop_budget_gives_each_cell_the_step_count_closest_to_it(tmp_path, study_data):
    spec = dict(GRID)
    spec["grids"] = [dict(GRID["grids"][0], budgets=[{"flops": 3e10}])]
    cells = expand(load_spec(str(write_study(tmp_path, study_data, spec))))
    token, patch = cells
    per_step = 16 * 64
    for cell in cells:
        cfg = cell.config

        def flops(tokens, cfg=cfg):
            c = dataclasses.replace(cfg)
            c.training = dataclasses.replace(cfg.training, train_tokens=tokens)
            return plan_flops(c, make_plan(c, 1))

        assert cell.flops == flops(cell.tokens)
        for other in (cell.tokens - per_step, cell.tokens + per_step):
            assert abs(cell.flops - 3e10) <= abs(flops(other) - 3e10)
    assert patch.tokens > 1.5 * token.tokens  # half the FLOPs per token at K=4, lam=1/2
    assert token.run_id.startswith("n2L64h-c3e10-token-s")


def test_run_ids_are_stable_and_replanning_keeps_every_old_cell(tmp_path, study_data, capsys):
    spec_path = write_study(tmp_path / "spec", study_data, GRID)
    assert main(["study", "plan", str(spec_path), "--out", str(tmp_path / "a")]) == 0
    assert main(["study", "plan", str(spec_path), "--out", str(tmp_path / "b")]) == 0
    first = _manifest(tmp_path / "a")
    assert [r["run_id"] for r in first] == [r["run_id"] for r in _manifest(tmp_path / "b")]
    token, patch = first
    assert token["run_id"].startswith("n2L64h-d16K-token-s1234-")
    assert patch["run_id"].startswith("n2L64h-d16K-patch-k4-l0.5-s1234-")
    assert patch["stage_tokens"] == {"patch": 8192, "token": 8192}
    assert (tmp_path / "a" / "cells" / f"{patch['run_id']}.yaml").is_file()

    # Edit the spec: drop the patch method, add a budget, change an operational field.
    (tmp_path / "a" / "runs" / token["run_id"]).mkdir(parents=True)  # the token cell started
    edited = json.loads(json.dumps(GRID))
    edited["grids"][0].update(budgets=[16384, 32768], methods=["token"])
    edited["overrides"] = {"checkpoint": {"save_interval": 2}}
    spec_path = write_study(tmp_path / "spec", study_data, edited)
    assert main(["study", "plan", str(spec_path), "--out", str(tmp_path / "a")]) == 0
    rows = _manifest(tmp_path / "a")
    assert [r["run_id"] for r in rows[:2]] == [token["run_id"], patch["run_id"]]
    assert [r["in_spec"] for r in rows] == [True, False, True]
    assert rows[2]["run_id"].startswith("n2L64h-d32K-token-")
    assert rows[0]["config"] == token["config"]  # started: kept as first planned
    assert rows[0]["config"]["checkpoint"]["save_interval"] == 4
    assert rows[2]["config"]["checkpoint"]["save_interval"] == 2
    out = capsys.readouterr().out
    assert "1 new, 1 already started" in out and "1 no longer in the spec" in out


def _bad(tmp_path, study_data, capsys, spec) -> str:
    path = write_study(tmp_path, study_data, spec)
    assert main(["study", "plan", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    return capsys.readouterr().err


def test_unknown_keys_are_refused_with_the_spec_path_and_key(tmp_path, study_data, capsys):
    err = _bad(tmp_path, study_data, capsys, dict(GRID, seeds=[1]))
    assert f"{tmp_path / 'study.yaml'}: unknown key 'seeds'" in err
    bad = json.loads(json.dumps(GRID))
    bad["sizes"]["S"]["hiden_size"] = 64
    assert "study.yaml: sizes.S: unknown key 'hiden_size'" in _bad(
        tmp_path, study_data, capsys, bad
    )
    bad = json.loads(json.dumps(GRID))
    bad["grids"][0]["methods"] = [{"patch": {"K": 4, "lambda": 0.5}}]
    err = _bad(tmp_path, study_data, capsys, bad)
    assert "study.yaml: grids[0].methods[0].patch: unknown key 'lambda'" in err


def test_an_empty_grid_is_refused(tmp_path, study_data, capsys):
    bad = json.loads(json.dumps(GRID))
    bad["grids"][0]["budgets"] = []
    err = _bad(tmp_path, study_data, capsys, bad)
    assert "study.yaml: grids[0].budgets: is empty, so the grid has no cells" in err


def test_a_cell_that_cannot_be_planned_is_named_with_its_field(tmp_path, study_data, capsys):
    bad = json.loads(json.dumps(GRID))
    bad["grids"][0]["methods"] = [{"patch": {"K": 3, "lam": 0.5}}]
    err = _bad(tmp_path, study_data, capsys, bad)
    assert "cell n2L64h-d16K-patch-k3-l0.5-s1234-" in err
    assert "--global-batch-size 16 must be divisible by --patch-size 3" in err
    assert err.count("\n") == 1  # one line


def test_cells_on_different_held_out_sets_are_refused(tmp_path, study_data, capsys):
    bad = json.loads(json.dumps(GRID))
    bad["sizes"]["M"] = {
        "num_layers": 2,
        "hidden_size": 96,
        "num_attention_heads": 3,
        "overrides": {"training": {"eval_samples": 16}},
    }
    bad["grids"][0]["sizes"] = ["S", "M"]
    err = _bad(tmp_path, study_data, capsys, bad)
    assert "would be validated on different held-out sets: training.eval_samples is 8 vs 16" in err


def test_a_budget_larger_than_the_training_split_is_refused(tmp_path, study_data, capsys):
    bad = json.loads(json.dumps(GRID))
    bad["grids"][0]["budgets"] = [16 * 64 * 2000]
    err = _bad(tmp_path, study_data, capsys, bad)
    assert "it would repeat data" in err and "n2L64h-d2000K-token" in err
