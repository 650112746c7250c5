"""The tokenizer fingerprint changes exactly when the id -> token map or the special tokens change."""

from __future__ import annotations

import pytest

from protos.tokenizer_fingerprint import compute_fingerprint

pytestmark = pytest.mark.timeout(30)


def test_fingerprint_is_order_independent_but_id_sensitive():
    a = compute_fingerprint({"a": 0, "b": 1}, {"eos_token": "b"})
    assert a == compute_fingerprint({"b": 1, "a": 0}, {"eos_token": "b"})
    assert a != compute_fingerprint({"a": 1, "b": 0}, {"eos_token": "b"})
    assert a != compute_fingerprint({"a": 0, "b": 1}, {"eos_token": "a"})
    assert a != compute_fingerprint({"a": 0, "b": 1, "c": 2}, {"eos_token": "b"})
    assert len(a) == 64


def test_fingerprint_of_a_real_tokenizer_is_stable_across_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    from protos.tokenizer_fingerprint import tokenizer_fingerprint
    from tests.fixtures.tiny_models import build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path))
