"""`opd convert-prompts`: published math sets -> opd's prompt file (JSONL or Parquet).

    opd convert-prompts --input test.parquet --output math500.jsonl            # layout detected from the columns
    opd convert-prompts --input dapo-math-17k.parquet --output dapo.jsonl --format dapo
    # the OPSD recipe's data (prepare_grpo_data.py): DAPO's instruction out, the recipe's in, 80/20 split, seed 42
    opd convert-prompts --input distinct-prompts-with-rewards.parquet --format dapo --strip-instruction \\
        --instruction recipe-boxed --train-fraction 0.8 --seed 42 --output train.jsonl --val-output val_dapo.jsonl

Layouts (as the sets are published, JSONL or Parquet):

| format | set | columns read (others dropped) |
| --- | --- | --- |
| `math500` | MATH-500 | problem, answer, unique_id; subject, level kept |
| `aime2024` | AIME 2024 | ID, Problem, Answer |
| `aime2025` | AIME 2025 | problem, answer, id when present |
| `dapo` | DAPO math training set | prompt (chat messages), reward_model.ground_truth, extra_info.index |

Every output row has `id` (`FORMAT:ORIGINAL_ID`), `answer` (a string),
`split` (`eval` for the test sets, `train` for DAPO, or `--split`) and either
`prompt` (a string) or `messages` (chat turns, as DAPO gives them, its answer
instruction included). Rows whose id was already seen are skipped and counted
(the published DAPO file repeats each problem). The instruction for the test
sets (e.g. \\boxed{}) is not baked in: `opd eval --dataset-instruction boxed`
adds it, unless `--instruction` bakes one in here.

The OPSD recipe's data preparation (`src/data/prepare_grpo_data.py`) is
reachable with three options: `--strip-instruction` removes DAPO's own
instruction (its prefix "Solve the following math problem step by step. ..."
and suffix "Remember to put your answer on its own line after "Answer:"")
from every user turn; `--instruction VARIANT` appends "\\n\\n" + the variant's
text to the last user turn (`recipe-boxed`: the recipe's BOXED_INSTRUCTION;
`dapo`: DAPO's "Answer:" instruction as a suffix); `--train-fraction F` with
`--val-output` shuffles the converted rows with `--seed` (numpy's
default_rng(seed).permutation, as the `datasets` library's shuffle the
recipe calls) and writes the first int(n F) to `--output` and the rest, split
`eval`, to `--val-output`. Reads with `opd.prompts.read_rows`; does not
download anything.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from opd.config import ConfigError, ConfigModel, load_config
from opd.prompts import PromptSourceError, read_rows

Format = Literal["math500", "aime2024", "aime2025", "dapo"]

# DAPO's own instruction around each problem, as prepare_grpo_data.py strips it (DAPO_INSTRUCTION_PREFIX/SUFFIX)
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
# Appended as "\n\n" + text to the last user turn (prepare_grpo_data.py BOXED_INSTRUCTION; DAPO's own)
INSTRUCTION_VARIANTS: dict[str, str] = {
    "recipe-boxed": "Let's think step by step and output the final answer within \\boxed{}.",
    "dapo": DAPO_SUFFIX.strip(),
}


DESCRIPTION = (
    "Convert a published math set (MATH-500, AIME 2024, AIME 2025, the DAPO math training set; JSONL or Parquet) "
    "to opd's prompt file: id, prompt or messages, answer, split. The layout is detected from the columns unless "
    "--format names it. Options come from --config YAML < OPD_CONVERT__* env < flags."
)


class ConvertError(ValueError):
    """A row does not have the layout it should; the message names the file, row and field."""


class ConvertConfig(ConfigModel):
    input: str = Field(..., description="published file (JSONL or Parquet)")
    output: str = Field(..., description="opd prompt file to write (.jsonl, or .parquet)")
    format: Literal["auto", "math500", "aime2024", "aime2025", "dapo"] = Field(
        "auto", description="source layout; auto = detected from the first row's columns"
    )
    input_format: Literal["auto", "jsonl", "parquet"] = Field("auto", description="input file type (auto: extension)")
    split: Literal["train", "eval"] | None = Field(None, description="split of every row (default: eval; dapo: train)")
    limit: int | None = Field(None, ge=1, description="convert only the first N distinct rows")
    dedupe: bool = Field(True, description="skip rows whose id was already seen")
    strip_instruction: bool = Field(
        False, description="remove DAPO's own instruction (prefix and suffix) from every user turn (format dapo)"
    )
    instruction: Literal["none", "recipe-boxed", "dapo"] = Field(
        "none",
        description="append an instruction to the last user turn: recipe-boxed = the OPSD recipe's \"Let's think "
        'step by step and output the final answer within \\boxed{}."; dapo = DAPO\'s "Answer:" line request',
    )
    train_fraction: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="split: shuffle with --seed, first int(n * F) rows to --output (train), the rest to "
        "--val-output (eval), as the recipe's prepare_grpo_data.py (0.8, seed 42); unset = no split",
    )
    val_output: str | None = Field(None, description="file for the held-out rows of --train-fraction")
    seed: int = Field(42, description="shuffle seed of --train-fraction")

    @model_validator(mode="after")
    def _check_split(self) -> ConvertConfig:
        if (self.train_fraction is None) != (self.val_output is None):
            raise ValueError("--train-fraction and --val-output go together: set both to split, or neither")
        return self


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConvertError(f"{where}: field {name!r} is missing or empty; fields: {sorted(row)}")
    return value


def _answer(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConvertError(f"{where}: the answer must be a string or a number, got {type(value).__name__}")
    return str(value).strip()


def _math500(row: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        "id": str(_field(row, "unique_id", where)),
        "prompt": _field(row, "problem", where),
        "answer": _answer(_field(row, "answer", where), where),
        "subject": row.get("subject"),
        "level": row.get("level"),
    }


def _aime2024(row: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        "id": str(_field(row, "ID", where)),
        "prompt": _field(row, "Problem", where),
        "answer": _answer(_field(row, "Answer", where), where),
    }


def _aime2025(row: dict[str, Any], where: str) -> dict[str, Any]:
    raw_id = row.get("id")
    return {
        "id": str(raw_id) if raw_id is not None else None,
        "prompt": _field(row, "problem", where),
        "answer": _answer(_field(row, "answer", where), where),
    }


def _dapo(row: dict[str, Any], where: str) -> dict[str, Any]:
    messages = _field(row, "prompt", where)
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise ConvertError(f"{where}: field 'prompt' must be a non-empty list of {{role, content}} chat messages")
    reward_model = _field(row, "reward_model", where)
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise ConvertError(f"{where}: field 'reward_model' must be a map with 'ground_truth'")
    extra = row.get("extra_info")
    if not isinstance(extra, dict):
        extra = {}
    raw_id = extra.get("index")
    return {
        "id": str(raw_id) if raw_id is not None else None,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "answer": _answer(reward_model["ground_truth"], where),
        "data_source": row.get("data_source"),
        "ability": row.get("ability"),
    }


CONVERTERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "math500": _math500,
    "aime2024": _aime2024,
    "aime2025": _aime2025,
    "dapo": _dapo,
}
# Checked in this order: the first layout whose columns are all present wins.
SIGNATURES: list[tuple[str, frozenset[str]]] = [
    ("math500", frozenset({"problem", "answer", "unique_id"})),
    ("aime2024", frozenset({"ID", "Problem", "Answer"})),
    ("dapo", frozenset({"prompt", "reward_model"})),
    ("aime2025", frozenset({"problem", "answer"})),
]
DEFAULT_SPLIT = {"math500": "eval", "aime2024": "eval", "aime2025": "eval", "dapo": "train"}


def detect_format(columns: Iterable[str], source: str = "input") -> str:
    cols = set(columns)
    for name, needed in SIGNATURES:
        if needed <= cols:
            return name
    layouts = "; ".join(f"{name}: {sorted(needed)}" for name, needed in SIGNATURES)
    raise ConvertError(f"{source}: columns {sorted(cols)} match no known layout ({layouts}); pass --format")


def convert_rows(
    rows: Iterable[dict[str, Any]],
    fmt: str,
    *,
    source: str = "input",
    split: str | None = None,
    dedupe: bool = True,
    limit: int | None = None,
    stats: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """opd prompt rows from published rows of layout `fmt` (or `auto`); `stats` counts read/written/duplicates."""
    stats = {} if stats is None else stats
    stats.update(read=0, written=0, duplicates=0)
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if fmt == "auto":
            fmt = detect_format(row, source)
        stats["read"] += 1
        where = f"{source} row {index}"
        out = CONVERTERS[fmt](row, where)
        out["id"] = f"{fmt}:{out['id'] if out['id'] is not None else index}"
        if dedupe and out["id"] in seen:
            stats["duplicates"] += 1
            continue
        seen.add(out["id"])
        yield {**out, "split": split or DEFAULT_SPLIT[fmt]}
        stats["written"] += 1
        if limit is not None and stats["written"] >= limit:
            return


def _strip_dapo(text: str) -> str:
    text = text.removeprefix(DAPO_PREFIX)
    return text.removesuffix(DAPO_SUFFIX)


def with_instruction(row: dict[str, Any], strip: bool, instruction: str) -> dict[str, Any]:
    """`row` with DAPO's instruction stripped from its user turns and/or `instruction` appended to the last one,
    as prepare_grpo_data.py does: text.rstrip() + "\\n\\n" + the variant's text."""
    if not strip and instruction == "none":
        return row
    extra = INSTRUCTION_VARIANTS.get(instruction)

    def edit(text: str) -> str:
        text = _strip_dapo(text) if strip else text
        return text if extra is None else text.rstrip() + "\n\n" + extra

    if "messages" not in row:
        return {**row, "prompt": edit(row["prompt"])}
    messages = [dict(m) for m in row["messages"]]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    for i in users:
        text = _strip_dapo(messages[i]["content"]) if strip else messages[i]["content"]
        if i == users[-1] and extra is not None:
            text = text.rstrip() + "\n\n" + extra
        messages[i]["content"] = text
    return {**row, "messages": messages}


