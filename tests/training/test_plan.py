"""The stage plan: equal tokens per step, the exact budget, impossible layouts refused."""

from __future__ import annotations

import pytest

from megapatch.config import ConfigError, RunConfig, config_from_dict
from megapatch.training.plan import format_plan, make_plan


def _cfg(k, lam, t, b, tokens, mbs=1, context="KT", **par) -> RunConfig:
    return config_from_dict(
        {
            "data": {"seq_length": t},
            "training": {"train_tokens": tokens, "global_batch_size": b, "micro_batch_size": mbs},
            "stages": {"patch_size": k, "patch_fraction": lam, "patch_context": context},
            "parallel": par,
        }
    )


CASES = [
    (4, 2 / 3, 64, 16, 30),
    (2, 0.5, 128, 8, 17),
    (8, 0.8, 32, 32, 11),
    (4, 1.0, 16, 4, 9),
    (4, 0.0, 64, 16, 5),
    (16, 2 / 3, 8, 16, 7),
]


@pytest.mark.parametrize(
    "k, lam, t, b, steps, context",
    [(*c, "KT") for c in CASES] + [(*c, "T") for c in CASES if c[2] % c[0] == 0],
)
def test_equal_tokens_per_step_and_exact_budget(k, lam, t, b, steps, context):
    tokens = steps * b * t
    plan = make_plan(_cfg(k, lam, t, b, tokens, context=context), world_size=1)
    assert {s.tokens_per_step for s in plan} == {b * t}
    assert sum(s.tokens for s in plan) == tokens
    patch = [s for s in plan if s.name == "patch"]
    assert sum(s.steps for s in patch) == (round(lam * steps) if k > 1 else 0)
    for s in patch:
        if context == "KT":
            assert (s.tokens_per_sample, s.positions, s.global_batch) == (k * t, t, b // k)
        else:
            assert (s.tokens_per_sample, s.positions, s.global_batch) == (t, t // k, b)
    token = [s for s in plan if s.name == "token"]
    assert all((s.tokens_per_sample, s.global_batch, s.patch_size) == (t, b, 1) for s in token)


def test_microbatches_and_bubble():
    plan = make_plan(
        _cfg(4, 0.5, 64, 32, 10 * 32 * 64, mbs=2, pipeline_model_parallel_size=2),
        world_size=4,  # DP 2
    )
    patch, token = plan
    assert patch.num_microbatches == 32 // 4 // (2 * 2) and token.num_microbatches == 32 // 4
    assert patch.bubble_fraction == pytest.approx(1 / (2 + 1))
    assert token.bubble_fraction == pytest.approx(1 / (8 + 1))
    text = format_plan(plan, 4)
    assert "patch" in text and "token" in text and "0.625x" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokens=1000), "whole number of steps"),
        (dict(b=10), "divisible by --patch-size"),
        (dict(mbs=3), "not divisible by --micro-batch-size"),
        (dict(context="T", t=66, tokens=6 * 16 * 66), "--seq-length 66 must be divisible"),
        (dict(lam=1.5), "--patch-fraction"),
        (dict(lam=0.01, tokens=16 * 64 * 2), "rounds to no patch step"),
        # One step cannot be 2/3 patch-level: it would silently become patch-only.
        (dict(tokens=16 * 64), "give 1 patch-level step\\(s\\), a patch share of 1.000"),
        (dict(lam=0.5, tokens=3 * 16 * 64), "patch share of 0.667"),
    ],
)
def test_impossible_plans_are_refused(kwargs, match):
    args = dict(k=4, lam=2 / 3, t=64, b=16, tokens=30 * 16 * 64, mbs=1)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        make_plan(_cfg(**args), world_size=1)


def test_the_plan_states_the_patch_share_it_achieves():
    from megapatch.training.plan import patch_share

    plan = make_plan(_cfg(k=4, lam=2 / 3, t=64, b=16, tokens=16 * 16 * 64, mbs=1), 1)
    assert [s.steps for s in plan] == [11, 5]  # round(2/3 * 16)
    assert patch_share(plan) == 11 / 16
    assert "patch share λ = 0.688" in format_plan(plan, 1)


@pytest.mark.parametrize(
    "recipe, world",
    [
        ("tiny_cpu", 1),
        ("paper_370m", 8),
        ("paper_780m", 8),
        ("paper_1p3b", 8),
        ("paper_2p7b", 8),
        ("llama2_7b", 64),
    ],
)
def test_shipped_recipes_have_valid_plans(recipe, world):
    from pathlib import Path

    from megapatch.config import load_yaml

    path = Path(__file__).resolve().parents[2] / "examples" / f"{recipe}.yaml"
    cfg = load_yaml(str(path))
    cfg.model.validate()
    cfg.parallel.validate(cfg.model)
    plan = make_plan(cfg, world)
    assert sum(s.tokens for s in plan) == cfg.training.train_tokens
    assert len({s.tokens_per_step for s in plan}) == 1
