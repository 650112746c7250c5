"""The demo's task (plurals), its shipped prompt files, the student's layer choice and the report's statistics."""

from __future__ import annotations

import json
from importlib.resources import files
from types import SimpleNamespace

import numpy as np
import pytest

from opd_apps.demo.heldout import (
    SAMPLE_SEEDS,
    Item,
    ModelResult,
    TeacherReplies,
    agreement_per_item,
    answer_key,
    forced_sequences,
    load_model,
)
from opd_apps.demo.models import kept_layers
from opd_apps.demo.task import HELDOUT_SIZE, NOUNS, ROUND_SIZE, is_correct, plural, reward, split_nouns, write_files
from student_trainer.evaluation import bootstrap_ratio_interval

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("noun", "expected"),
    [
        ("cat", "cats"),
        ("bus", "buses"),
        ("box", "boxes"),
        ("church", "churches"),
        ("dish", "dishes"),
        ("city", "cities"),
        ("key", "keys"),
        ("boy", "boys"),
        ("buzz", "buzzes"),
    ],
)
def test_plural_follows_the_regular_rules(noun, expected):
    assert plural(noun) == expected


def test_nouns_are_unique_and_never_their_own_plural():
    assert len(NOUNS) == len(set(NOUNS)) >= HELDOUT_SIZE + 200
    assert all(plural(n) != n and n.isalpha() and n.islower() for n in NOUNS)


def test_split_is_disjoint_fixed_and_covers_every_noun():
    train, heldout = split_nouns()
    assert len(heldout) == HELDOUT_SIZE and not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(NOUNS)
    assert split_nouns() == (train, heldout)


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ('The plural of the word "cat" is cats.', True),
        ("CATS", True),
        ('\n\nThe plural is "cats".\nMore text', True),
        ("The plural of the word cat is cat.", False),  # the singular copied from the prompt
        ("catsup", False),  # not a whole word
        ("bobcats", False),
        ("The plural is cat.\ncats", False),  # only the first line counts
        ("", False),
    ],
)
def test_is_correct_wants_the_plural_as_a_whole_word_on_the_first_line(response, ok):
    assert is_correct(response, "cats") is ok


def test_reward_plugin_scores_a_prompt_record_and_skips_one_without_answer():
    assert reward("The plural is cities.", SimpleNamespace(answer="cities")) == 1.0
    assert reward("The plural is citys.", SimpleNamespace(answer="cities")) == 0.0
    assert reward("cities", SimpleNamespace(answer=None)) is None


def test_shipped_prompt_files_are_what_the_generator_writes(tmp_path):
    counts = write_files(tmp_path)
    assert counts == {
        "demo_train.jsonl": len(NOUNS) - HELDOUT_SIZE,
        "demo_heldout.jsonl": HELDOUT_SIZE,
        "demo_eval.jsonl": ROUND_SIZE,
    }
    shipped = files("opd_apps.demo") / "data"
    for name in counts:
        assert (shipped / name).read_text() == (tmp_path / name).read_text(), (
            f"opd_apps/demo/data/{name} is stale: run `python -m opd_apps.demo.task`"
        )
    train = {json.loads(line)["meta_noun"] for line in (tmp_path / "demo_train.jsonl").read_text().splitlines()}
    held = [json.loads(line) for line in (tmp_path / "demo_heldout.jsonl").read_text().splitlines()]
    assert not train & {row["meta_noun"] for row in held}
    assert all(row["answer"] == plural(row["meta_noun"]) and row["meta_noun"] in row["prompt"] for row in held)


def test_kept_layers_keeps_the_first_and_last_blocks():
    assert kept_layers(30, 4, 8) == [0, 1, 2, 3, *range(22, 30)]
    assert kept_layers(30, 0, 2) == [28, 29]
    assert kept_layers(6, 4, 4) == list(range(6))
    with pytest.raises(ValueError, match="keep at least one layer"):
        kept_layers(30, 0, 0)


def test_answer_key_normalises_the_first_line():
    assert answer_key("  The  Cats.\nsecond") == "the cats."
    assert answer_key("\n \n") is None


