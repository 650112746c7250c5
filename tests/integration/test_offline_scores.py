"""Offline scores: `opd score` against a real teacher, resumed after an interruption and extended, and the
trainer training from the file with no teacher running (real Redis, the tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from opd.loop_thread import LoopThread
from opd_apps.score.command import main as score_main
from student_trainer.config import TrainerConfig
from student_trainer.model import init_distributed
from student_trainer.runtime import TrainerRuntime
from student_trainer.score_sources.base import TeacherMismatch
from student_trainer.score_sources.offline import OfflineScoreSource
from student_trainer.score_sources.score_file import ScoreFileReader
from teacher_server.client import TeacherClientSync
from tests.fixtures.teacher import random_sequences, start_teacher
from tests.fixtures.trainer_runtime import trainer_config

pytestmark = pytest.mark.timeout(300)


def _rows(n: int, seed: int = 0) -> list[dict]:
    seqs = random_sequences(n, 384, min_len=8, max_len=24, seed=seed)
    return [{"id": f"s{seed}-{i}", "token_ids": s.tolist(), "score_from": 1 + i % 5} for i, s in enumerate(seqs)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(teacher: str, inp: Path, out: Path, *extra: str) -> int:
    return score_main(["--teacher", teacher, "--input", str(inp), "--output", str(out), "--no-progress", *extra])


def _scored_tokens(ops_url: str, client: str) -> float:
    text = httpx.get(f"{ops_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "opd_teacher_scored_tokens_total" and s.labels == {"client": client}:
                return s.value
    return 0.0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_opd_score_stores_the_teachers_scores_and_what_the_trainer_checks(dtype, hf_teacher, tiny_model_dir, tmp_path):
    rows = _rows(5)
    rows.append({"id": "chat", "messages": [{"role": "user", "content": "What is 2+2?"},
                                            {"role": "assistant", "content": "The answer is 4."}]})  # fmt: skip
    out = tmp_path / "scores.parquet"
    inp = _write(tmp_path / "in.jsonl", rows)
    assert (
        _score(hf_teacher.address, inp, out, "--top-k", "6", "--dtype", dtype, "--tokenizer", str(tiny_model_dir)) == 0
    )
    reader = ScoreFileReader(out)
    with TeacherClientSync(hf_teacher.address) as client:
        info = client.info()
        assert (reader.meta.teacher_model, reader.meta.tokenizer_fingerprint) == (
            info.model_name,
            info.tokenizer_fingerprint,
        )
        assert (reader.meta.top_k, reader.meta.dtype, reader.meta.vocab_size) == (6, dtype, 384)
        assert len(reader) == len(rows) and not Path(f"{out}.parts").exists()
        for row in rows:
            rid, ids, stored = reader.get(row["id"])
            expected = client.score(ids, stored.score_from, top_k=6)
            if row["id"] == "chat":  # the response starts after the rendered user turn and generation prompt
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(tiny_model_dir)
                prompt = tok.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
                assert stored.score_from == len(tok.encode(prompt, add_special_tokens=False))
            else:
                assert ids.tolist() == row["token_ids"] and stored.score_from == row["score_from"]
            # float32: two batches of the same engine (~1e-6); float16 storage: half an ulp, 2**-11 relative
            rtol, atol = (0.0, 1e-5) if dtype == "float32" else (2.0**-11, 1e-6)
            assert stored.topk_ids.tolist() == expected.topk_ids.tolist()
            for name in ("token_logprobs", "topk_logprobs", "tail_logprobs"):
                np.testing.assert_allclose(getattr(stored, name), getattr(expected, name), rtol=rtol, atol=atol)


def test_opd_score_resumes_without_scoring_a_row_twice_and_extends_a_finished_file(tiny_model_dir, tmp_path):
    teacher = start_teacher(tiny_model_dir, "hf")
    try:
        rows = _rows(12, seed=1)
        broken = [*rows[:9], {**rows[9], "score_from": 999}, *rows[10:]]  # stops the run at row 9
        inp, out = tmp_path / "in.jsonl", tmp_path / "scores.parquet"
        common = ("--top-k", "3", "--batch-size", "2", "--rows-per-part", "2", "--client-name", "score")
        assert _score(teacher.address, _write(inp, broken), out, *common) == 2
        parts = Path(f"{out}.parts")
        assert len(list(parts.glob("part-*.parquet"))) == 4 and not out.exists()  # rows 0-7, two per part
        (parts / "part-00099.tmp").write_bytes(b"a part a killed run never closed")
        done_before = _scored_tokens(teacher.ops_url, "score")
        assert _score(teacher.address, _write(inp, rows), out, *common) == 0
        positions = {r["id"]: len(r["token_ids"]) - r["score_from"] for r in rows}
        reader = ScoreFileReader(out)
        assert sorted(reader._where) == sorted(positions)  # every row once
        # the first run scored rows 0-8 (row 8 in an unwritten batch); the second only what was not written
        written_first = {rid for rid in positions if int(rid.split("-")[1]) < 8}
        assert _scored_tokens(teacher.ops_url, "score") - done_before == sum(
            n for rid, n in positions.items() if rid not in written_first
        )
        more = _rows(3, seed=2)
        before = _scored_tokens(teacher.ops_url, "score")
        assert _score(teacher.address, _write(inp, rows + more), out, *common) == 0
        assert len(ScoreFileReader(out)) == 15
        assert _scored_tokens(teacher.ops_url, "score") - before == sum(
            len(r["token_ids"]) - r["score_from"] for r in more
        )
        assert _score(teacher.address, inp, out, "--top-k", "4") == 2  # other settings than the file: refused
        assert len(ScoreFileReader(out)) == 15
    finally:
        teacher.stop()


@pytest.fixture
def io():
    loop = LoopThread("test-offline-io")
    yield loop
    loop.stop()


@pytest.fixture(scope="module")
def score_file(hf_teacher, tmp_path_factory):
    directory = tmp_path_factory.mktemp("offline")
    out = directory / "scores.parquet"
    assert _score(hf_teacher.address, _write(directory / "in.jsonl", _rows(2, seed=3)), out, "--top-k", "8") == 0
    return out


def test_the_trainer_trains_from_the_file_with_no_teacher_running(score_file, tiny_llama_dir, redis_url, namespace,
                                                                   tmp_path, io):  # fmt: skip
    config = trainer_config(
        tiny_llama_dir,  # the student: another model with the teacher's tokenizer
        "127.0.0.1:9",  # nothing listens there: the trainer never calls a teacher
        redis_url,
        namespace,
        tmp_path,
        batch={"groups_per_step": 2},
        optim={"lr": 3e-3},
        max_steps=4,
    )
    teacher = {"addresses": ["127.0.0.1:9"], "scores_file": str(score_file), "top_k": 5}
    config = TrainerConfig.model_validate({**config.model_dump(), "teacher": teacher})
    runtime = TrainerRuntime(config, init_distributed(config.dist), io)
    try:
        runtime.start()
        losses = []
        for _ in range(4):
            stats = runtime.trainer.step()
            runtime.after_step()
            losses.append(stats.loss)
    finally:
        runtime.close()
    steps = [json.loads(line) for line in (tmp_path / "ck" / "steps.jsonl").read_text().splitlines()]
    trained = [rid for s in steps for rid in s["rollouts"]]
    # both rows each step (the file holds two: later passes are `#eN` copies), fkl on the same data decreases
    assert sorted(r.split("#")[0] for r in trained) == sorted(["s3-0", "s3-1"] * 4)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_a_file_that_cannot_train_this_loss_is_refused_at_start(score_file, tiny_model_dir):
    base = {"model": str(tiny_model_dir), "loss": {"divergence": "fkl"}}
    from transformers import AutoTokenizer

    from protos.tokenizer_fingerprint import tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    too_many = OfflineScoreSource(TrainerConfig.model_validate({**base, "teacher": {"top_k": 9}}), str(score_file))
    with pytest.raises(TeacherMismatch, match="gives at most top-8"):
        too_many.check(fingerprint, 384, "student")
    hot = TrainerConfig.model_validate(
        {**base, "teacher": {"top_k": 5}, "loss": {"divergence": "fkl", "teacher_temperature": 2.0}}
    )
    with pytest.raises(TeacherMismatch, match="scored at temperature 1.0"):
        OfflineScoreSource(hot, str(score_file)).check(fingerprint, 384, "student")
    with pytest.raises(TeacherMismatch, match="tokenizer mismatch"):
        OfflineScoreSource(TrainerConfig.model_validate({**base, "teacher": {"top_k": 5}}), str(score_file)).check(
            "0" * 64, 384, "student"
        )
