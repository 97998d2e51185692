"""Stage arithmetic and the batch sampler (pure; no files, no megatron)."""

from __future__ import annotations

import itertools
import random

import pytest

from megapatch.data.config import DataError
from megapatch.data.sampler import PretrainingBatchSampler
from megapatch.data.stages import StageSpec, plan_stages, stage_specs_from_budget


def test_plan_lays_stages_back_to_back():
    rng = random.Random(0)
    for _ in range(50):
        specs = []
        for _ in range(rng.randint(1, 4)):
            k = rng.choice([1, 2, 4, 8])
            specs.append(StageSpec(k, k * rng.randint(1, 64), rng.randint(0, 500)))
        windows = plan_stages(specs)
        covered = []
        for w, spec in zip(windows, specs):
            starts = [w.sample_start(i) for i in range(spec.num_samples)]
            for s in starts:  # each sample's inputs, token by token
                covered += range(s, s + spec.tokens_per_sample_input)
            assert w.end - w.start == spec.num_samples * spec.tokens_per_sample_input
            assert w.read_end == w.end + (spec.patch_size if spec.num_samples else 0)
        assert covered == list(range(windows[-1].end))  # no gap, no overlap, in order
        assert [w.start for w in windows[1:]] == [w.end for w in windows[:-1]]


@pytest.mark.parametrize(
    ("k", "lam", "t", "gb"),
    list(itertools.product([1, 2, 4, 8], [0.0, 0.5, 2 / 3, 0.8, 1.0], [16, 128], [8, 32])),
)
def test_budget_split(k, lam, t, gb):
    budget = 1_000_003
    patch, token = stage_specs_from_budget(budget, lam, k, t, gb)
    assert (patch.patch_size, patch.tokens_per_sample_input) == (k, k * t)
    assert (token.patch_size, token.tokens_per_sample_input) == (1, t)
    patch_step, token_step = (gb // k) * k * t, gb * t
    assert patch_step == token_step  # tokens per optimizer step stay constant
    assert patch.num_samples % (gb // k) == 0 and token.num_samples % gb == 0
    assert lam * budget - patch_step < patch.tokens_consumed <= lam * budget + 1e-6
    assert 0 <= budget - patch.tokens_consumed - token.tokens_consumed < token_step
    windows = plan_stages([patch, token])
    assert windows[1].start == windows[0].end == patch.tokens_consumed


def test_budget_with_explicit_patch_batch_and_errors():
    patch, _ = stage_specs_from_budget(10_000, 0.5, 4, 10, 6, patch_global_batch_size=3)
    assert patch.num_samples == 3 * (5_000 // (3 * 40))
    with pytest.raises(DataError, match="global batch 6 is not divisible by patch size 4"):
        stage_specs_from_budget(10_000, 0.5, 4, 10, 6)
    with pytest.raises(DataError, match=r"patch fraction 1.5 must lie in \[0, 1\]"):
        stage_specs_from_budget(10_000, 1.5, 4, 10, 8)
    with pytest.raises(DataError, match="not a multiple of its patch size 4"):
        StageSpec(4, 10, 1)


@pytest.mark.parametrize(("mbs", "dp"), [(1, 1), (2, 1), (3, 2), (2, 4)])
def test_sampler_partitions_and_resumes(mbs, dp):
    total = 103
    runs = {r: list(PretrainingBatchSampler(total, 0, mbs, r, dp)) for r in range(dp)}
    steps = total // (mbs * dp)
    assert all(len(b) == steps for b in runs.values())
    for step in range(steps):  # rank r gets the r-th slice of each global batch, in order
        global_batch = [i for r in range(dp) for i in runs[r][step]]
        assert global_batch == list(range(step * mbs * dp, (step + 1) * mbs * dp))
    for n in range(0, steps * mbs * dp + 1, mbs * dp):
        for r in range(dp):
            resumed = list(PretrainingBatchSampler(total, n, mbs, r, dp))
            assert resumed == runs[r][n // (mbs * dp) :]
            assert len(PretrainingBatchSampler(total, n, mbs, r, dp)) == len(resumed)


def test_sampler_resume_mid_global_batch_equals_skipping():
    ref = [i for b in PretrainingBatchSampler(50, 0, 1, 0, 1) for i in b]
    for n in range(50):
        assert [i for b in PretrainingBatchSampler(50, n, 1, 0, 1) for i in b] == ref[n:]


def test_sampler_errors():
    with pytest.raises(DataError, match="consumed samples 11 outside"):
        PretrainingBatchSampler(10, 11, 1)
    with pytest.raises(DataError, match="data-parallel rank 2 not in"):
        PretrainingBatchSampler(10, 0, 1, 2, 2)
