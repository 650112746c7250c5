"""Prompt sources: JSONL and Parquet with configured fields, instructions, groups, epochs, chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.prompts import INSTRUCTIONS, PromptSourceConfig, PromptSourceError, load_prompts, render_prompt_ids
from protos.records import PromptRecord
from tests.fixtures.rollout import write_jsonl
from tests.fixtures.tiny_models import build_tokenizer

pytestmark = pytest.mark.timeout(60)

ROWS = [
    {"qid": "a", "question": "What is 2+2?", "solution": "4"},
    {"qid": "b", "question": "What is 3*3?", "solution": "9", "split": "eval"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _config(**kw) -> PromptSourceConfig:
    return PromptSourceConfig(id_field="qid", prompt_field="question", answer_field="solution", **kw)


def test_jsonl_with_custom_fields_boxed_instruction_and_groups(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "math.jsonl", ROWS)
    records = load_prompts(path, _config(instruction="boxed", n_samples=4, system_prompt="Be brief."))
    assert [r.prompt_id for r in records] == ["a", "b"]
    assert [r.split for r in records] == ["train", "eval"]
    first = records[0]
    assert first.group_size == 4 and first.answer == "4"
    assert first.messages[0] == {"role": "system", "content": "Be brief."}
    assert first.messages[1]["content"] == f"What is 2+2?\n\n{INSTRUCTIONS['boxed']}"
    assert PromptRecord.decode(first.encode()) == first


def test_parquet_matches_jsonl(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{**r, "split": r.get("split")} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "math.parquet")
    write_jsonl(tmp_path / "math.jsonl", ROWS)
    from_parquet = load_prompts(tmp_path / "math.parquet", _config())
    from_jsonl = load_prompts(tmp_path / "math.jsonl", _config())
    assert [(r.prompt_id, r.messages, r.answer, r.split) for r in from_parquet] == [
        (r.prompt_id, r.messages, r.answer, r.split) for r in from_jsonl
    ]


def test_messages_field_custom_instruction_epochs_and_limit(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(5)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    records = load_prompts(
        path, PromptSourceConfig(instruction_text="Answer in one word.", epochs=2, limit=3, shuffle=True, seed=1)
    )
    assert len(records) == 6
    assert {r.prompt_id for r in records} == {f"chat:{i}#e{e}" for i in range(3) for e in range(2)}
    assert all(r.messages[-1]["content"].endswith("Answer in one word.") for r in records)
    assert all(r.messages[-1]["content"].count("Answer in one word.") == 1 for r in records)


@pytest.mark.parametrize(
    ("rows", "kwargs", "needle"),
    [
        ([{"text": "hi"}], {}, "needs a non-empty string field 'prompt'"),
        ([{"prompt": "hi", "split": "test"}], {}, "field 'split' must be one of"),
        ([{"messages": [{"role": "user"}]}], {}, "list of {role, content}"),
        ([{"prompt": "hi", "tools": "calculator"}], {}, "list of tool names"),
        ([], {}, "holds no rows"),
    ],
)
def test_bad_rows_name_row_and_field(tmp_path: Path, rows, kwargs, needle) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PromptSourceError) as err:
        load_prompts(path, PromptSourceConfig(**kwargs))
    assert needle in str(err.value)
    if rows:
        assert "bad row 0" in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PromptSourceError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl", PromptSourceConfig())
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(PromptSourceError, match="--dataset-format"):
        load_prompts(tmp_path / "x.csv", PromptSourceConfig())
    (tmp_path / "broken.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(PromptSourceError, match="broken.jsonl:2: not valid JSON"):
        load_prompts(tmp_path / "broken.jsonl", PromptSourceConfig())


def test_render_uses_chat_template_with_generation_prompt(tokenizer) -> None:
    record = PromptRecord("p", messages=[{"role": "user", "content": "hello there"}])
    ids = render_prompt_ids(tokenizer, record)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"


def test_thinking_switch_reaches_the_template(tokenizer) -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<nothink>"
        "{% else %}<think>{% endif %}"
    )
    record = PromptRecord("p", messages=[{"role": "user", "content": "hi"}])
    assert tokenizer.decode(render_prompt_ids(tokenizer, record, enable_thinking=False)).endswith("<nothink>")
    assert tokenizer.decode(render_prompt_ids(tokenizer, record, enable_thinking=True)).endswith("<think>")
    assert tokenizer.decode(render_prompt_ids(tokenizer, record)).endswith("<think>")


def test_prompt_ids_pass_through_and_missing_template_is_explained(tokenizer) -> None:
    import numpy as np

    assert render_prompt_ids(tokenizer, PromptRecord("p", prompt_ids=np.array([5, 6], np.int32))) == [5, 6]
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(PromptSourceError, match="no chat template"):
        render_prompt_ids(bare, PromptRecord("p", messages=[{"role": "user", "content": "x"}]))
