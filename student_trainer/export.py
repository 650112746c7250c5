"""`opd export`: a consolidated Hugging Face model (safetensors) from any trainer checkpoint.

    opd export --checkpoint runs/checkpoints/step-00000100 --model /models/student --out student-final

`--model` gives the architecture, config and tokenizer (the run's `--model`);
the weights come from the checkpoint. Runs in one process on CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="opd export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a step-XXXXXXXX directory, or a checkpoint dir (its latest step is used)"
    )
    parser.add_argument("--model", required=True, help="the run's student model directory (config + tokenizer)")
    parser.add_argument("--out", required=True, help="output directory (created; replaced if it exists)")
    args = parser.parse_args(argv)

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from student_trainer.checkpoint import latest_checkpoint
    from student_trainer.config import DistConfig
    from student_trainer.loss.config import LossConfig
    from student_trainer.model import StudentLoss, init_distributed, load_student, shard_student
    from student_trainer.publish import full_state_dict, write_hf_model

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
    try:
        dist_config = DistConfig(backend="gloo", mixed_precision="none")
        info = init_distributed(dist_config)
        root = shard_student(StudentLoss(load_student(args.model, info.device), LossConfig()), dist_config, info.device)
    except ValueError as exc:
        print(f"opd export: {exc}", file=sys.stderr)
        return 2
    state = {"model": get_model_state_dict(root)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(root, state["model"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_hf_model(root.lm, full_state_dict(root), args.model, out.resolve())
    dist.destroy_process_group()
    print(f"exported {path} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
