"""Prompt sources: JSONL / Parquet rows -> prompt records -> the `{ns}:prompts` stream.

Owns reading prompt files with configurable field names, the instruction
variants (e.g. the boxed-answer instruction for math), the optional system
prompt, `n_samples` per prompt (one group), epochs and shuffling, feeding the
records to Redis with backpressure, and rendering a record to prompt token ids
with the tokenizer's chat template (with the thinking on/off switch).

Used by `opd rollout --prompts FILE` and by the trainer. Does not tokenize at
feed time (workers render with their own tokenizer), sample or score.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from opd.auth import NAME_RE
from opd.config import ConfigModel
from protos.records import SPLITS, PromptRecord

INSTRUCTIONS: dict[str, str] = {
    "none": "",
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
    "answer-line": "Think it through, then finish with a last line of the form `Answer: <answer>`.",
    "concise": "Answer concisely.",
}


class PromptSourceError(ValueError):
    """A prompt file or row is unreadable or lacks the configured fields; the message names file, row and field."""


class PromptSourceConfig(ConfigModel):
    format: Literal["auto", "jsonl", "parquet"] = Field(
        default="auto", description="file format; auto = by extension (.jsonl/.json lines, .parquet)"
    )
    id_field: str = Field(default="id", description="row field with a stable prompt id (else FILE_STEM:ROW)")
    prompt_field: str = Field(
        default="prompt", description="row field with the user prompt text (used when the messages field is absent)"
    )
    messages_field: str = Field(default="messages", description="row field with chat turns [{role, content}]")
    answer_field: str = Field(
        default="answer", description="row field with the reference answer for the reward (optional)"
    )
    tools_field: str = Field(
        default="tools", description="row field listing the tool names allowed for this prompt (optional)"
    )
    split_field: str = Field(default="split", description="row field overriding the split per row (train/eval)")
    teacher_field: str = Field(
        default="teacher",
        description="row field naming the prompt's domain teacher (optional; see the trainer's `teachers`)",
    )
    split: Literal["train", "eval"] = Field(default="train", description="split of rows that do not say")
    system_prompt: str | None = Field(default=None, description="system message prepended when the row has none")
    instruction: Literal["none", "boxed", "answer-line", "concise"] = Field(
        default="none",
        description="instruction variant appended to the last user turn (boxed = math: put the final "
        "answer in \\boxed{})",
    )
    instruction_text: str | None = Field(default=None, description="custom instruction text (overrides --instruction)")
    n_samples: int = Field(default=1, ge=1, le=4096, description="samples per prompt (one group)")
    limit: int | None = Field(default=None, ge=1, description="use only the first N rows")
    epochs: int = Field(default=1, ge=1, description="feed the prompt set this many times (ids get a #eN suffix)")
    shuffle: bool = Field(default=False, description="shuffle the prompts (per epoch)")
    seed: int = Field(default=0, description="shuffle seed")


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix in (".parquet", ".pq"):
        return "parquet"
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise PromptSourceError(
        f"{path}: cannot tell the format from the extension {path.suffix!r}; pass --dataset-format jsonl or parquet"
    )


def read_rows(path: str | Path, fmt: str = "auto") -> Iterator[dict[str, Any]]:
    """Rows of a JSONL or Parquet file as dicts, in file order."""
    path = Path(path)
    if not path.is_file():
        raise PromptSourceError(f"prompt file {str(path)!r} does not exist; pass an existing JSONL or Parquet file")
    if _detect_format(path, fmt) == "parquet":
        yield from _read_parquet(path)
        return
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptSourceError(f"{path}:{line_no}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise PromptSourceError(f"{path}:{line_no}: each line must be a JSON object, got {type(row).__name__}")
            yield row


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise PromptSourceError("Parquet prompt files need pyarrow: `pip install pyarrow`") from exc
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _instruction(config: PromptSourceConfig) -> str:
    return config.instruction_text if config.instruction_text is not None else INSTRUCTIONS[config.instruction]


def _messages_of(row: dict[str, Any], where: str, config: PromptSourceConfig) -> list[dict[str, Any]]:
    messages = row.get(config.messages_field)
    if messages is None:
        text = row.get(config.prompt_field)
        if not isinstance(text, str) or not text:
            raise PromptSourceError(
                f"{where}: needs a non-empty string field {config.prompt_field!r} or a "
                f"{config.messages_field!r} list (set --dataset-prompt-field / "
                f"--dataset-messages-field to the file's names); fields: {sorted(row)}"
            )
        messages = [{"role": "user", "content": text}]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise PromptSourceError(
            f"{where}: field {config.messages_field!r} must be a non-empty list of {{role, content}} string maps"
        )
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if config.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": config.system_prompt})
    return _with_instruction(messages, _instruction(config))


def _with_instruction(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    if not instruction:
        return messages
    for message in reversed(messages):
        if message["role"] == "user":
            message["content"] = f"{message['content'].rstrip()}\n\n{instruction}"
            break
    return messages


def row_to_record(row: dict[str, Any], index: int, config: PromptSourceConfig, source: str = "prompts") -> PromptRecord:
    """One row -> one PromptRecord (group of `n_samples`). Raises PromptSourceError naming the row and field."""
    where = f"{source} row {index}"
    prompt_id = row.get(config.id_field)
    prompt_id = f"{source}:{index}" if prompt_id is None else str(prompt_id)
    split = row.get(config.split_field) or config.split
    if split not in SPLITS:
        raise PromptSourceError(f"{where}: field {config.split_field!r} must be one of {SPLITS}, got {split!r}")
    answer = row.get(config.answer_field)
    tools = row.get(config.tools_field)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, str) for t in tools)):
        raise PromptSourceError(f"{where}: field {config.tools_field!r} must be a list of tool names")
    teacher = row.get(config.teacher_field)
    if teacher is not None and not (isinstance(teacher, str) and NAME_RE.match(teacher)):
        raise PromptSourceError(
            f"{where}: field {config.teacher_field!r} must name a teacher domain (1-64 of [A-Za-z0-9_.-]), "
            f"got {teacher!r:.80}"
        )
    return PromptRecord(
        prompt_id=prompt_id,
        group_size=config.n_samples,
        split=split,
        messages=_messages_of(row, where, config),
        answer=None if answer is None else str(answer),
        tools=tools,
        meta={"source": source, "row": index},
        teacher=teacher,
    )


def load_prompts(path: str | Path, config: PromptSourceConfig) -> list[PromptRecord]:
    """All prompt records of a file: rows (up to `limit`) x `epochs`, shuffled per epoch when asked."""
    path = Path(path)
    base: list[PromptRecord] = []
    for index, row in enumerate(read_rows(path, config.format)):
        if config.limit is not None and index >= config.limit:
            break
        base.append(row_to_record(row, index, config, source=path.stem))
    if not base:
        raise PromptSourceError(f"prompt file {str(path)!r} holds no rows")
    rng = random.Random(config.seed)
    out: list[PromptRecord] = []
    for epoch in range(config.epochs):
        batch = list(base)
        if config.shuffle:
            rng.shuffle(batch)
        for record in batch:
            suffix = f"#e{epoch}" if config.epochs > 1 else ""
            out.append(
                PromptRecord(
                    **{
                        **record.__dict__,
                        "prompt_id": record.prompt_id + suffix,
                        "messages": [dict(m) for m in record.messages or []],
                        "meta": {**record.meta, "epoch": epoch},
                    }
                )
            )
    return out


async def feed_prompts(
    producer: Any,
    records: Sequence[PromptRecord],
    *,
    batch_size: int = 64,
    feeder_key: str | None = None,
    feeder_ttl_s: int = 30,
) -> int:
    """Append records to the prompt stream through `producer` (an `opd.streams.StreamProducer`, which applies
    backpressure); returns how many were sent. While feeding, `feeder_key` (StreamKeys.feeder) is kept set
    (refreshed within its TTL), so workers that exit when the stream drains wait for the whole file."""
    done, keepalive = asyncio.Event(), None
    if feeder_key:
        await producer.redis.set(feeder_key, "1", ex=feeder_ttl_s)
        keepalive = asyncio.create_task(_hold_key(producer.redis, feeder_key, feeder_ttl_s, done))
    try:
        for start in range(0, len(records), batch_size):
            await producer.send_many([r.encode() for r in records[start : start + batch_size]])
    finally:
        done.set()
        if keepalive is not None:
            await keepalive
            await producer.redis.delete(feeder_key)
    return len(records)


async def _hold_key(redis: Any, key: str, ttl_s: int, done: asyncio.Event) -> None:
    """Refresh `key` until `done` (an event, not task.cancel(): redis-py may swallow a cancellation)."""
    while not done.is_set():
        with contextlib.suppress(Exception):  # a missed refresh only shortens the hold; the feed itself retries
            await redis.set(key, "1", ex=ttl_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), ttl_s / 3)


def render_prompt_ids(
    tokenizer: Any,
    record: PromptRecord,
    *,
    enable_thinking: bool | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of the prompt: `prompt_ids` as given, or `messages` through the tokenizer's chat template
    with the generation prompt. `enable_thinking` (Qwen3-style templates) is passed only when set;
    `tools` are JSON-schema tool specs for templates that render them."""
    if record.prompt_ids is not None:
        return [int(t) for t in record.prompt_ids]
    if not getattr(tokenizer, "chat_template", None):
        raise PromptSourceError(
            f"prompt {record.prompt_id!r} has chat messages but the tokenizer has no chat "
            f"template; use a chat model's tokenizer or give prompts as prompt_ids"
        )
    kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    if tools:
        kwargs["tools"] = tools
    text = tokenizer.apply_chat_template(record.messages, **kwargs)
    return list(tokenizer.encode(text, add_special_tokens=False))
