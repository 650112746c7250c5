"""Pruning published weight versions: the newest `keep_last` stay, and an older one stays until its successor
has been out for `prune_grace_s` (a worker that read its announcement may still be loading it)."""

from __future__ import annotations

import os

from student_trainer.publish import prune_versions


def _versions(root, published_at: dict[int, float]) -> None:
    for version, when in published_at.items():
        path = root / f"v{version:08d}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
        os.utime(path, (when, when))


def test_a_version_is_deleted_only_after_its_successor_is_older_than_the_grace(tmp_path) -> None:
    now = 1_000_000.0
    _versions(tmp_path, {1: now - 500, 2: now - 100, 3: now - 30, 4: now - 10})
    deleted = prune_versions(str(tmp_path), keep_last=1, grace_s=60, now=now)
    assert [p.name for p in deleted] == ["v00000001"]  # v2 superseded it 100 s ago; v3 came 30 s after v2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000002", "v00000003", "v00000004"]
    later = prune_versions(str(tmp_path), keep_last=1, grace_s=60, now=now + 60)
    assert [p.name for p in later] == ["v00000002", "v00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000004"]


def test_without_a_grace_only_keep_last_versions_stay(tmp_path) -> None:
    now = 1_000_000.0
    _versions(tmp_path, {1: now - 3, 2: now - 2, 3: now - 1})
    prune_versions(str(tmp_path), keep_last=2, now=now)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000002", "v00000003"]
    assert prune_versions(str(tmp_path / "missing"), keep_last=1) == []