def test_bootstrap_interval_brackets_the_ratio_and_is_a_point_when_every_item_agrees_alike():
    pairs = [(a, 10) for a in (0, 2, 5, 7, 10, 3, 9, 1)]
    low, high = bootstrap_ratio_interval(pairs)
    ratio = sum(a for a, _ in pairs) / sum(t for _, t in pairs)
    assert 0 <= low < ratio < high <= 1
    assert bootstrap_ratio_interval(pairs) == (low, high)  # fixed seed
    assert bootstrap_ratio_interval([(3, 4)] * 20) == (0.75, 0.75)


def test_model_result_scores_and_diversity_show_a_collapsed_model():
    collapsed = ModelResult("student", ["The cats."] * 10, [True] + [False] * 9, agreement=[(1, 4)] * 10)
    score = collapsed.score()
    assert (score["correct"], score["items"], score["score"]) == (1, 10, 0.1)
    assert 0 < score["low"] < 0.1 < score["high"] < 1
    assert collapsed.diversity()["distinct_answers"] == pytest.approx(0.1)
    assert collapsed.top1_agreement()["value"] == 0.25
    varied = ModelResult("teacher", [f"The {w}s." for w in "abcdefghij"], [True] * 10)
    assert varied.diversity()["distinct_answers"] == 1.0 and varied.top1_agreement() is None


def test_forced_sequences_join_prompt_and_teacher_answer_and_skip_empty_answers():
    items = [Item("a", "p", "x", [1, 2, 3]), Item("b", "q", "y", [4]), Item("c", "r", "z", [5, 6])]
    assert forced_sequences(items, [[7, 8], [], [9]]) == [([1, 2, 3, 7, 8], 3), ([5, 6, 9], 2)]


def test_agreement_per_item_counts_each_answer_against_the_teacher_replies_fetched_once(tiny_model_dir):
    """A teacher whose top-1 is the student's own argmax agrees everywhere; one that never is agrees nowhere."""
    from opd_apps.eval.student import StudentScorer

    model = load_model(tiny_model_dir)
    sequences = [([5, 17, 40, 41, 42, 43], 3), ([9, 8, 7, 6, 5], 2)]
    argmax = [StudentScorer(model).score(ids, start).argmax_ids for ids, start in sequences]
    vocab = model.get_output_embeddings().weight.shape[0]

    def reply(ids_P):
        return SimpleNamespace(topk_ids=np.asarray(ids_P)[:, None], topk_logprobs=np.zeros((len(ids_P), 1)))

    replies = TeacherReplies(sequences, [reply(argmax[0]), reply((argmax[1] + 1) % vocab)])
    assert agreement_per_item(model, replies, sequences) == [(3, 3), (0, 3)]


def test_the_report_answers_through_the_rollout_engine_greedy_as_top1_and_samples_by_seed(tiny_model_dir):
    """Greedy through the engine (top-k 1) is transformers' argmax decoding; a seeded sample draws the same again."""
    import asyncio

    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from opd_apps.demo.heldout import answer_engine, answers, stop_ids

    model, tokenizer = load_model(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    items = [Item("a", "p", "x", [5, 17, 40]), Item("b", "q", "y", [9, 8, 7, 6])]
    stops = stop_ids(model)
    greedy, sampled = asyncio.run(answers(answer_engine(model, tokenizer), items, 6, stops, shown=1))
    for it, got in zip(items, greedy, strict=True):
        config = GenerationConfig(
            do_sample=False, max_new_tokens=6, eos_token_id=list(stops) or None, pad_token_id=(list(stops) or [0])[0]
        )
        with torch.inference_mode():
            want = model.generate(torch.tensor([it.prompt_ids]), generation_config=config)[0, len(it.prompt_ids) :]
        assert got == want.tolist() and 1 <= len(got) <= 6
    assert set(sampled) == {"a"} and set(sampled["a"]) == set(SAMPLE_SEEDS)
    again = asyncio.run(answers(answer_engine(model, tokenizer), items[:1], 6, stops, shown=1))[1]
    assert again == sampled
