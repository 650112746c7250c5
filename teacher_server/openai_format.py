"""vLLM's OpenAI-compatible JSON shapes, built from the teacher's scores (no I/O, no engine).

Owns how one scored sequence becomes what vLLM's `/v1/completions` answers:
`prompt_logprobs` (per position `null` for the first token, then a map from
token id to `{logprob, rank, decoded_token}` holding the actual token first
and then the top-k by rank, the actual token once when it is among them),
the legacy `choices[].logprobs` (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`: what evaluation harnesses read with `echo`),
and the token strings vLLM shows (`TokenText`: each id decoded alone, a
SentencePiece leading space restored, a piece that ends inside a UTF-8
character completed from up to four preceding tokens, as
`vllm.v1.engine.logprobs` does). `-inf` is written as -9999.0, as vLLM does.

Does not validate requests, call the engine or know about HTTP
(`openai_api.py` does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_REPLACEMENT = "\ufffd"
_FLOOR = -9999.0  # vLLM's JSON stand-in for -inf


def _finite(x: float) -> float:
    return _FLOOR if not math.isfinite(x) or x < _FLOOR else x


def _space_marker(tokenizer: Any) -> str | None:
    """The Metaspace replacement character of a SentencePiece-style tokenizer (None for byte-level BPE)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    except Exception:  # noqa: BLE001 - a tokenizer that cannot describe itself has no marker to restore
        return None
    subs = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for sub in subs:
        if sub.get("type") == "Metaspace":
            return sub.get("replacement", "\u2581")
    return None


class TokenText:
    """Token strings as vLLM's OpenAI server shows them (decoded pieces are cached per id: bounded by the vocab)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._marker = _space_marker(tokenizer)
        self._pieces: dict[int, str] = {}

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def completion_text(self, ids: Sequence[int]) -> str:
        """Generated text as vLLM's detokenizer emits it: special tokens skipped, an unfinished character held back."""
        return self.decode(ids, skip_special_tokens=True).rstrip(_REPLACEMENT)

    def piece(self, token_id: int) -> str:
        text = self._pieces.get(token_id)
        if text is None:
            text = self._tok.decode([token_id]) or ""
            if self._marker:
                raw = self._tok.convert_ids_to_tokens(token_id) or ""
                markers = len(raw) - len(raw.lstrip(self._marker))
                missing = markers - (len(text) - len(text.lstrip(" ")))
                text = " " * missing + text if missing > 0 else text
            self._pieces[token_id] = text
        return text

    def pieces(self, ids: Sequence[int], context: Sequence[int]) -> list[str]:
        """Strings of the alternatives `ids` at one position, after the actual tokens `context` (oldest first)."""
        out = [self.piece(t) for t in ids]
        return [self._complete(t, context) if s.endswith(_REPLACEMENT) else s for t, s in zip(ids, out, strict=True)]

    def _complete(self, token_id: int, context: Sequence[int]) -> str:
        """A piece ending inside a UTF-8 character, completed from the preceding tokens ("" while incomplete)."""
        context = list(context)[-4:]
        for n in range(1, len(context) + 1):
            ctx = context[-n:]
            full = self.decode([*ctx, token_id])
            if full.endswith(_REPLACEMENT):
                continue
            clean_end = len(ctx)
            for j in range(len(ctx) - 1, -1, -1):
                if not self.decode([ctx[j]]).endswith(_REPLACEMENT):
                    break
                clean_end = j
            prefix = self.decode(ctx[:clean_end]) if clean_end else ""
            if full.startswith(prefix):
                return full[len(prefix) :]
            common = 0
            for a, b in zip(prefix, full, strict=False):
                if a != b:
                    break
                common += 1
            return full[common:]
        return ""


@dataclass(frozen=True)
class Entry:
    logprob: float
    rank: int
    text: str


Position = dict[int, Entry]  # token id -> entry, the actual token first, then the top-k by rank


