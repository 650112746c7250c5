"""`opd convert-prompts`: published math sets -> opd's prompt file (JSONL or Parquet).

    opd convert-prompts --input test.parquet --output math500.jsonl            # layout detected from the columns
    opd convert-prompts --input dapo-math-17k.parquet --output dapo.jsonl --format dapo

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
adds it. Reads with `opd.prompts.read_rows`; does not download anything.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from opd.config import ConfigError, ConfigModel, load_config
from opd.prompts import PromptSourceError, read_rows

Format = Literal["math500", "aime2024", "aime2025", "dapo"]


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
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
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
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
