"""The tiny two-stage run of the training tests (its data: ``data_prefix`` in tests/conftest.py)."""

from __future__ import annotations

import pytest

from megapatch.config import RunConfig, config_from_dict


def tiny_run(data_prefix: str, run_dir: str, **sections) -> RunConfig:
    """A tiny two-stage run: 16 steps of 1024 tokens (11 patch steps, then 5 token steps)."""
    raw = {
        "run_dir": run_dir,
        "model": dict(
            num_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=512,
            make_vocab_size_divisible_by=64,
        ),
        "data": dict(data_path=[data_prefix], seq_length=64, split="90,10,0", num_workers=0),
        "training": dict(
            train_tokens=16 * 1024,
            global_batch_size=16,
            micro_batch_size=2,
            eval_interval=8,
            eval_samples=8,
            log_interval=4,
        ),
        "stages": dict(patch_size=4, patch_fraction=2 / 3),
        "optimizer": dict(lr=3e-3, min_lr=3e-4, lr_warmup_iters=2),
        "checkpoint": dict(save_interval=4),
        "logging": dict(tensorboard=False, plot=False, progress="off"),
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture(scope="session")
def full_tp1(data_prefix, tmp_path_factory):
    """The uninterrupted tiny run at TP1: (run dir, losses by step, stdout)."""
    from tests.training.runs import check, launch, losses

    run_dir = str(tmp_path_factory.mktemp("full") / "tp1")
    proc = launch(tiny_run(data_prefix, run_dir))
    check(proc)
    return run_dir, losses(run_dir), proc.stdout