def positions(
    token_ids: Sequence[int],
    start: int,
    stop: int,
    score_from: int,
    scores: Any,
    k: int,
    text: TokenText,
    context_from: int,
) -> list[Position]:
    """One `Position` per token `token_ids[start:stop]`, from a ScoreResult of `token_ids` scored from
    `score_from` (<= start) with ranks; `k`: how many of its top-k entries to show.

    The UTF-8 completion context of position p is the actual tokens `token_ids[max(context_from, p - 4):p]`
    (vLLM: the positions that have log-probs: from 1 in a prompt, from the first generated token after it).
    """
    lo, hi = start - score_from, stop - score_from
    token_lp = scores.token_logprobs[lo:hi].tolist()
    ranks = scores.token_ranks[lo:hi].tolist()
    top_ids = scores.topk_ids[lo:hi, :k].tolist()
    top_lps = scores.topk_logprobs[lo:hi, :k].tolist()
    out: list[Position] = []
    for j, p in enumerate(range(start, stop)):
        actual = int(token_ids[p])
        ids = [actual, *top_ids[j]]
        strings = text.pieces(ids, token_ids[max(context_from, p - 4) : p])
        entry: Position = {actual: Entry(_finite(token_lp[j]), int(ranks[j]), strings[0])}
        for i, (tid, lp) in enumerate(zip(top_ids[j], top_lps[j], strict=True)):
            entry[int(tid)] = Entry(_finite(lp), i + 1, strings[i + 1])  # the actual token among them: replaced
        out.append(entry)
    return out


def prompt_logprobs_json(entries: Sequence[Position | None]) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs`: null, then {"id": {"logprob", "rank", "decoded_token"}} per position."""
    return [
        None
        if pos is None
        else {str(t): {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.text} for t, e in pos.items()}
        for pos in entries
    ]


def legacy_logprobs_json(
    token_ids: Sequence[int], entries: Sequence[Position | None], num_top: int, text: TokenText, as_ids: bool = False
) -> dict[str, list]:
    """The completions API's `logprobs` object over `token_ids` (`entries[i]` None: no log-prob there).

    `top_logprobs[i]` maps the strings of the first `num_top + 1` entries of position i (actual token first)
    to their log-probs; entries that decode to the same string keep the later one, as in vLLM.
    `as_ids`: tokens written as `token_id:N` (`return_tokens_as_token_ids`).
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0
    for tid, pos in zip(token_ids, entries, strict=True):
        if pos is None:
            token, lp, top = (f"token_id:{tid}" if as_ids else text.decode([int(tid)])), None, None
        else:
            token, lp = (f"token_id:{tid}" if as_ids else pos[int(tid)].text), pos[int(tid)].logprob
            top = {
                (f"token_id:{t}" if as_ids else e.text): e.logprob
                for i, (t, e) in enumerate(pos.items())
                if num_top == -1 or i <= num_top
            }
        offsets.append(offset)
        offset += len(token)
        tokens.append(token)
        token_logprobs.append(lp)
        top_logprobs.append(top)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top_logprobs}


def choice_json(
    index: int,
    text: str,
    finish_reason: str,
    stop_reason: int | None,
    *,
    logprobs: dict | None = None,
    prompt_logprobs: list | None = None,
    prompt_token_ids: list[int] | None = None,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
        "token_ids": token_ids,
        "prompt_logprobs": prompt_logprobs,
        "prompt_token_ids": prompt_token_ids,
        "routed_experts": None,
    }


def completion_json(
    request_id: str, created: int, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    from opd import __version__

    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": f"opd-{__version__}",
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def models_json(model: str, max_model_len: int, created: int) -> dict[str, Any]:
    """`GET /v1/models`: the one served model, in vLLM's shape."""
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "opd",
                "root": model,
                "parent": None,
                "max_model_len": max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{created:x}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
        ],
    }


def error_json(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError"}
    kind = kinds.get(status, "ServiceUnavailableError" if status == 503 else "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
