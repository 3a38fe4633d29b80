"""The four multiple-choice QA tasks of the paper, with lm-evaluation-harness prompts, and
the built-in `vell_fruits` task generated in code.

A row becomes a `Question`: a context (the prompt) and the choice strings. lm-eval scores the
continuation `" " + choice` after the context; training uses the very same text, with the
loss on the continuation of the correct choice only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcollm.config import Config
from fedcollm.data import synthetic

TARGET_DELIMITER = " "


class DataError(ValueError):
    """A data file that cannot be read as the task expects; names the file and line."""


@dataclass(frozen=True)
class Question:
    id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    # The answer's label as the file writes it ("A", "1", ...), and where the question comes
    # from (non-IID splits group by `source`, or by the answer's position `gold`).
    label: str
    source: str

    @property
    def answer(self) -> str:
        return self.choices[self.gold]


class BadRow(ValueError):
    """What is wrong with one row; the reader adds the file and line."""


def _text(row: dict[str, Any], *path: str) -> str:
    """A field that must hold text: `_text(row, "choices", "label")` is row["choices"]["label"]."""
    value: Any = row
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise BadRow(f"missing field {'.'.join(path)!r}")
        value = value[key]
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"field {'.'.join(path)!r} must be non-empty text, got {value!r}")
    return value


def _choices(row: dict[str, Any], answer: str) -> tuple[list[str], list[str], int]:
    """The choice texts and labels of a row in hub layout, and the answer's position."""
    choices = row.get("choices")
    if not isinstance(choices, dict) or not {"text", "label"} <= set(choices):
        raise BadRow("missing field 'choices' with 'text' and 'label' lists")
    texts, labels = choices["text"], choices["label"]
    if not isinstance(texts, list) or not isinstance(labels, list):
        raise BadRow("choices.text and choices.label must be lists")
    if len(texts) != len(labels):
        raise BadRow(f"{len(texts)} choice texts but {len(labels)} labels")
    if len(texts) < 2:
        raise BadRow(f"{len(texts)} choices; a question needs at least 2")
    for k, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise BadRow(f"choice {k + 1} is empty ({text!r}); every choice needs text")
    if any(not isinstance(label, str) for label in labels):
        raise BadRow(f"choice labels must be text, got {labels!r}")
    if answer not in labels:
        raise BadRow(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return texts, labels, labels.index(answer)


def _arc(row: dict[str, Any]) -> Question:
    answer = _text(row, "answerKey")
    texts, _, gold = _choices(row, answer)
    return Question(
        id=_text(row, "id"),
        context=f"Question: {_text(row, 'question')}\nAnswer:",
        choices=tuple(texts),
        gold=gold,
        label=answer,
        # ARC ids name the exam they come from: "Mercury_7175875", "NYSEDREGENTS_2010_8_12".
        source=row["id"].split("_")[0],
    )


def _openbookqa(row: dict[str, Any]) -> Question:
    answer = _text(row, "answerKey").strip()
    texts, _, gold = _choices(row, answer)
    return Question(
        id=_text(row, "id"),
        context=_text(row, "question_stem"),
        choices=tuple(texts),
        gold=gold,
        label=answer,
        source="openbookqa",
    )


def _commonsense_qa(row: dict[str, Any]) -> Question:
    answer = _text(row, "answerKey")
    texts, labels, gold = _choices(row, answer)
    listed = "".join(f"\n{label}. {text}" for label, text in zip(labels, texts, strict=True))
    return Question(
        id=_text(row, "id"),
        context=f"Question: {_text(row, 'question').strip()}{listed}\nAnswer:",
        # lm-eval answers CommonsenseQA with the letter, not the choice text.
        choices=tuple(labels),
        gold=gold,
        label=answer,
        source=row.get("question_concept", "commonsense_qa"),
    )


@dataclass(frozen=True)
class Task:
    name: str
    hub_path: str
    hub_name: str | None
    to_question: Callable[[dict[str, Any]], Question]


TASKS: dict[str, Task] = {
    "arc_easy": Task("arc_easy", "allenai/ai2_arc", "ARC-Easy", _arc),
    "arc_challenge": Task("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", _arc),
    "openbookqa": Task("openbookqa", "allenai/openbookqa", "main", _openbookqa),
    "commonsense_qa": Task("commonsense_qa", "tau/commonsense_qa", None, _commonsense_qa),
    # Generated in code (see synthetic.py); ARC's layout and prompt.
    synthetic.NAME: Task(synthetic.NAME, "", None, _arc),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def _read_jsonl(path: Path, task: Task) -> list[Question]:
    questions = []
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: not a JSON object but {type(row).__name__}")
        try:
            questions.append(task.to_question(row))
        except BadRow as err:
            raise DataError(
                f"{path}:{number}: {err} (task {task.name}); fix or remove the row"
            ) from None
    if not questions:
        raise DataError(f"{path} holds no questions; it needs one JSON object per line")
    return questions


def _read_hub(task: Task, split: str) -> list[Question]:
    import datasets  # imported here: only hub runs pay for it

    try:
        rows = datasets.load_dataset(task.hub_path, task.hub_name, split=split)
    except Exception as err:  # noqa: BLE001 - any hub failure means the same to the user
        raise DataError(
            f"could not load {task.hub_path} ({split}) from the hub: {err}. "
            "Without a hub, pass --data-dir with a directory holding <task>/<split>.jsonl"
        ) from None
    return [task.to_question(row) for row in rows]


def load_questions(task_name: str, split: str, data_dir: str | Path | None) -> list[Question]:
    """All questions of one split, from `data_dir/<task>/<split>.jsonl` or else from the hub."""
    task = get_task(task_name)
    if task.name == synthetic.NAME:
        return [task.to_question(row) for row in synthetic.generate(split)]
    if not data_dir:
        return _read_hub(task, split)
    path = Path(data_dir).expanduser() / task.name / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; the data directory must hold {task.name}/{split}.jsonl"
        )
    return _read_jsonl(path, task)


def evaluation_questions(config: Config) -> list[Question]:
    """The questions a run is scored on: the config's evaluation split, up to its limit."""
    questions = load_questions(config.task, config.eval.split, config.data_dir)
    return questions[: config.eval.limit] if config.eval.limit else questions
