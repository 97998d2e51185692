"""The FLOP function against an independent count: torch's FlopCounterMode over a real
forward+backward of PatchGPTModel (token and patch level)."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from megapatch.model import build_model
from megapatch.runtime import distributed as D
from megapatch.training.flops import flops_per_step, peak_tflops
from tests.helpers import fp32, make_samples, parallel, tiny_model


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("swiglu", [True, False])
def test_flop_formula_matches_counted_matmuls(single_rank, k, swiglu):
    cfg = tiny_model(swiglu=swiglu, num_query_groups=2)
    D.set_random_seeds(0)
    [model] = build_model(cfg, parallel(), fp32(), patch_size=k)
    b, t = 3, 32
    d = make_samples(b, k, t, cfg.vocab_size)
    with FlopCounterMode(display=False) as counter:
        model(d["tokens"], d["position_ids"], None, labels=d["labels"]).sum().backward()
    counted = counter.get_total_flops()
    vocab = cfg.padded_vocab_size(1)
    formula = flops_per_step(cfg, b, t, vocab)
    # The local attention computes the full score matrix and masks it: add the masked half
    # (12 * B * s * L * h^2 * s/(2h) * q_ratio with q_ratio = 1 here) to the causal count.
    full_attention = formula + 12 * b * t * cfg.num_layers * cfg.hidden_size**2 * t / (
        2 * cfg.hidden_size
    )
    assert counted == pytest.approx(full_attention, rel=1e-9)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", fp8=True) == 1979.0
    assert peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert peak_tflops("cpu") is None
