"""`megapatch plan`: a 7B H100 run planned on a machine with no GPU and no Transformer Engine.

The numbers are checked against independent references: the FLOP count of the one FLOP
function times the steps, step time = FLOPs / (peak x efficiency), GPU-hours = wall x GPUs,
and the memory terms' sum (the terms themselves are checked against Megatron-LM's formula and
against measured tensors in test_estimate_*.py).
"""

from __future__ import annotations

import json

import pytest

from megapatch.cli import main
from megapatch.config import load_yaml
from megapatch.model.specs import transformer_engine_available
from megapatch.training.flops import PEAK_TFLOPS, flops_per_step

SEVEN_B = ["--config", "examples/llama2_7b.yaml"]


def _plan(capsys, *argv):
    try:
        code = main(["plan", *SEVEN_B, *argv])
    except SystemExit as err:
        code = err.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_7b_recipe_plans_here_without_te(capsys, tmp_path):
    assert not transformer_engine_available()  # the point: no TE on this machine
    path = tmp_path / "plan.json"
    code, out, err = _plan(capsys, "--nodes", "2", "--gpus-per-node", "8", "--json", str(path))
    assert code == 0, err
    for line in ("TP 2, PP 1, VPP -, DP 8, SP on", "activations per micro-batch", "peak", "MFU"):
        assert line in out
    report = json.loads(path.read_text())
    cfg = load_yaml("examples/llama2_7b.yaml")
    peak = PEAK_TFLOPS["H100"]["fp8"] * 1e12 * 0.35  # the stated default efficiency under FP8
    total_flops, wall = 0.0, 0.0
    for stage in report["stages"]:
        step_flops = flops_per_step(cfg.model, stage["global_batch"], stage["positions"], 32000)
        time = stage["time"]
        assert time["step_seconds"] == pytest.approx(step_flops / 16 / peak, rel=1e-9)
        assert time["mfu"] == pytest.approx(0.35)
        assert time["gpu_hours"] == pytest.approx(time["wall_seconds"] * 16 / 3600, rel=1e-9)
        total_flops += step_flops * stage["steps"]
        wall += time["wall_seconds"]
        mem = stage["memory"]
        parts = mem["model_state"] + mem["activations_in_flight"] + mem["reserve"]
        assert mem["peak"] == pytest.approx(parts + sum(mem["transient"].values()))
        assert mem["fits"] and mem["peak"] < 80 * 2**30
    assert report["total"]["flops"] == pytest.approx(total_flops, rel=1e-9)
    assert report["total"]["wall_seconds"] == pytest.approx(wall, rel=1e-9)
    # Half the FLOPs and half the GPU-hours of the token-level baseline (K=4, λ=2/3).
    assert report["total"]["compute_vs_token_level"] == pytest.approx(0.5, abs=1e-5)
    assert report["total"]["gpu_hours"] / report["baseline"]["gpu_hours"] == pytest.approx(
        0.5, abs=1e-5
    )


def test_a_layout_that_does_not_fit_is_warned_about(capsys):
    code, out, err = _plan(
        capsys, "--nodes", "1", "--gpus-per-node", "1", "--tensor-model-parallel-size", "1",
        "--no-sequence-parallel", "--no-use-distributed-optimizer",
    )  # fmt: skip
    assert code == 0
    text = out + err
    assert "WARNING: the patch stage needs ~" in text and "more than the 80 GiB" in text
    assert "--use-distributed-optimizer" in text  # the fix is named
    code, out, err = _plan(capsys, "--nodes", "2", "--gpus-per-node", "8",
                           "--gpu-memory-gib", "24")  # fmt: skip
    assert code == 0 and "more than the 24 GiB" in out + err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--nodes", "2", "--gpus-per-node", "8", "--gpu", "X100"], "--gpu X100: unknown GPU"),
        (["--nodes", "1", "--gpus-per-node", "3"], "3 GPUs are not divisible"),
        (
            [
                "--nodes",
                "2",
                "--gpus-per-node",
                "8",
                "--seq-length",
                "4040",
                "--train-tokens",
                str(512 * 4040 * 3000),
                "--lr-warmup-iters",
                "10",
            ],
            "4040 positions, not a multiple of 32",
        ),  # fmt: skip
        (["--nodes", "2", "--gpus-per-node", "8", "--efficiency", "1.5"], "--efficiency"),
    ],
)
def test_bad_plans_are_refused_naming_the_flag(capsys, argv, match):
    code, out, err = _plan(capsys, *argv)
    assert code == 2 and match in err
