"""Session fixtures shared by the test packages."""

from __future__ import annotations

import os

import pytest

RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def _no_rendezvous_left_behind():
    """No test leaves torch rendezvous variables in this process's environment: every process
    started later (trainers, converters, sbatch jobs) would inherit one MASTER_PORT."""
    before = {k: os.environ.get(k) for k in RENDEZVOUS}
    yield
    after = {k: os.environ.get(k) for k in RENDEZVOUS}
    assert after == before, f"the test changed os.environ's rendezvous variables: {after}"


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed (1 gloo rank) + megatron parallel state TP1/PP1 in this process.

    Installs the CPU shims (only without CUDA). Tests that change the layout must restore it.
    """
    from megapatch.runtime import distributed as D

    D.init_process_group()
    D.initialize_model_parallel(D.ParallelLayout())
    yield


@pytest.fixture(scope="session")
def data_prefix(tmp_path_factory) -> str:
    """A small real dataset (the pydoc topics, a 512-piece tokenizer) shared by the training,
    study and Slurm tests."""
    from megapatch.data.config import PreprocessConfig, TrainTokenizerConfig
    from megapatch.data.preprocess import preprocess
    from megapatch.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("train_data")
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
