"""Weight publishing: consolidated HF safetensors in versioned directories, made visible atomically.

Owns gathering the full (unsharded) state dict from FSDP2 (a collective: every
rank calls it), writing it on rank 0 as a Hugging Face model directory that
vLLM and transformers load (config, safetensors, tokenizer), the atomic
rename that makes version N visible, keeping the last K versions (and an
older one for `publish.prune_grace_s` after its successor appeared: a worker
may still be loading it), and the
`opd export` conversion of a checkpoint. A LoRA student publishes its adapter
instead (`student_trainer.lora`: gathered and written there, named, made
visible and pruned here like a full version). Announcing a version on Redis is the
trainer's job (`opd.policy.announce_policy`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from student_trainer.model import CausalLM, StudentLoss

log = logging.getLogger(__name__)
_VERSION_DIR = re.compile(r"^v(\d{8})$")


def full_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of the wrapped causal LM (collective; rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = cast(dict[str, torch.Tensor], get_model_state_dict(root, options=options))  # a model's: tensors only
    return {k.removeprefix("lm."): v for k, v in state.items()}


def version_dir(uri: str, version: int) -> Path:
    return Path(uri.removeprefix("file://")) / f"v{version:08d}"


def write_hf_model(lm: nn.Module, state: dict[str, torch.Tensor], tokenizer_dir: str, target: Path) -> None:
    """Save `state` with `lm`'s config as an HF directory at `target`, atomically (write aside, then rename)."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cast("CausalLM", lm).save_pretrained(tmp, state_dict=state, safe_serialization=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "generation_config.json",
    ):
        src = Path(tokenizer_dir) / name
        if src.is_file() and not (tmp / name).exists():
            shutil.copy2(src, tmp / name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def prune_versions(uri: str, keep_last: int, grace_s: float = 0.0, now: float | None = None) -> list[Path]:
    """Delete the version directories older than the newest `keep_last` whose successor (the next newer version)
    was published more than `grace_s` ago (its directory's mtime, set when it was renamed into place): a worker
    that read the announcement of a version just before the next one may still be loading it. Returns what was
    deleted."""
    root = Path(uri.removeprefix("file://"))
    versions = sorted(p for p in root.iterdir() if _VERSION_DIR.match(p.name)) if root.is_dir() else []
    now = time.time() if now is None else now
    doomed = []
    for old, successor in zip(versions[: len(versions) - keep_last], versions[1:], strict=False):
        try:
            superseded_for_s = now - successor.stat().st_mtime
        except FileNotFoundError:
            continue
        if superseded_for_s >= grace_s:
            doomed.append(old)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def publish_weights(
    root: StudentLoss,
    tokenizer_dir: str,
    uri: str,
    version: int,
    keep_last: int,
    is_main: bool,
    prune_grace_s: float = 0.0,
    base_id: str = "",
) -> Path:
    """Collective: gather, and on rank 0 write version `version` under `uri` and prune the old ones (keeping
    each for `prune_grace_s` after its successor); returns its directory. `base_id` set: a LoRA student, whose
    version is its adapter only (`student_trainer.lora`), for the base of that identity."""
    from student_trainer import lora

    state = lora.adapter_state_dict(root) if base_id else full_state_dict(root)
    target = version_dir(uri, version)
    if is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        if base_id:
            lora.write_adapter(root.lm, state, base_id, target)
        else:
            write_hf_model(root.lm, state, tokenizer_dir, target)
        prune_versions(uri, keep_last, prune_grace_s)
        log.info("published weights v%d at %s", version, target)
    return target
