"""Checkpoint bookkeeping on disk: what counts as whole, what pruning may remove."""

from __future__ import annotations

import json

from megapatch.training.checkpoint import (
    CHECKPOINT_META,
    FORMAT_VERSION,
    _prune,
    find_latest,
    verify_checkpoint,
)


def _fake(root, step, damaged=False):
    path = root / f"iter_{step:07d}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x" * 100)
    files = {"__0_0.distcp": 100}
    body = dict(format_version=FORMAT_VERSION, complete=True, step=step, files=files)
    (path / CHECKPOINT_META).write_text(json.dumps(body))
    if damaged:
        (path / "__0_0.distcp").write_bytes(b"x" * 10)
    return path


def test_pruning_never_removes_the_newest_whole_checkpoint(tmp_path):
    for step in (4, 8):
        _fake(tmp_path, step)
    _fake(tmp_path, 12, damaged=True)
    assert "has 10 bytes, 100 were written" in verify_checkpoint(str(tmp_path / "iter_0000012"))
    _prune(str(tmp_path), keep_last=1)
    # keep-last 1 keeps the newest (damaged) one, and the newest whole one on top of it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000008", "iter_0000012"]
    said = []
    assert find_latest(str(tmp_path), report=said.append, verify=True).endswith("iter_0000008")
    assert len(said) == 1 and "iter_0000012 is damaged" in said[0] and "left in place" in said[0]
    assert find_latest(str(tmp_path)).endswith("iter_0000012")  # unverified: the newest


def test_checkpoints_without_recorded_sizes_need_megatron_s_files(tmp_path):
    path = tmp_path / "iter_0000001"
    path.mkdir()
    (path / CHECKPOINT_META).write_text(
        json.dumps(dict(format_version=FORMAT_VERSION, complete=True, step=1))
    )
    assert verify_checkpoint(str(path)) == "metadata.json is missing"
    for name in ("metadata.json", ".metadata", "common.pt"):
        (path / name).write_text("{}")
    assert verify_checkpoint(str(path)) is None
