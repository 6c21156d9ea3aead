"""Build the local lm-evaluation-harness tasks shipped in this folder from the embedded sample:
`python -m teleflm.eval.tasks.build` (deterministic; the JSONL files are committed).

Items come only from documents that `teleflm demo` holds out (its data.toml: seed 1234, held-out
fraction 0.05, one draw per document in reading order, as `teleflm data prepare` draws), so the demo
model is scored on text it never trained on. Each item is 4-way multiple choice (chance 25%):

- `teleflm_kjv_next_verse`: a chapter's heading and up to two verses; which verse comes next. The
  distractors are verses of other held-out chapters of the nearest lengths, renumbered as the answer.
- `teleflm_poem_next_line`: a poem's title, author and first lines; which line comes next. The
  distractors are lines of other poems with the same number of characters.
- `teleflm_kjv_word_order`: a chapter's heading and the verse before; which is the next verse as
  written, against three copies that each swap one pair of neighbouring words (minimal pairs, as in
  BLiMP). It asks for fluency rather than meaning, which small models learn first: the task that
  separates models after minutes of training, where the two above need far more.
"""

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np

from teleflm.data.sample import kjv_chapters, poems

HERE = Path(__file__).parent
SEED, HELDOUT_FRACTION = 1234, 0.05  # teleflm.data.sample.write_sample_corpus's data.toml
CHOICES = 4
MAX_ITEMS = 200
VERSE_START = re.compile(r"^ +(\d+) ", re.MULTILINE)


def heldout(documents: list[str], domain: str) -> list[str]:
    """The documents `teleflm data prepare` puts in the domain's val split."""
    rng = np.random.default_rng([SEED, int(hashlib.sha256(domain.encode()).hexdigest()[:8], 16)])
    chosen = rng.random(len(documents)) < HELDOUT_FRACTION
    return [doc for doc, keep in zip(documents, chosen, strict=True) if keep]


def verses(chapter: str) -> tuple[str, list[str]]:
    """(heading, verses as written: "  N text", wrapped lines included)."""
    heading, body = chapter.split("\n\n", 1)
    starts = [m.start() for m in VERSE_START.finditer(body)] + [len(body)]
    return heading, [body[a:b].rstrip("\n") for a, b in zip(starts, starts[1:], strict=False)]


def renumber(verse: str, number: str) -> str:
    return VERSE_START.sub(lambda m: m.group(0).replace(m.group(1), number), verse, count=1)


def kjv_items(rng: random.Random) -> list[dict]:
    chapters = [verses(c) for c in heldout(kjv_chapters(), "book_en")]
    pool = [(i, v) for i, (_, vs) in enumerate(chapters) for v in vs]
    items = []
    for i, (heading, vs) in enumerate(chapters):
        for k in range(1, len(vs)):
            answer = vs[k]
            number = VERSE_START.match(answer).group(1)
            # Verses repeat ("And the LORD spake unto Moses, saying,"): distractors must differ.
            others = {renumber(v, number) for j, v in pool if j != i} - {answer}
            distractors = sorted(others, key=lambda v: (abs(len(v) - len(answer)), v))[: CHOICES - 1]
            context = heading + "\n\n" + "\n".join(vs[max(0, k - 2) : k])
            items.append(choice_item(context, answer, distractors, rng))
    return rng.sample(items, min(MAX_ITEMS, len(items)))


def poem_items(rng: random.Random) -> list[dict]:
    lines_of = [p.split("\n") for p in poems()]
    by_length: dict[int, list[tuple[int, str]]] = {}
    for i, lines in enumerate(lines_of):
        for line in lines[2:]:  # after the title and author lines
            by_length.setdefault(len(line), []).append((i, line))
    held = set(heldout(poems(), "poetry_zh"))
    items = []
    for i, lines in enumerate(lines_of):
        if "\n".join(lines) not in held:
            continue
        for k in range(3, len(lines)):  # at least one verse line of context
            answer = lines[k]
            candidates = sorted(
                {line for j, line in by_length.get(len(answer), []) if j != i and line != answer}
            )
            if len(candidates) < CHOICES - 1:
                continue
            distractors = rng.sample(candidates, CHOICES - 1)
            items.append(choice_item("\n".join(lines[:k]), answer, distractors, rng))
    return rng.sample(items, min(MAX_ITEMS, len(items)))


def kjv_word_order_items(rng: random.Random) -> list[dict]:
    items = []
    for heading, vs in (verses(c) for c in heldout(kjv_chapters(), "book_en")):
        for k in range(1, len(vs)):
            number, *words = vs[k].split()
            # Minimal pairs: each distractor swaps one pair of neighbouring (different) words.
            swaps = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
            if len(swaps) < CHOICES - 1:
                continue
            distractors = []
            for i in sorted(rng.sample(swaps, CHOICES - 1)):
                swapped = [*words[:i], words[i + 1], words[i], *words[i + 2 :]]
                distractors.append("  " + " ".join([number, *swapped]))
            answer = "  " + " ".join([number, *words])
            items.append(choice_item(heading + "\n\n" + vs[k - 1], answer, distractors, rng))
    return rng.sample(items, min(MAX_ITEMS, len(items)))


def choice_item(context: str, answer: str, distractors: list[str], rng: random.Random) -> dict:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "answer": choices.index(answer)}


def write(name: str, items: list[dict]) -> None:
    with (HERE / f"{name}.jsonl").open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{name}: {len(items)} items")


if __name__ == "__main__":
    write("kjv_next_verse", kjv_items(random.Random(0)))
    write("poem_next_line", poem_items(random.Random(1)))
    write("kjv_word_order", kjv_word_order_items(random.Random(2)))
