"""The CPU shims: version gate, CUDA-free device mapping, the CPU RNG tracker."""

from __future__ import annotations

import pytest
import torch

from megapatch.runtime import cpu_compat


def test_other_megatron_versions_are_refused():
    with pytest.raises(RuntimeError, match="pip install megatron-core==0.16.1"):
        cpu_compat.check_mcore_version("0.17.0")
    cpu_compat.check_mcore_version("0.16.1")


def test_shims_stay_off_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(cpu_compat, "cuda_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_installed", False)
    called = []
    monkeypatch.setattr(cpu_compat, "_patch_torch_cuda", lambda: called.append(1))
    assert cpu_compat.install() is False
    assert not called


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims only exist without CUDA")
def test_cuda_device_requests_land_on_cpu(single_rank):
    assert cpu_compat.installed()
    x = torch.zeros(3, device="cuda")
    assert x.device.type == "cpu"
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims only exist without CUDA")
def test_device_contexts_still_apply_to_the_patched_factories(single_rank):
    # transformers builds models under torch.device("meta") and then materialises them; with
    # the device context ignored, its non-persistent buffers (RoPE inv_freq) held garbage.
    assert cpu_compat.installed()
    with torch.device("meta"):
        assert torch.empty(3).device.type == "meta"
        assert torch.arange(4).device.type == "meta"
        assert torch.nn.Linear(2, 2).weight.device.type == "meta"
    assert torch.empty(3).device.type == "cpu"


def test_rng_tracker_forks_and_restores_the_cpu_generator():
    tracker = cpu_compat.CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outer_first = torch.rand(1)
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(1)
    assert torch.equal(torch.rand(1), outer_first)  # outer stream untouched
    with tracker.fork():
        b = torch.rand(1)
    expected = torch.Generator().manual_seed(123)
    assert torch.equal(a, torch.rand(1, generator=expected))
    assert torch.equal(b, torch.rand(1, generator=expected))  # the tracked stream advanced
    with pytest.raises(RuntimeError, match="already exists"):
        tracker.add("other", 123)
