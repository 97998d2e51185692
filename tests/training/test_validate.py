"""Bad configurations and flags: each refused with one clear error before anything is built."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from megapatch.config import ConfigError, config_from_dict
from megapatch.training.validate import validate_config
from tests.training.conftest import tiny_run

BAD = [
    # (id, sections to override, world size, expected message)
    ("budget", dict(training=dict(train_tokens=1000)), 1, "whole number of steps"),
    (
        "batch-vs-K",
        dict(training=dict(global_batch_size=18, train_tokens=18 * 64 * 10)),
        1,
        "divisible by --patch-size",
    ),
    ("micro-batch", dict(training=dict(micro_batch_size=3)), 1, "--micro-batch-size"),
    ("lambda", dict(stages=dict(patch_fraction=1.2)), 1, "--patch-fraction"),
    ("sp-without-tp", dict(parallel=dict(sequence_parallel=True)), 1, "--sequence-parallel"),
    ("tp-heads", dict(parallel=dict(tensor_model_parallel_size=8)), 8, "--num-attention-heads"),
    ("pp-layers", dict(parallel=dict(pipeline_model_parallel_size=3)), 3, "--num-layers"),
    ("world", dict(parallel=dict(tensor_model_parallel_size=2)), 3, "not divisible"),
    ("fp8-no-te", dict(precision=dict(fp8_format="hybrid", bf16=True)), 1, "Transformer Engine"),
    ("fp8-no-bf16", dict(precision=dict(fp8_format="hybrid")), 1, "--bf16"),
    ("te-missing", dict(precision=dict(transformer_impl="transformer_engine")), 1, "import"),
    ("mtp", dict(model=dict(mtp_num_layers=1)), 1, "--mtp-num-layers"),
    ("min-lr", dict(optimizer=dict(min_lr=1.0)), 1, "--min-lr"),
    ("warmup", dict(optimizer=dict(lr_warmup_iters=50)), 1, "--lr-warmup-iters"),
    ("eval-samples", dict(training=dict(eval_samples=7)), 1, "--eval-samples"),
    ("recompute", dict(training=dict(recompute_method="uniform")), 1, "--recompute-method"),
    ("save-interval", dict(checkpoint=dict(save_interval=0)), 1, "--save-interval"),
    ("no-data", dict(data=dict(data_path=["no/such/prefix"])), 1, "not found"),
    ("vocab", dict(model=dict(vocab_size=100)), 1, "--vocab-size"),
    ("load", dict(checkpoint=dict(load="no/such/ckpt")), 1, "--load"),
    (
        "vpp-microbatches",
        dict(
            parallel=dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
            training=dict(micro_batch_size=4),
        ),
        2,
        "multiple of --pipeline-model-parallel-size",
    ),
    (
        "learned-positions",
        dict(model=dict(position_embedding_type="learned_absolute", max_position_embeddings=32)),
        1,
        "--max-position-embeddings",
    ),
    (
        "sp-shape",
        dict(
            parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True),
            data=dict(seq_length=63),
            training=dict(train_tokens=16 * 63 * 16),
        ),
        2,
        "63 positions, not a multiple of 2 as --tensor-model-parallel-size 2 with --sequence",
    ),
    (
        "sp-patch-eval",
        dict(
            parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True),
            data=dict(seq_length=4),
            training=dict(train_tokens=16 * 4 * 16),
        ),
        2,
        "patch-level validation \\(K=4\\) fits 0 patches",
    ),
    (
        "T-context",
        dict(
            stages=dict(patch_context="T", patch_size=3),
            training=dict(global_batch_size=18, train_tokens=18 * 64 * 6),
        ),
        1,
        "--seq-length 64 must be divisible",
    ),
]


@pytest.mark.parametrize("sections, world, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_is_refused(data_prefix, tmp_path, sections, world, match):
    cfg = tiny_run(data_prefix, str(tmp_path / "run"), **sections)
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg, world)
    assert not (tmp_path / "run").exists(), "nothing may be written before validation passes"


def test_planning_checks_shapes_but_not_this_machine(data_prefix, tmp_path):
    """runtime=False: FP8 without Transformer Engine and absent data plan fine, but a shape
    FP8 cannot run (15 validation patches, not a multiple of 16) is refused, naming the flag."""
    from megapatch.config import load_yaml

    fp8 = dict(precision=dict(fp8_format="hybrid", bf16=True))
    cfg = tiny_run(data_prefix, str(tmp_path / "run"), **fp8)
    with pytest.raises(ConfigError, match="Transformer Engine"):
        validate_config(cfg, 1)
    with pytest.raises(ConfigError, match="fits 15 patches .* --fp8-format"):
        validate_config(cfg, 1, runtime=False)
    ok = tiny_run(data_prefix, str(tmp_path / "run"), data=dict(seq_length=128, data_path=["x"]))
    ok.precision.fp8_format, ok.precision.bf16 = "hybrid", True
    ok.training.train_tokens = 16 * 128 * 16
    assert [s.steps for s in validate_config(ok, 1, runtime=False)] == [11, 5]
    seven_b = load_yaml("examples/llama2_7b.yaml")
    plan = validate_config(seven_b, 16, runtime=False)
    assert [(s.name, s.positions, s.global_batch) for s in plan] == [
        ("patch", 4096, 128),
        ("token", 4096, 512),
    ]


def test_the_tiny_run_itself_is_valid(data_prefix, tmp_path):
    plan = validate_config(tiny_run(data_prefix, str(tmp_path / "run")), 1)
    assert [s.steps for s in plan] == [11, 5]


@pytest.mark.parametrize(
    "raw, match",
    [({"modle": {}}, "unknown section 'modle'"), ({"model": {"layers": 2}}, "unknown field")],
)
def test_unknown_yaml_keys_are_refused(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_yaml_values_are_typed_by_their_fields(tmp_path):
    """YAML reads 3e-3 and 1e6 as strings: coerced by the field's type; nonsense refused
    naming the file, the key and the type."""
    from megapatch.config import load_yaml

    good = tmp_path / "good.yaml"
    good.write_text(
        "optimizer: {lr: 3e-3, weight_decay: 1e-1}\ntraining: {train_tokens: 1e6}\n"
        "data: {data_path: some/prefix, seq_length: 64.0}\n"
    )
    cfg = load_yaml(str(good))
    assert cfg.optimizer.lr == 0.003 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.weight_decay == 0.1
    assert cfg.training.train_tokens == 1_000_000 and isinstance(cfg.training.train_tokens, int)
    assert cfg.data.data_path == ["some/prefix"] and cfg.data.seq_length == 64
    for text, match in [
        ("optimizer: {lr: fast}", "bad.yaml: optimizer.lr: expected a number, got 'fast'"),
        ("training: {train_tokens: 2.5}", "training.train_tokens: expected an integer"),
        ("training: {global_batch_size: true}", "global_batch_size: expected an integer"),
        ("parallel: {sequence_parallel: 'yes'}", "sequence_parallel: expected true or false"),
        ("stages: {stage_boundary: restart}", "'restart' is not one of reset, continue"),
        ("optimizer: {lr: .inf}", "optimizer.lr: expected a number"),
        ("model: {num_layers: null}", "model.num_layers: a value is required"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text + "\n")
        with pytest.raises(ConfigError, match=match.replace("(", "\\(")):
            load_yaml(str(bad))


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--data-path", "a", "--data-path", "b"], "--data-path given twice"),
        (["--use-distributed-optimizer", "--no-use-distributed-optimizer"], "given twice"),
        (["--patch-s", "2"], "unrecognized arguments: --patch-s"),  # no abbreviations
        (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
    ],
)
def test_ambiguous_command_lines_are_refused(argv, match, capsys):
    from megapatch.cli import main

    with pytest.raises(SystemExit) as err:
        main(["train", "--dry-run", *argv])
    assert err.value.code == 2
    assert match in capsys.readouterr().err


def test_numbers_on_the_command_line_accept_exponents():
    from megapatch.cli import build_parser
    from megapatch.config import config_from_args

    args = build_parser().parse_args(["train", "--train-tokens", "1e6", "--lr", "3e-3"])
    cfg = config_from_args(args)
    assert cfg.training.train_tokens == 1_000_000 and cfg.optimizer.lr == 0.003


def test_cli_reports_one_line_and_exit_code_2(data_prefix, tmp_path):
    start = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "megapatch.cli",
            "train",
            "--data-path",
            data_prefix,
            "--vocab-size",
            "512",
            "--train-tokens",
            "1000",
            "--run-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--train-tokens 1000" in errors[0]
    assert not (tmp_path / "r").exists()
    assert time.monotonic() - start < 60


def _fake_checkpoint(path, **meta):
    import json

    path.mkdir(parents=True)
    body = dict(format_version=1, complete=True, step=0, files={}, **meta)
    (path / "megapatch.json").write_text(json.dumps(body))
    return str(path)


def test_load_with_other_vocab_padding_points_to_reshard(data_prefix, tmp_path):
    _fake_checkpoint(tmp_path / "ck" / "iter_0000000", padded_vocab_size=1024)  # a root: latest
    cfg = tiny_run(data_prefix, str(tmp_path / "run"), checkpoint=dict(load=str(tmp_path / "ck")))
    with pytest.raises(ConfigError, match="megapatch convert reshard"):
        validate_config(cfg, 1)


def test_load_with_other_architecture_is_refused(data_prefix, tmp_path):
    ckpt = _fake_checkpoint(
        tmp_path / "ck2", padded_vocab_size=512, model=dict(num_layers=8, hidden_size=64)
    )
    cfg = tiny_run(data_prefix, str(tmp_path / "run"), checkpoint=dict(load=ckpt))
    with pytest.raises(ConfigError, match="num_layers=8"):
        validate_config(cfg, 1)
