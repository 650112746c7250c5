"""The tokenizer fingerprint: the one definition that teacher and student compare.

fingerprint = sha256 of canonical JSON (sorted keys, no spaces, UTF-8) of
    {"vocab": [token_0, token_1, ...],            # id-ordered; ids with no token are null
     "special_tokens": {name: token or [tokens]}}  # the special-token map
Two tokenizers with the same fingerprint map every id to the same string and
agree on which tokens are special, which is what per-token scores need.
No transformers import: anything with `get_vocab()` and `special_tokens_map` works.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Protocol


class TokenizerLike(Protocol):
    special_tokens_map: Mapping[str, Any]

    def get_vocab(self) -> Mapping[str, int]: ...


def compute_fingerprint(vocab: Mapping[str, int], special_tokens: Mapping[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of the id-ordered vocabulary and the special-token map."""
    size = max(vocab.values(), default=-1) + 1
    ordered: list[str | None] = [None] * size
    for token, idx in vocab.items():
        ordered[idx] = token
    specials = {
        str(k): ([str(t) for t in v] if isinstance(v, (list, tuple)) else str(v)) for k, v in special_tokens.items()
    }
    canonical = json.dumps(
        {"vocab": ordered, "special_tokens": specials}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> str:
    """Fingerprint of a transformers (or compatible) tokenizer."""
    return compute_fingerprint(tokenizer.get_vocab(), tokenizer.special_tokens_map)
