"""Config dataclasses <-> Megatron-style flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megapatch.data.config import (
    DataConfig,
    PreprocessConfig,
    TrainTokenizerConfig,
    add_arguments,
    from_args,
)


@pytest.mark.parametrize("cls", [DataConfig, PreprocessConfig, TrainTokenizerConfig])
def test_every_field_has_help_and_defaults_round_trip(cls):
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    assert from_args(cls, parser.parse_args([])) == cls()


def test_megatron_style_flags_parse_into_the_dataclass():
    parser = argparse.ArgumentParser()
    add_arguments(parser, DataConfig, skip=("num_workers",))
    args = parser.parse_args(
        ["--data-path", "0.3", "a", "0.7", "b", "--split", "98,2,0", "--seed", "7"]
        + ["--seq-length", "512", "--eod-mask-loss", "--data-cache-path", "c"]
    )
    cfg = from_args(DataConfig, args)
    assert cfg == DataConfig(
        data_path=["0.3", "a", "0.7", "b"],
        split="98,2,0",
        seed=7,
        seq_length=512,
        eod_mask_loss=True,
        data_cache_path="c",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--num-workers", "3"])  # skipped fields get no flag
    pre = argparse.ArgumentParser()
    add_arguments(pre, PreprocessConfig)
    assert pre.parse_args(["--no-append-eod", "--workers", "4"]).append_eod is False
    with pytest.raises(SystemExit):
        pre.parse_args(["--text-docs", "sentence"])  # choices are enforced
