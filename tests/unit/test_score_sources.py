"""Pure logic of the extra score sources: reading vLLM's prompt_logprobs, the tail mass, folding a top-k'
into a top-k, the config refusals of what HTTP teachers / offline scores / several teachers cannot do, and
the rows `opd score` accepts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opd.prompts import PromptSourceConfig, PromptSourceError, row_to_record
from opd_apps.score.input import InputError, sequence
from student_trainer.config import TrainerConfig
from student_trainer.score_sources.offline import fewer_topk
from student_trainer.score_sources.openai_client import (
    TeacherHTTPError,
    scores_from_prompt_logprobs,
    tail_logprobs,
)
from teacher_server.client import TeacherScores

pytestmark = pytest.mark.timeout(60)


def _vllm_positions(logprobs_LV: np.ndarray, ids: list[int], k: int) -> list:
    """What vLLM's server answers for these exact distributions: null, then actual token + top-k by rank."""
    out: list = [None]
    for p in range(1, len(ids)):
        row = logprobs_LV[p].astype(np.float32)
        order = np.argsort(-row, kind="stable")
        actual = ids[p]
        entry = {str(actual): {"logprob": float(row[actual]), "rank": int((row >= row[actual]).sum())}}
        for r, t in enumerate(order[:k]):
            entry[str(int(t))] = {"logprob": max(float(row[t]), -9999.0), "rank": r + 1}
        out.append(entry)
    return out


def _distributions(length: int, vocab: int, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0, 3, (length, vocab))
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def test_prompt_logprobs_are_read_back_into_topk_and_an_exact_tail():
    lp = _distributions(12, 40, 0)
    ids = [int(np.argmax(lp[p])) if p % 3 == 0 else (p * 7) % 40 for p in range(12)]  # some actual tokens are top-1
    k = 5
    scores = scores_from_prompt_logprobs(_vllm_positions(lp, ids, k), ids, 2, k)
    assert scores.topk_ids.shape == (10, k) and scores.score_from == 2
    for j, p in enumerate(range(2, 12)):
        order = np.argsort(-lp[p])
        assert scores.topk_ids[j].tolist() == order[:k].tolist()
        assert scores.token_logprobs[j] == pytest.approx(lp[p, ids[p]], abs=1e-6)  # float32 of the value
        rest = np.logaddexp.reduce(lp[p, order[k:]])
        assert scores.tail_logprobs[j] == pytest.approx(rest, abs=1e-5)  # float32 top-k, float64 arithmetic


def test_the_tail_keeps_a_tiny_remainder_and_an_empty_one():
    assert tail_logprobs(np.array([[-1e-9]], np.float32))[0] == pytest.approx(math.log(1e-9), abs=1e-3)
    assert tail_logprobs(np.array([[0.0, -math.inf]]))[0] == -math.inf  # the top-k holds all the mass
    assert tail_logprobs(np.zeros((3, 0))).tolist() == [0.0, 0.0, 0.0]  # k = 0: the whole mass


def test_vllms_minus_9999_reads_as_minus_infinity_and_a_short_entry_is_refused():
    ids = [1, 2]
    answer = [None, {"2": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -9999.0, "rank": 2}}]
    scores = scores_from_prompt_logprobs(answer, ids, 1, 2)
    assert scores.topk_logprobs[0, 1] == -math.inf
    with pytest.raises(TeacherHTTPError, match="3 or 4"):
        scores_from_prompt_logprobs(answer, ids, 1, 3)
    with pytest.raises(TeacherHTTPError, match="lacks the prompt's token 2"):
        scores_from_prompt_logprobs([None, {"5": {"logprob": -1.0, "rank": 1}}], ids, 1, 1)


