"""The multi-token loss against the official formula, autograd, and megatron's own CE."""

from __future__ import annotations

import pytest
import torch

from megapatch.model.patch_loss import vocab_parallel_multi_token_cross_entropy as mtce


def _reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Official code: log_softmax once, NLL of each of the K targets."""
    return -torch.log_softmax(logits.float(), dim=-1).gather(-1, targets)


def _case(k: int, seed: int = 0, dtype=torch.float32, v: int = 97):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(5, 3, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (5, 3, k), generator=g)
    weights = torch.rand(5, 3, k, generator=g)
    return logits, targets, weights


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_loss_and_grad_equal_reference(k):
    logits, targets, weights = _case(k, seed=k)
    targets[..., -1] = targets[..., 0]  # a token repeated inside each patch
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    got = mtce(a, targets)
    ref = _reference(b, targets)
    assert got.shape == (5, 3, k) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_repeated_targets_accumulate():
    v, k = 11, 4
    logits = torch.randn(2, 1, v, requires_grad=True)
    targets = torch.full((2, 1, k), 3)
    mtce(logits, targets).sum().backward()
    expect = torch.softmax(logits.detach(), -1) * k
    expect[..., 3] -= k
    torch.testing.assert_close(logits.grad, expect, rtol=0, atol=1e-6)


def test_masked_patch_has_zero_gradient():
    logits, targets, _ = _case(4)
    logits.requires_grad_()
    mask = torch.ones(5, 3, 4)
    mask[2, 1] = 0.0  # every target of this patch position masked
    mask[0, 0, :2] = 0.0  # and half of another
    (mtce(logits, targets) * mask).sum().backward()
    assert torch.count_nonzero(logits.grad[2, 1]) == 0
    assert torch.count_nonzero(logits.grad[0, 0]) > 0


def test_masked_targets_contribute_nothing_to_the_loss():
    logits, targets, _ = _case(4, seed=3)
    mask = torch.ones(5, 3, 4)
    mask[1] = 0
    changed = targets.clone()
    changed[1] = (changed[1] + 5) % 97  # different targets where masked
    a = (mtce(logits, targets) * mask).sum()
    b = (mtce(logits, changed) * mask).sum()
    assert torch.equal(a, b)


def test_caller_logits_never_modified():
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets, _ = _case(4, dtype=dtype)
        before = logits.clone()
        x = logits.requires_grad_()
        mtce(x, targets).sum().backward()
        assert torch.equal(x.detach(), before), dtype
        assert x.grad.dtype == dtype


def test_bf16_logits_match_fp32_math():
    logits, targets, weights = _case(4, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    ref_in = logits.float().requires_grad_()
    got = mtce(x, targets)
    ref = _reference(ref_in, targets)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # fp32 math on bf16 inputs
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(x.grad.float(), ref_in.grad, rtol=1e-2, atol=1e-3)


def test_k1_equals_megatron_vocab_parallel_cross_entropy(single_rank):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, targets, weights = _case(1, seed=4)
    a = logits.clone().requires_grad_()
    ours = mtce(a, targets)[..., 0]
    (ours * weights[..., 0]).sum().backward()
    b = logits.clone().requires_grad_()
    theirs = vocab_parallel_cross_entropy(b.clone(), targets[..., 0])  # it mutates fp32 input
    (theirs * weights[..., 0]).sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_bad_shapes_are_refused():
    logits = torch.randn(4, 2, 10)
    with pytest.raises(ValueError, match="leading shape"):
        mtce(logits, torch.zeros(4, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        mtce(logits, torch.zeros(4, 2, 2))


def test_reusing_temporary_logits_gives_the_same_gradient():
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets, weights = _case(4, seed=11, dtype=dtype)
        a = logits.clone().requires_grad_()
        (mtce(a, targets) * weights).sum().backward()
        b = logits.clone().requires_grad_()
        loss = mtce(b * 1, targets, logits_are_temporary=True)  # b*1: a temporary, like the model's
        (loss * weights).sum().backward()
        assert torch.equal(a.grad, b.grad), dtype
