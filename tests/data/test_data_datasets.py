"""Stage datasets on the planned stream, checked against raw sentencepiece token streams."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from megapatch.data.config import DataConfig, DataError, PreprocessConfig, TrainTokenizerConfig
from megapatch.data.corpus import iter_documents, resolve_sources
from megapatch.data.datasets import build_stage_datasets
from megapatch.data.preprocess import preprocess
from megapatch.data.sampler import build_data_loader
from megapatch.data.stages import StageSpec, stage_specs_from_budget
from megapatch.data.stream import DocumentStreamDataset
from megapatch.data.tokenizer import train_tokenizer
from tests.data.conftest import write_jsonl

SPLIT = "90,10,0"


@pytest.fixture(scope="module")
def data(tmp_path_factory, spm_model, sp):
    """Prefix A (the 79 pydoc topics), prefix B (the same texts upper-cased), references."""
    root = tmp_path_factory.mktemp("data")
    texts = [d.text for d in iter_documents(resolve_sources(["embedded:topics"]))]
    write_jsonl(root / "upper.jsonl", [{"text": t.upper()} for t in texts])
    for name, inp in (("a", "embedded:topics"), ("b", str(root / "upper.jsonl"))):
        cfg = PreprocessConfig(
            input=[inp], output_prefix=str(root / name), tokenizer_model=spm_model
        )
        preprocess(cfg, report=lambda msg: None)
    n_train = int(round(0.9 * len(texts)))  # megatron splits documents in index order
    docs = [np.array(sp.encode(t) + [sp.eos_id()]) for t in texts]
    return {
        "root": root,
        "a": str(root / "a"),
        "b": str(root / "b"),
        "docs": docs,
        "n_train": n_train,
    }


def _config(data, **kw) -> DataConfig:
    kw.setdefault("data_path", [data["a"]])
    kw.setdefault("data_cache_path", str(data["root"] / "cache"))
    return DataConfig(split=SPLIT, **kw)


def _reference(data, mid: DocumentStreamDataset) -> np.ndarray:
    """The stream rebuilt from sentencepiece's own ids in the dataset's document order."""
    return np.concatenate([data["docs"][d] for d in mid.document_index])


def _inputs(dataset) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.int64)] + [d["tokens"].numpy() for d in dataset])


def _inputs_in_window_order(dataset) -> np.ndarray:
    """The stage's inputs laid back in stream order (undoing the sample shuffle)."""
    by_window = sorted(range(len(dataset)), key=dataset.window_index)
    assert [dataset.window_index(i) for i in by_window] == list(range(len(dataset)))
    return np.concatenate(
        [np.zeros(0, np.int64)] + [dataset[i]["tokens"].numpy() for i in by_window]
    )


