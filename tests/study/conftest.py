"""A tiny real dataset and a tiny base recipe for the study tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.slurm.conftest import local_slurm  # noqa: F401  (the one-node Slurm fixture)


@pytest.fixture(scope="session")
def study_data(tmp_path_factory) -> str:
    """The embedded pydoc topics under a 512-piece tokenizer (~0.2M tokens)."""
    from megapatch.data.config import PreprocessConfig, TrainTokenizerConfig
    from megapatch.data.preprocess import preprocess
    from megapatch.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("study_data")
    model = train_tokenizer(
        TrainTokenizerConfig(
            input=["embedded:topics"],
            output_prefix=str(root / "spm"),
            vocab_size=512,
            max_train_chars=150_000,
        ),
        report=lambda msg: None,
    ).model_path
    prefix = str(root / "topics")
    preprocess(
        PreprocessConfig(input=["embedded:topics"], output_prefix=prefix, tokenizer_model=model),
        report=lambda msg: None,
    )
    return prefix


BASE = {
    "model": dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        ffn_hidden_size=128,
        vocab_size=512,
        make_vocab_size_divisible_by=64,
    ),
    "data": dict(seq_length=64, split="90,10,0", num_workers=0),
    "training": dict(
        global_batch_size=16,
        micro_batch_size=4,
        eval_interval=1000,
        eval_samples=8,
        log_interval=8,
    ),
    "stages": dict(patch_size=4, patch_fraction=0.5),
    "optimizer": dict(lr=3e-3, min_lr=3e-4, lr_warmup_iters=2),
    "checkpoint": dict(save_interval=4, keep_last=1),
    "logging": dict(tensorboard=False, plot=False, progress="off"),
}


def write_study(root: Path, data_path: str, spec: dict) -> Path:
    """base.yaml (the tiny recipe on ``data_path``) and study.yaml (``spec``) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    base = {k: dict(v) for k, v in BASE.items()}
    base["data"]["data_path"] = [data_path]
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(dict({"base": "base.yaml"}, **spec), sort_keys=False))
    return path
