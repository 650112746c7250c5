"""What `opd score` scores: the rows of its input file as (id, token ids, first scored position).

A row gives its sequence in one of three forms (checked in this order):

- `token_ids` (the whole sequence) and an optional `score_from` (default 1:
  every token that has a context);
- `prompt_ids` + `response_ids` (the response is scored);
- chat: `messages` (the last turn is the assistant's response), or `prompt` +
  `response` text (one user turn and the answer), rendered with the
  tokenizer's chat template; the response is what follows the rendering of
  the turns before it with the generation prompt.

Rows are read lazily (JSONL line by line, Parquet batch by batch), so the
input's size does not bound memory. Errors name the row and the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from opd.prompts import PromptSourceError, read_rows


class InputError(ValueError):
    """A row of the input cannot be turned into a sequence to score; the message names the row and field."""


def count_rows(path: str | Path, fmt: str = "auto") -> int:
    """Rows of the input (Parquet: from the footer; JSONL: non-empty lines), for the progress bar."""
    path = Path(path)
    if path.suffix in (".parquet", ".pq") or fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _ints(value: Any, where: str, field: str) -> np.ndarray:
    if not isinstance(value, list | tuple | np.ndarray) or not all(isinstance(t, int | np.integer) for t in value):
        raise InputError(f"{where}: field {field!r} must be a list of token ids (integers)")
    return np.asarray(value, dtype=np.int32)


def _chat(row: dict[str, Any], where: str, tokenizer: Any) -> tuple[np.ndarray, int]:
    if tokenizer is None:
        raise InputError(f"{where}: a chat row needs --tokenizer DIR (the teacher's tokenizer, with its chat template)")
    messages = row.get("messages")
    if messages is None:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        raise InputError(f"{where}: field 'messages' must list at least two {{role, content}} turns")
    if messages[-1].get("role") != "assistant":
        raise InputError(f"{where}: the last of 'messages' must be the assistant's response (it is what is scored)")
    full = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    context = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(context, add_special_tokens=False)
    if full[: len(prompt)] != prompt or len(full) <= len(prompt):
        raise InputError(
            f"{where}: the chat template does not render the turns before the response as a prefix of the whole "
            f"conversation; give token ids (prompt_ids + response_ids) instead"
        )
    return np.asarray(full, np.int32), len(prompt)


def sequence(row: dict[str, Any], where: str, tokenizer: Any) -> tuple[np.ndarray, int]:
    """(token ids, score_from) of one row."""
    if "token_ids" in row:
        ids = _ints(row["token_ids"], where, "token_ids")
        score_from = row.get("score_from", 1)
    elif "prompt_ids" in row and "response_ids" in row:
        prompt = _ints(row["prompt_ids"], where, "prompt_ids")
        ids = np.concatenate([prompt, _ints(row["response_ids"], where, "response_ids")])
        score_from = len(prompt)
    elif "messages" in row or ("prompt" in row and "response" in row):
        ids, score_from = _chat(row, where, tokenizer)
    else:
        raise InputError(
            f"{where}: needs token_ids (+ score_from), prompt_ids + response_ids, messages, or prompt + response; "
            f"fields: {sorted(row)}"
        )
    if not isinstance(score_from, int) or not 1 <= score_from < len(ids):
        raise InputError(f"{where}: score_from={score_from!r} must be in [1, {len(ids) - 1}] for {len(ids)} tokens")
    return ids, int(score_from)


def read_sequences(
    path: str | Path, tokenizer: Any = None, *, id_field: str = "id", fmt: str = "auto"
) -> Iterator[tuple[str, np.ndarray, int]]:
    """(id, token ids, score_from) per input row, in file order; ids default to `{file stem}:{row}`."""
    path = Path(path)
    try:
        for index, row in enumerate(read_rows(path, fmt)):
            rid = row.get(id_field)
            yield (
                (f"{path.stem}:{index}" if rid is None else str(rid)),
                *sequence(row, f"{path} row {index}", tokenizer),
            )
    except PromptSourceError as exc:
        raise InputError(str(exc)) from None
