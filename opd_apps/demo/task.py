"""The demo's task: the plural of an English noun, a skill the teacher has and the demo's student lacks.

Owns the task's items (a fixed list of common nouns with regular plurals:
`-s`, `-es` after s/x/z/ch/sh, `-ies` after a consonant + y; no irregular or
`-o`/`-f` nouns, so that the reference is never in doubt), the prompt text,
the split into training and held-out nouns, the reward plug-in the rollout
workers load (`--reward-function opd_apps.demo.task:reward`) and the writer
of the prompt files shipped in `opd_apps/demo/data/`:

    python -m opd_apps.demo.task [--out DIR]

SmolLM2-135M-Instruct answers "What is the plural of the word cat?" with a
sentence such as `The plural of the word "cat" is cats.`; the reward scores 1
when the first line of the response contains the reference plural as a whole
word (case-insensitive), so a model that copies the prompt's singular, or
answers every prompt alike, scores 0. Pure Python: no torch.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPT = "What is the plural of the word {word}?"
HELDOUT_SIZE = 120  # held-out nouns: never trained on; the report's before/after set
ROUND_SIZE = 24  # the first held-out nouns: the trainer's periodic eval rounds
SPLIT_SEED = 18

_NOUNS = """
actor airport album animal answer ant apple arm artist baby bag bakery ball balloon banana band bank barn basket
bath battery beach bean bear bed bee bell belt bench berry bike bird blanket blouse boat body bone book boot boss
bottle bowl box boy brain branch bread brick bridge brother brush bucket buddy bug building bus butterfly button
cabin cable cake camel camera camp canal candle cap car card carpet carrot cart castle cat cave cell chain chair
cheek chef cherry chest chicken church circle city class cliff clock closet cloud clown coach coast coat coin
collar comb computer cookie corner country cousin cow crab crayon crown cup curtain daisy dentist desk diamond diary
dinner dinosaur dish doctor dog doll dollar dolphin donkey door dragon drawer dress driver drum duck eagle ear egg
elephant engine engineer envelope eraser eye face factory fairy family fan farm farmer father feather fence ferry
field finger fire flag flower fly fork forest fox fridge friend frog galaxy game garage garden gate ghost gift
giraffe girl globe glove goat grape guest guitar hammer hammock hand harbor hat hawk head heart helmet hill hobby
hook horn horse hospital hotel hour house inch insect inventor island jacket jar jet jewel judge jungle kettle key
kid king kitchen kite kitten ladder lady lake lamp lawyer lemon lesson letter library lily lion lip lizard lobby
lock lunch magnet map maple marble market match meadow meal melody melon minute mirror monkey monster month moon
morning mother motor mountain mouth museum nail name neck nest night nose note notebook nurse nut ocean office onion
orange oven owl page painter pair palace pan panda parent park parrot party path peach peanut pear pen pencil penny
pepper pet phone picture pig pillow pilot pin pipe pirate pizza plane planet plant plate player pocket pond pony
pool puppy puzzle queen question rabbit rainbow rat recipe ring river road robot rock rocket roof room rose ruler
sailor salad sandwich saucer school scientist sea seat shark shell ship shirt shoe shop signal singer sister skate
skirt sky sled snail snake sock soldier song spider spoon spy square squirrel stamp star station statue stick stone
store story stove strawberry street student sun sweater swing table tablet tail taxi teacher temple tent ticket
tiger toad toe toilet tower town toy tractor train tray tree truck trumpet tulip tunnel turtle twin umbrella uncle
valley vase village violin wagon wall wallet watch whale wheel whistle window wing witch wizard worm writer yard
year zebra
"""
NOUNS: tuple[str, ...] = tuple(sorted(set(_NOUNS.split())))


def plural(noun: str) -> str:
    """The regular English plural: -es after s/x/z/ch/sh, -ies after consonant + y, else -s."""
    if re.search(r"(s|x|z|ch|sh)$", noun):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


def split_nouns(seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(training nouns, held-out nouns): a fixed shuffle, the last HELDOUT_SIZE held out."""
    nouns = list(NOUNS)
    random.Random(seed).shuffle(nouns)
    return nouns[:-HELDOUT_SIZE], nouns[-HELDOUT_SIZE:]


def rows(nouns: Sequence[str], prefix: str) -> list[dict[str, Any]]:
    """Prompt-file rows (the fields `opd.prompts` reads: id, prompt, answer)."""
    return [
        {"id": f"{prefix}-{i:03d}", "prompt": PROMPT.format(word=noun), "answer": plural(noun), "meta_noun": noun}
        for i, noun in enumerate(nouns)
    ]


def is_correct(response: str, answer: str) -> bool:
    """The first non-empty line of `response` contains `answer` as a whole word (case-insensitive)."""
    lines = [line for line in response.strip().splitlines() if line.strip()]
    return bool(lines) and re.search(rf"(?<![\w-]){re.escape(answer)}(?![\w-])", lines[0], re.IGNORECASE) is not None


def reward(response: str, prompt: Any) -> float | None:
    """Rollout reward plug-in (`fn(response_text, prompt_record)`): 1.0 correct, 0.0 not, None without an answer."""
    answer = getattr(prompt, "answer", None)
    return None if answer is None else float(is_correct(response, answer))


def write_files(out: Path) -> dict[str, int]:
    """Write demo_train.jsonl, demo_heldout.jsonl and demo_eval.jsonl under `out`; returns rows per file."""
    train, heldout = split_nouns()
    files = {
        "demo_train.jsonl": rows(train, "plural-train"),
        "demo_heldout.jsonl": rows(heldout, "plural-heldout"),
        "demo_eval.jsonl": rows(heldout[:ROUND_SIZE], "plural-heldout"),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, items in files.items():
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in items))
    return {name: len(items) for name, items in files.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m opd_apps.demo.task", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data", help="directory for the prompt files")
    for name, count in write_files(p.parse_args(argv).out).items():
        print(f"{name}: {count} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
