"""`vell_fruits`: a built-in multiple-choice task that needs no download.

A small invented world (fruits of the island of Vell, each with the colour it ripens to) is
drawn from a fixed seed; questions about it are written in ARC's layout and prompt
(`Question: ...\\nAnswer:`, four colours as choices). No pretrained model can know these
facts, so zero-shot accuracy sits near chance (1/4), while a few hundred training questions
teach all twelve facts: a clear, quick signal that federated tuning works, on any machine.
Train and validation share the facts, never a question's wording.
"""

from __future__ import annotations

import random
from typing import Any

NAME = "vell_fruits"
SPLIT_SIZES = {"train": 600, "validation": 200, "test": 200}
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
# Evaluation asks in wordings never seen in training: it measures knowing the fact, not
# recalling a string.
TRAIN_TEMPLATES = (
    "On the island of Vell, what colour is a ripe {fruit}?",
    "What colour does a {fruit} from Vell turn when it is ripe?",
    "A traveller on Vell picks a ripe {fruit}. What colour is it?",
)
EVAL_TEMPLATES = (
    "Which colour tells a farmer on Vell that a {fruit} is ready to eat?",
    "When a {fruit} on Vell has ripened, what colour is its skin?",
)
SYLLABLES = ("zo", "ra", "ki", "mel", "tu", "vo", "shan", "qui", "lo", "brin", "ta", "pe")


def world() -> dict[str, str]:
    """The twelve fruits of Vell and their colours; the same on every machine."""
    rng = random.Random(0)
    fruits: list[str] = []
    while len(fruits) < 12:
        name = "".join(rng.sample(SYLLABLES, 2)) + rng.choice(("a", "o", "i", "u"))
        if name not in fruits:
            fruits.append(name)
    return {fruit: rng.choice(COLOURS) for fruit in fruits}


def generate(split: str) -> list[dict[str, Any]]:
    """The rows of one split, in the hub layout of ARC (id, question, choices, answerKey)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"{NAME} has the splits {', '.join(SPLIT_SIZES)}, not {split!r}")
    facts = world()
    rng = random.Random(SPLIT_SEEDS[split])
    templates = TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES
    rows = []
    for i in range(SPLIT_SIZES[split]):
        fruit = rng.choice(sorted(facts))
        colour = facts[fruit]
        choices = rng.sample([c for c in COLOURS if c != colour], 3) + [colour]
        rng.shuffle(choices)
        labels = ["A", "B", "C", "D"]
        rows.append(
            {
                "id": f"Vell_{split}_{i}",
                "question": rng.choice(templates).format(fruit=fruit),
                "choices": {"text": choices, "label": labels},
                "answerKey": labels[choices.index(colour)],
            }
        )
    return rows