def test_fewer_topk_folds_the_rest_into_the_tail_exactly():
    lp = _distributions(4, 30, 1)
    order = np.argsort(-lp, axis=1)
    take = lambda k: np.take_along_axis(lp, order[:, :k], axis=1)  # noqa: E731
    wide = TeacherScores("r", 1, lp[:, 0], order[:, :8].astype(np.int32), take(8), np.logaddexp.reduce(
        np.take_along_axis(lp, order[:, 8:], axis=1), axis=1))  # fmt: skip
    narrow = fewer_topk(wide, 3)
    assert narrow.topk_ids.tolist() == order[:, :3].tolist()
    expected = np.logaddexp.reduce(np.take_along_axis(lp, order[:, 3:], axis=1), axis=1)
    np.testing.assert_allclose(narrow.tail_logprobs, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"teacher": {"addresses": ["http://vllm:8000"]}}, "needs teacher.tokenizer"),
        ({"teacher": {"addresses": ["http://vllm:8000", "t:50051"], "tokenizer": "t"}}, "mixes http(s)://"),
        ({"teacher": {"addresses": ["http://v:1"], "tokenizer": "t"}, "loss": {"teacher_temperature": 2.0}},
         "set loss.teacher_temperature=1"),
        ({"loss": {"divergence": "fkl"}, "teachers": {"code": {"top_k": 5}}}, "teachers.code.top_k=5"),
        ({"teachers": {"bad name": {}}}, "domain name 'bad name'"),
        ({"teacher": {"scores_file": "s.parquet"}}, "offline scores need a top-k divergence"),
        ({"teacher": {"scores_file": "s.parquet"}, "loss": {"divergence": "fkl"}, "data": {"prompts": "p.jsonl"}},
         "set teacher.scores_file or those"),
        ({"teacher": {"scores_file": "s.parquet"}, "loss": {"divergence": "fkl"}, "teachers": {"a": {}}},
         "leave `teachers` empty"),
    ],
)  # fmt: skip
def test_the_config_refuses_what_a_teacher_source_cannot_do(overrides, needle):
    with pytest.raises(ValueError) as err:
        TrainerConfig.model_validate({"model": "m", **overrides})
    assert needle in str(err.value)


def test_the_config_accepts_several_teachers_and_an_http_teacher():
    config = TrainerConfig.model_validate(
        {
            "model": "m",
            "loss": {"divergence": "fkl"},
            "teacher": {"addresses": ["http://vllm:8000"], "tokenizer": "tok"},
            "teachers": {"code": {"addresses": ["code-teacher:50051"], "top_k": 20}},
        }
    )
    assert config.teacher.is_http and not config.teachers["code"].is_http


def test_a_prompt_rows_teacher_field_becomes_the_records_domain():
    config = PromptSourceConfig()
    assert row_to_record({"prompt": "2+2?", "teacher": "math"}, 0, config).teacher == "math"
    assert row_to_record({"prompt": "2+2?"}, 0, config).teacher is None
    with pytest.raises(PromptSourceError, match="field 'teacher' must name a teacher domain"):
        row_to_record({"prompt": "2+2?", "teacher": "math teacher"}, 3, config)


class _Template:
    """A tokenizer with a chat template that renders the turns before the response as a prefix."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_score_input_rows_in_every_form():
    ids, score_from = sequence({"token_ids": [1, 2, 3, 4], "score_from": 2}, "r", None)
    assert ids.tolist() == [1, 2, 3, 4] and score_from == 2
    ids, score_from = sequence({"prompt_ids": [1, 2], "response_ids": [3]}, "r", None)
    assert ids.tolist() == [1, 2, 3] and score_from == 2
    ids, score_from = sequence({"prompt": "hi", "response": "yo"}, "r", _Template())
    assert "".join(map(chr, ids[score_from:])) == "yo"
    with pytest.raises(InputError, match="needs --tokenizer"):
        sequence({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "r", None)
    with pytest.raises(InputError, match="score_from=4 must be in"):
        sequence({"token_ids": [1, 2, 3], "score_from": 4}, "r", None)
    with pytest.raises(InputError, match="last of 'messages' must be the assistant"):
        sequence(
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "r", _Template()
        )


def test_a_domain_teachers_token_is_redacted_like_the_default_teachers():
    from opd.redaction import REDACTED, redacted_dump

    config = TrainerConfig.model_validate(
        {"model": "m", "teacher": {"token": "t0p"}, "teachers": {"code": {"addresses": ["c:1"], "token": "s3cret"}}}
    )
    dumped = redacted_dump(config)
    assert dumped["teacher"]["token"] == dumped["teachers"]["code"]["token"] == REDACTED
    assert dumped["teachers"]["code"]["addresses"] == ["c:1"]
