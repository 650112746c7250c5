"""`opd convert-prompts`: the published MATH-500, AIME 2024/2025 and DAPO layouts -> opd prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.prompts import PromptSourceConfig, load_prompts, read_rows
from opd_apps.tools.prompt_convert import ConvertConfig, ConvertError, convert_file, convert_rows, detect_format, main

pytestmark = pytest.mark.timeout(60)
DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def _convert(name: str, tmp_path: Path, suffix: str = ".jsonl", **options) -> tuple[list[dict], dict]:
    out = tmp_path / f"out{suffix}"
    stats = convert_file(ConvertConfig(input=str(DATA / name), output=str(out), **options))
    return list(read_rows(out)), stats


def test_math500_rows(tmp_path: Path) -> None:
    rows, stats = _convert("math500_sample.jsonl", tmp_path)
    assert stats == {"read": 3, "written": 3, "duplicates": 0}
    assert rows[2] == {
        "id": "math500:test/algebra/3003.json",
        "prompt": "Simplify $\\sqrt{8}$.",
        "answer": "2\\sqrt{2}",
        "subject": "Algebra",
        "level": 3,
        "split": "eval",
    }
    assert all("solution" not in r for r in rows)


def test_aime2024_rows_turn_integer_answers_into_strings(tmp_path: Path) -> None:
    rows, _ = _convert("aime2024_sample.jsonl", tmp_path)
    assert [(r["id"], r["answer"]) for r in rows] == [("aime2024:2024-I-1", "49"), ("aime2024:2024-II-3", "24")]
    assert rows[0]["prompt"].startswith("Find the remainder") and rows[0]["split"] == "eval"


def test_aime2025_rows(tmp_path: Path) -> None:
    rows, _ = _convert("aime2025_sample.jsonl", tmp_path)
    assert [(r["id"], r["answer"]) for r in rows] == [("aime2025:0", "77"), ("aime2025:1", "16")]
    assert set(rows[0]) == {"id", "prompt", "answer", "split"}


def test_dapo_rows_keep_the_chat_messages_and_skip_repeated_ids(tmp_path: Path) -> None:
    rows, stats = _convert("dapo_sample.jsonl", tmp_path)
    assert stats == {"read": 3, "written": 2, "duplicates": 1}
    assert rows[0]["id"] == "dapo:9a3c0e1e-0001" and rows[0]["answer"] == "144" and rows[0]["split"] == "train"
    assert rows[0]["messages"][0]["role"] == "user" and "12 \\times 12" in rows[0]["messages"][0]["content"]
    rows, stats = _convert("dapo_sample.jsonl", tmp_path, dedupe=False, split="eval")
    assert stats["written"] == 3 and {r["split"] for r in rows} == {"eval"}


def test_dapo_from_parquet_with_nested_columns_equals_the_jsonl_conversion(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = list(read_rows(DATA / "dapo_sample.jsonl"))
    # nested Parquet types, as published: prompt list<struct<content, role>>, reward_model struct
    pq.write_table(pa.Table.from_pylist(source), tmp_path / "dapo.parquet")
    from_parquet = list(convert_rows(read_rows(tmp_path / "dapo.parquet"), "auto"))
    assert from_parquet == list(convert_rows(source, "dapo"))


def test_parquet_output_reads_back(tmp_path: Path) -> None:
    rows, _ = _convert("math500_sample.jsonl", tmp_path, suffix=".parquet")
    assert [r["answer"] for r in rows] == ["1", "2", "2\\sqrt{2}"]


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("math500_sample.jsonl", "math500"),
        ("aime2024_sample.jsonl", "aime2024"),
        ("aime2025_sample.jsonl", "aime2025"),
        ("dapo_sample.jsonl", "dapo"),
    ],
)
def test_auto_detects_each_layout(name: str, layout: str) -> None:
    assert detect_format(next(read_rows(DATA / name))) == layout


@pytest.mark.parametrize(
    "name", ["math500_sample.jsonl", "aime2024_sample.jsonl", "aime2025_sample.jsonl", "dapo_sample.jsonl"]
)
def test_converted_files_load_as_opd_prompts(name: str, tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    convert_file(ConvertConfig(input=str(DATA / name), output=str(out)))
    records = load_prompts(out, PromptSourceConfig(instruction="boxed"))
    assert records and all(r.answer and r.messages and r.messages[-1]["role"] == "user" for r in records)
    assert all("\\boxed{}" in r.messages[-1]["content"] for r in records)
    assert len({r.prompt_id for r in records}) == len(records)


def test_unknown_layout_and_missing_fields_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="match no known layout.*pass --format"):
        detect_format(["question", "solution"], "x.jsonl")
    with pytest.raises(ConvertError, match=r"row 0: field 'Answer' is missing"):
        list(convert_rows([{"ID": "1", "Problem": "p", "Answer": None}], "aime2024"))
    with pytest.raises(ConvertError, match="list of .*chat messages"):
        list(convert_rows([{"prompt": "text", "reward_model": {"ground_truth": "1"}}], "dapo"))
    with pytest.raises(ConvertError, match="ground_truth"):
        list(convert_rows([{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "x"}}], "dapo"))


def test_cli_converts_and_reports_bad_input(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.jsonl"
    assert main(["--input", str(DATA / "dapo_sample.jsonl"), "--output", str(out)]) == 0
    assert "2 prompts from 3 rows (1 repeated ids skipped)" in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [
        "dapo:9a3c0e1e-0001",
        "dapo:9a3c0e1e-0002",
    ]
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    assert main(["--input", str(bad), "--output", str(out)]) == 2
    assert "no known layout" in capsys.readouterr().err