def split_rows(rows: list[dict[str, Any]], train_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) rows: shuffled by numpy default_rng(seed).permutation (the `datasets` shuffle the recipe
    uses), the first int(n * train_fraction) for training, the rest marked split `eval`."""
    order = np.random.default_rng(seed).permutation(len(rows))
    shuffled = [rows[i] for i in order]
    cut = int(len(rows) * train_fraction)
    return shuffled[:cut], [{**row, "split": "eval"} for row in shuffled[cut:]]


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), path)
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")
    tmp.rename(path)


def convert_file(config: ConvertConfig) -> dict[str, int]:
    """Convert `config.input` to `config.output`; returns the counts."""
    stats: dict[str, int] = {}
    rows = list(
        convert_rows(
            read_rows(config.input, config.input_format),
            config.format,
            source=config.input,
            split=config.split,
            dedupe=config.dedupe,
            limit=config.limit,
            stats=stats,
        )
    )
    if not rows:
        raise ConvertError(f"{config.input}: no rows to convert")
    if config.strip_instruction and config.format not in ("dapo", "auto"):
        raise ConvertError(
            f"--strip-instruction removes DAPO's instruction: use it with --format dapo, not {config.format}"
        )
    rows = [with_instruction(row, config.strip_instruction, config.instruction) for row in rows]
    if config.train_fraction is not None and config.val_output is not None:
        rows, held_out = split_rows(rows, config.train_fraction, config.seed)
        write_rows(Path(config.val_output), held_out)
        stats["held_out"] = len(held_out)
    write_rows(Path(config.output), rows)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            ConvertConfig, argv, prog="opd convert-prompts", description=DESCRIPTION, env_prefix="OPD_CONVERT__"
        )
        stats = convert_file(config)
    except (ConfigError, PromptSourceError, ConvertError) as exc:
        print(f"opd convert-prompts: {exc}", file=sys.stderr)
        return 2
    print(
        f"{config.output}: {stats['written']} prompts from {stats['read']} rows"
        + (f" ({stats['duplicates']} repeated ids skipped)" if stats["duplicates"] else "")
        + (f"; {stats['held_out']} held out to {config.val_output}" if "held_out" in stats else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
