"""`opd export`: a consolidated Hugging Face model (safetensors) from any trainer checkpoint.

    opd export --checkpoint runs/checkpoints/step-00000100 --model /models/student --out student-final
    opd export --checkpoint runs/checkpoints --model /models/student --out student-merged --merge   # LoRA run

`--model` gives the architecture, config and tokenizer (the run's `--model`);
the weights come from the checkpoint. A LoRA run's checkpoint holds its
adapters only: the export is the adapter directory (peft's
adapter_model.safetensors + adapter_config.json), or with `--merge` the base
with the adapter merged into its weights, a plain model. Runs in one process
on CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a step-XXXXXXXX directory, or a checkpoint dir (its latest step is used)"
    )
    parser.add_argument("--model", required=True, help="the run's student model directory (config + tokenizer)")
    parser.add_argument("--out", required=True, help="output directory (created; replaced if it exists)")
    parser.add_argument(
        "--merge", action="store_true", help="LoRA runs: write the base with the adapter merged in (a plain model)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    import torch
    import torch.distributed as dist

    from student_trainer.checkpoint import latest_checkpoint

    path = Path(args.checkpoint)
    if not (path / "trainer_state.pt").is_file():
        path = latest_checkpoint(args.checkpoint)
        if path is None:
            print(
                f"opd export: no committed checkpoint in {args.checkpoint!r} (expected step-XXXXXXXX "
                f"directories with trainer_state.pt)",
                file=sys.stderr,
            )
            return 2
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    out = Path(args.out)
    try:
        _export(path, trainer_state, args.model, out.resolve(), args.merge)
    except ValueError as exc:
        print(f"opd export: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"exported {path} -> {out}")
    return 0


def _export(path: Path, trainer_state: dict[str, Any], model_dir: str, out: Path, merge: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from student_trainer import lora
    from student_trainer.checkpoint import check_student_kind
    from student_trainer.config import DistConfig, LoraConfig
    from student_trainer.loss.config import LossConfig
    from student_trainer.model import StudentLoss, init_distributed, load_student, shard_student
    from student_trainer.publish import full_state_dict, write_hf_model

    saved_base = trainer_state.get("base_id", "")
    if merge and not saved_base:
        raise ValueError(f"--merge is for LoRA runs, but {str(path)!r} holds full weights: drop --merge")
    base_id = lora.base_identity(model_dir) if saved_base else ""
    check_student_kind(path, trainer_state, base_id)
    dist_config = DistConfig(backend="gloo", mixed_precision="none")
    info = init_distributed(dist_config)
    lm = load_student(model_dir, info.device)
    if base_id:
        lm = lora.apply_lora(lm, LoraConfig(**trainer_state["lora"]))
    root = shard_student(StudentLoss(lm, LossConfig()), dist_config, info.device)
    options = StateDictOptions(ignore_frozen_params=True, strict=not base_id)
    state = {"model": get_model_state_dict(root, options=options)}
    dcp_load(state, checkpoint_id=str(path))
    set_model_state_dict(root, state["model"], options=options)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not base_id:
        write_hf_model(root.lm, full_state_dict(root), model_dir, out)
    elif not merge:
        lora.write_adapter(root.lm, lora.adapter_state_dict(root), base_id, out)
    else:
        merged = lora.merged_model(model_dir, LoraConfig(**trainer_state["lora"]), full_state_dict(root))
        write_hf_model(merged, merged.state_dict(), model_dir, out)


if __name__ == "__main__":
    raise SystemExit(main())
