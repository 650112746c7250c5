"""A LoRA student's publish gathers its adapter from FSDP2 shards in one collective: the gathered tensors
equal the unsharded ones exactly, on one process (no collective) and on three (uneven and empty shards)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.torchrun import run_torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("nproc", [1, 3])
def test_the_adapter_gathered_in_one_collective_equals_the_unsharded_adapter(
    nproc: int, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gathered.pt"
    run_torchrun(
        nproc, "tests.fixtures.adapter_gather", str(tiny_model_dir), str(out), log_dir=tmp_path / "ranks", timeout_s=240
    )
    saved = torch.load(out, weights_only=False)
    assert saved["world"] == nproc and saved["flat"]
    before, gathered = saved["before"], saved["gathered"]
    assert gathered.keys() == before.keys() and len(before) > 0
    for key, value in before.items():
        # copied bytes, no arithmetic: exactly equal
        torch.testing.assert_close(gathered[key], value, rtol=0, atol=0, msg=key)
        assert gathered[key].device.type == "cpu"
