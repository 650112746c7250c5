"""`opd convert-prompts --format dapo` prepares the OPSD recipe's data (`prepare_grpo_data.py`).

DAPO's instruction stripped, the recipe's boxed instruction (or DAPO's "Answer:" variant) appended with
"\\n\\n" after rstrip, and a seeded train/eval split by the permutation the `datasets` shuffle uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opd.prompts import read_rows
from opd_apps.tools.prompt_convert import INSTRUCTION_VARIANTS, ConvertConfig, ConvertError, convert_file, main

pytestmark = pytest.mark.timeout(60)
DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"
BOXED = "Let's think step by step and output the final answer within \\boxed{}."


def _dapo_rows(tmp_path: Path, n: int) -> Path:
    """n distinct DAPO rows (the fixture's first row, renumbered)."""
    import json

    first = next(read_rows(DATA / "dapo_sample.jsonl"))
    path = tmp_path / "dapo.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({**first, "extra_info": {"index": str(i)}}) + "\n")
    return path


def test_the_dapo_instruction_is_stripped_and_the_recipes_appended(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    convert_file(
        ConvertConfig(
            input=str(DATA / "dapo_sample.jsonl"), output=str(out), strip_instruction=True, instruction="recipe-boxed"
        )
    )
    first = next(read_rows(out))
    assert first["messages"][0]["content"] == f"What is $12 \\times 12$?\n\n{BOXED}"
    assert INSTRUCTION_VARIANTS["recipe-boxed"] == BOXED


def test_the_dapo_variant_and_no_stripping(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    convert_file(ConvertConfig(input=str(DATA / "dapo_sample.jsonl"), output=str(out), instruction="dapo"))
    text = next(read_rows(out))["messages"][0]["content"]
    assert text.startswith("Solve the following math problem") and text.endswith(
        '\n\nRemember to put your answer on its own line after "Answer:".'
    )
    convert_file(ConvertConfig(input=str(DATA / "dapo_sample.jsonl"), output=str(out), strip_instruction=True))
    assert next(read_rows(out))["messages"][0]["content"] == "What is $12 \\times 12$?"


def test_the_eval_sets_take_the_instruction_too(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    convert_file(ConvertConfig(input=str(DATA / "math500_sample.jsonl"), output=str(out), instruction="recipe-boxed"))
    assert all(r["prompt"].endswith(f"\n\n{BOXED}") for r in read_rows(out))


def test_the_split_is_the_seeded_permutation_eighty_twenty(tmp_path: Path) -> None:
    source = _dapo_rows(tmp_path, 10)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    code = main(
        ["--input", str(source), "--output", str(train), "--val-output", str(val), "--train-fraction", "0.8"]
        + ["--format", "dapo", "--strip-instruction", "--instruction", "recipe-boxed", "--seed", "42"]
    )
    assert code == 0
    order = np.random.default_rng(42).permutation(10).tolist()  # datasets.Dataset.shuffle(seed=42)
    train_rows, val_rows = list(read_rows(train)), list(read_rows(val))
    assert [r["id"] for r in train_rows] == [f"dapo:{i}" for i in order[:8]]
    assert [r["id"] for r in val_rows] == [f"dapo:{i}" for i in order[8:]]
    assert {r["split"] for r in train_rows} == {"train"} and {r["split"] for r in val_rows} == {"eval"}
    other = tmp_path / "other.jsonl"
    main(
        ["--input", str(source), "--output", str(other), "--val-output", str(tmp_path / "v2.jsonl")]
        + ["--train-fraction", "0.8", "--seed", "7"]
    )
    assert [r["id"] for r in read_rows(other)] != [r["id"] for r in train_rows]


def test_bad_combinations_are_refused_with_the_flag_to_change(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--train-fraction and --val-output"):
        ConvertConfig(input="x", output="y", train_fraction=0.8)
    with pytest.raises(ConvertError, match="--format dapo"):
        convert_file(
            ConvertConfig(
                input=str(DATA / "math500_sample.jsonl"),
                output=str(tmp_path / "o.jsonl"),
                format="math500",
                strip_instruction=True,
            )
        )
