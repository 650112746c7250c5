"""The identity of a base model: the one definition that the trainer and the rollout workers compare.

identity = "sha256:" + sha256 over the base directory's config.json and its weight files (*.safetensors, *.bin),
in name order, each as its name, a NUL byte, then its bytes. A LoRA policy version is announced with the identity
of the base it was trained on (`protos.records.PolicyAnnouncement.base_id`); a worker applies it only to a base of
the same identity. Reads files only: no torch, no transformers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_BLOCK = 1 << 24


def base_identity(model_dir: str | os.PathLike) -> str:
    """`sha256:<hex>` of the model directory `model_dir` (ValueError if it holds no weight files)."""
    root = Path(model_dir)
    weights = sorted(p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()) if root.is_dir() else []
    if not weights:
        raise ValueError(f"{str(root)!r} holds no weight files (*.safetensors): not a base model directory")
    files = ([root / "config.json"] if (root / "config.json").is_file() else []) + weights
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