def test_train_stream_is_per_epoch_shuffled_whole_train_documents(data):
    budget = 3 * sum(len(d) for d in data["docs"][: data["n_train"]])  # about 3 epochs
    built = build_stage_datasets(_config(data, seq_length=64), [StageSpec(1, 64, budget // 64)])
    mid = built.train_stream.datasets[0]
    n = data["n_train"]
    epochs = np.asarray(mid.document_index).reshape(-1, n)
    assert len(epochs) >= 3
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # every train document once, no valid document
    assert len({tuple(e) for e in epochs}) == len(epochs)  # a fresh order each epoch
    ref = _reference(data, mid)
    assert np.array_equal(built.train_stream.read(0, budget), ref[:budget])
    # The stream does not depend on how much of it is requested (nor on T).
    small = build_stage_datasets(
        _config(data, seq_length=48, data_cache_path=str(data["root"] / "small")),
        [StageSpec(4, 192, 20)],
    )
    assert np.array_equal(small.train_stream.read(0, 20 * 192 + 4), ref[: 20 * 192 + 4])


@pytest.mark.parametrize(
    ("k", "lam", "t", "gb"),
    [(4, 2 / 3, 32, 16), (2, 0.5, 64, 8), (8, 0.8, 16, 32), (1, 0.0, 48, 4), (4, 1.0, 24, 8)],
)
def test_stages_take_the_stream_prefix_exactly(data, k, lam, t, gb):
    budget = 250_000  # more than one epoch of the train split
    stages = stage_specs_from_budget(budget, lam, k, t, gb)
    built = build_stage_datasets(_config(data, seq_length=t), stages, valid_samples=3)
    ref = _reference(data, built.train_stream.datasets[0])
    patch_w, token_w = built.windows
    assert patch_w.start == 0 and token_w.start == patch_w.end
    assert patch_w.end == stages[0].num_samples * k * t
    assert token_w.end - token_w.start == stages[1].num_samples * t
    # Samples are shuffled within each stage, and each stage reads exactly its own windows.
    consumed = np.concatenate([_inputs_in_window_order(d) for d in built.train])
    assert len(consumed) == token_w.end <= budget
    assert np.array_equal(consumed, ref[: token_w.end])  # no gap, no overlap
    for dataset, w in zip(built.train, built.windows):
        spec = w.spec
        for i in (0, len(dataset) // 2, len(dataset) - 1)[: len(dataset)]:
            s = w.start + dataset.window_index(i) * spec.tokens_per_sample_input
            assert np.array_equal(
                dataset[i]["labels"].numpy(),
                ref[s + spec.patch_size :][: spec.tokens_per_sample_input],
            )
    assert len(built.valid) == 3 and built.valid[0]["tokens"].shape == (t,)


def test_patch_sample_layout_and_next_patch_targets(data, sp):
    k, t = 4, 8
    built = build_stage_datasets(
        _config(data, seq_length=t, shuffle_samples=False), [StageSpec(k, k * t, 50)]
    )
    dataset, ref = built.train[0], _reference(data, built.train_stream.datasets[0])
    assert len(dataset) == 50
    for i in range(50):
        sample = dataset[i]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert all(v.shape == (k * t,) for v in sample.values())
        assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64
        assert sample["loss_mask"].dtype == torch.float32 and bool((sample["loss_mask"] == 1).all())
        assert sample["position_ids"].tolist() == [j // k for j in range(k * t)]
        s = i * k * t
        assert np.array_equal(sample["tokens"].numpy(), ref[s : s + k * t])
        labels = sample["labels"].view(t, k)
        assert torch.equal(labels[:-1], sample["tokens"].view(t, k)[1:])  # next patch's tokens
        if i + 1 < len(dataset):
            assert torch.equal(labels[-1], dataset[i + 1]["tokens"][:k])
    masked = build_stage_datasets(
        _config(data, seq_length=t, eod_mask_loss=True), [StageSpec(k, k * t, 2000)]
    ).train[0]
    eods = 0
    for i in range(2000):  # 64k tokens: dozens of document ends
        sample = masked[i]
        assert torch.equal(sample["loss_mask"], (sample["labels"] != sp.eos_id()).float())
        eods += int((sample["loss_mask"] == 0).sum())
    assert eods > 0


def test_short_patch_context_variant(data):
    """The ablated variant: T tokens per sample (T/K patches) at patch size K."""
    built = build_stage_datasets(_config(data, seq_length=32), [StageSpec(4, 32, 5)])
    assert built.train[0][0]["tokens"].shape == (32,) and built.windows[0].spec.seq_length == 8


def test_same_seed_same_samples_other_seed_other_stream(data, tmp_path):
    stages = [StageSpec(2, 64, 40), StageSpec(1, 32, 40)]
    one = build_stage_datasets(
        _config(data, seq_length=32, data_cache_path=str(tmp_path / "1")), stages
    )
    two = build_stage_datasets(
        _config(data, seq_length=32, data_cache_path=str(tmp_path / "2")), stages
    )
    for d1, d2 in zip(one.train, two.train):
        for i in range(len(d1)):
            assert all(torch.equal(d1[i][key], d2[i][key]) for key in d1[i])
    other = build_stage_datasets(_config(data, seq_length=32, seed=7), stages)
    assert not np.array_equal(_inputs(other.train[0]), _inputs(one.train[0]))


def test_samples_are_shuffled_within_each_stage(data, tmp_path):
    """A seeded permutation of each stage's windows: the same windows as without the shuffle,
    in another order that depends on the seed only; a step's global batch is the same set of
    samples at every data-parallel size."""
    stages = [StageSpec(4, 64, 48), StageSpec(1, 16, 96)]

    def build(**kw):
        kw.setdefault("data_cache_path", str(tmp_path / "cache"))
        return build_stage_datasets(_config(data, seq_length=16, **kw), stages)

    plain, shuffled = build(shuffle_samples=False), build()
    again = build(data_cache_path=str(tmp_path / "other-cache"))  # recomputed, not read back
    reseeded = build(seed=99, data_cache_path=str(tmp_path / "seed99"))
    for p, s, a, r in zip(plain.train, shuffled.train, again.train, reseeded.train):
        order = [s.window_index(i) for i in range(len(s))]
        assert sorted(order) == list(range(len(p))) and order != sorted(order)
        for i in range(len(s)):
            assert torch.equal(s[i]["tokens"], p[order[i]]["tokens"])
            assert torch.equal(s[i]["labels"], p[order[i]]["labels"])
        assert [a.window_index(i) for i in range(len(a))] == order
        assert [r.window_index(i) for i in range(len(r))] != order
        # Adjacent samples come from all over the stage, not from neighbouring windows.
        assert np.mean(np.abs(np.diff(order)) > 1) > 0.8
    dataset, gb, mbs = shuffled.train[1], 16, 2

    def step_sets(dp):
        per_rank = [
            [b["tokens"] for b in build_data_loader(dataset, 0, mbs, r, dp, num_workers=0)]
            for r in range(dp)
        ]
        micro_per_step = gb // (mbs * dp)
        steps = len(per_rank[0]) // micro_per_step
        return [
            sorted(
                tuple(row.tolist())
                for r in range(dp)
                for mb in per_rank[r][n * micro_per_step : (n + 1) * micro_per_step]
                for row in mb
            )
            for n in range(steps)
        ]

    assert step_sets(1) == step_sets(2) == step_sets(4)


@pytest.mark.parametrize(("mbs", "dp", "workers"), [(2, 1, 0), (3, 2, 0), (2, 2, 2)])
def test_resuming_at_consumed_samples_equals_skipping(data, mbs, dp, workers):
    built = build_stage_datasets(_config(data, seq_length=16), [StageSpec(4, 64, 60)])
    dataset = built.train[0]

    def batches(consumed, rank):
        loader = build_data_loader(dataset, consumed, mbs, rank, dp, num_workers=workers)
        return [b["tokens"] for b in loader]

    for rank in range(dp):
        full = batches(0, rank)
        assert len(full) == 60 // (mbs * dp)
        for step, batch in enumerate(full):  # rank r's micro batch = its slice of the step
            first = step * mbs * dp + rank * mbs
            expected = torch.stack([dataset[i]["tokens"] for i in range(first, first + mbs)])
            assert torch.equal(batch, expected)
        skip = 2 * mbs * dp
        resumed = batches(skip, rank)
        assert len(resumed) == len(full) - 2
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[2:]))


def test_validation_is_token_level_on_held_out_documents(data):
    t = 40
    built = build_stage_datasets(
        _config(data, seq_length=t), [StageSpec(8, 8 * t, 4)], valid_samples=300
    )
    valid = built.valid
    assert len(valid) == 300 and valid.window.spec.patch_size == 1
    stream = np.concatenate([valid[i]["tokens"].numpy() for i in range(300)])
    for i in range(300):
        sample = valid[i]
        assert sample["tokens"].shape == sample["labels"].shape == (t,)
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        assert sample["position_ids"].tolist() == list(range(t))
    eod = data["docs"][0][-1]
    ends = np.flatnonzero(stream == eod)
    held_out = {tuple(d) for d in data["docs"][data["n_train"] :]}
    pieces = np.split(stream[: ends[-1] + 1], ends[:-1] + 1)
    assert len(pieces) >= 3 and all(tuple(p) in held_out for p in pieces)
    # Another --seed reorders training, never the held-out set: seeds are scored alike.
    reseeded = build_stage_datasets(
        _config(data, seq_length=t, seed=99, data_cache_path=str(data["root"] / "seed99")),
        [StageSpec(8, 8 * t, 4)],
        valid_samples=300,
    )
    assert all(torch.equal(reseeded.valid[i]["tokens"], valid[i]["tokens"]) for i in range(300))
    assert not torch.equal(reseeded.train[0][0]["tokens"], built.train[0][0]["tokens"])


def test_blend_interleaves_prefix_streams_by_weight(data):
    chunk = 64
    stages = [StageSpec(1, 64, 600)]
    blend = build_stage_datasets(
        _config(
            data,
            data_path=["0.3", data["a"], "0.7", data["b"]],
            stream_chunk_length=chunk,
            seq_length=64,
        ),
        stages,
    )
    alone = [
        build_stage_datasets(
            _config(data, data_path=[p], stream_chunk_length=chunk, seq_length=64), stages
        )
        for p in (data["a"], data["b"])
    ]
    stream = blend.train_stream
    which = np.asarray(stream.top.dataset_index)
    n = len(which)
    assert n * chunk >= 600 * 64 + 1
    assert abs((which == 0).sum() - 0.3 * n) <= 1 and abs((which == 1).sum() - 0.7 * n) <= 1
    for c in range(n):
        j = int(stream.top.dataset_sample_index[c])
        own = alone[which[c]].train_stream.read(j * chunk, chunk)
        assert np.array_equal(stream.read(c * chunk, chunk), own)
    unweighted = build_stage_datasets(
        _config(data, data_path=[data["a"], data["b"]], stream_chunk_length=chunk, seq_length=64),
        stages,
    )
    tokens = [json.load(open(p + ".meta.json"))["tokens"] for p in (data["a"], data["b"])]
    assert np.allclose(unweighted.train_stream.top.weights, np.array(tokens) / sum(tokens))


def test_index_cache_is_built_once_and_reused(data, tmp_path, monkeypatch):
    cfg = _config(data, seq_length=16, data_cache_path=str(tmp_path / "cache"))
    stages = [StageSpec(2, 32, 30)]
    first = build_stage_datasets(cfg, stages, valid_samples=4)
    files = sorted(os.listdir(tmp_path / "cache"))
    # train and valid: description, document index, sample index; the train stage's order
    assert len(files) == 7 and sum("stage-order" in f for f in files) == 1
    mtimes = [os.stat(tmp_path / "cache" / f).st_mtime_ns for f in files]
    monkeypatch.setattr(DocumentStreamDataset, "_build", lambda self: pytest.fail("rebuilt"))
    again = build_stage_datasets(cfg, stages, valid_samples=4)
    assert [os.stat(tmp_path / "cache" / f).st_mtime_ns for f in files] == mtimes
    assert torch.equal(again.train[0][7]["tokens"], first.train[0][7]["tokens"])


def _distributed_worker(rank: int, data: dict, store: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2
    )
    if rank == 1:  # must find the caches built by rank 0 before the barrier released it
        DocumentStreamDataset._build = lambda self: (_ for _ in ()).throw(
            RuntimeError("rank 1 built")
        )
    cfg = DataConfig(
        data_path=["0.5", data["a"], "0.5", data["b"]],
        split=SPLIT,
        seq_length=16,
        data_cache_path=os.path.join(os.path.dirname(out), "dist-cache"),
        stream_chunk_length=32,
    )
    built = build_stage_datasets(cfg, [StageSpec(2, 32, 40), StageSpec(1, 16, 40)], valid_samples=5)
    tokens = [built.train[s][i]["tokens"].tolist() for s in range(2) for i in range(0, 40, 7)]
    with open(f"{out}.{rank}", "w") as f:
        json.dump(tokens + [built.valid[4]["tokens"].tolist()], f)
    torch.distributed.destroy_process_group()


def test_distributed_rank0_builds_the_caches_and_others_reuse_them(data, tmp_path):
    # spawn, not fork: the test session may already hold a process group (tests/conftest.py)
    ctx = mp.get_context("spawn")
    out = str(tmp_path / "result")
    procs = [
        ctx.Process(target=_distributed_worker, args=(r, data, str(tmp_path / "store"), out))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():  # a hung rank fails the test instead of blocking the session
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.load(open(out + ".0")) == json.load(open(out + ".1"))
    cached = os.listdir(tmp_path / "dist-cache")
    assert any("BlendedDataset" in f for f in cached)  # megatron caches the blend index too


def test_bad_data_settings(data, tmp_path, spm_model):
    stages = [StageSpec(1, 8, 4)]
    with pytest.raises(DataError, match="no --data-path given"):
        build_stage_datasets(_config(data, data_path=[]), stages)
    with pytest.raises(DataError, match=r"data prefix .*nope not found .*--output-prefix"):
        build_stage_datasets(_config(data, data_path=[str(tmp_path / "nope")]), stages)
    with pytest.raises(DataError, match="valid samples requested but --split 100,0,0 gives"):
        build_stage_datasets(
            DataConfig(data_path=[data["a"]], split="100,0,0"), stages, valid_samples=2
        )
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"text": f"document {i}"} for i in range(3)])
    cfg = PreprocessConfig(
        input=[str(tiny)], output_prefix=str(tmp_path / "tiny"), tokenizer_model=spm_model
    )
    preprocess(cfg, report=lambda msg: None)
    with pytest.raises(DataError, match=r"the valid split of .*tiny has no documents \(3 in all"):
        build_stage_datasets(
            DataConfig(data_path=[str(tmp_path / "tiny")], split="98,1,1"), stages, valid_samples=2
        )
    os.remove(tmp_path / "tiny.meta.json")
    with pytest.raises(DataError, match="--eod-mask-loss needs the EOD id"):
        build_stage_datasets(
            DataConfig(data_path=[str(tmp_path / "tiny")], split="1,0,0", eod_mask_loss=True),
            stages,
        )
    other = train_tokenizer(
        TrainTokenizerConfig(
            input=["embedded:topics"],
            output_prefix=str(tmp_path / "other"),
            vocab_size=400,
            max_train_chars=30_000,
        )
    )
    cfg = PreprocessConfig(
        input=[str(tiny)], output_prefix=str(tmp_path / "tiny2"), tokenizer_model=other.model_path
    )
    preprocess(cfg, report=lambda msg: None)
    with pytest.raises(DataError, match="tokenized with different tokenizers"):
        build_stage_datasets(_config(data, data_path=[data["a"], str(tmp_path / "tiny2")]), stages)


def test_datasets_survive_pickling_for_spawned_loader_workers(data):
    import pickle

    cfg = _config(data, data_path=["1", data["a"], "2", data["b"]], seq_length=16)
    dataset = build_stage_datasets(cfg, [StageSpec(2, 32, 30)]).train[0]
    clone = pickle.loads(pickle.dumps(dataset))
    for i in (0, 13, 29):
        assert all(torch.equal(clone[i][key], dataset[i][key]) for key in dataset[i])
