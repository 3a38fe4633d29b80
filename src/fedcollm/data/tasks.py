"""Tasks: lm-evaluation-harness task files, the built-in ones shipped in `task_files/`.

A task is named by a built-in name (`arc_easy`, `tfns`, ...) or by the path of a task file.
Its rows become `Question`s: the prompt (`context`), the choices and the correct one
(multiple choice) or the reference answer (generation). lm-eval scores the continuation
`target_delimiter + choice` after the prompt; training uses the very same text, with the
loss on the continuation of the correct answer only.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcollm.config import Config
from fedcollm.data.rows import DataError, Row, read_rows
from fedcollm.data.taskfile import TaskFile, read_task_file
from fedcollm.data.templates import (
    BadRow,
    BadTemplate,
    Template,
    choices,
    shown,
    target,
    text,
)

TASK_FILES = Path(__file__).parent / "task_files"
TASKS: dict[str, Path] = {p.stem: p for p in sorted(TASK_FILES.glob("*.yaml"))}
TASK_FILE_SUFFIXES = (".yaml", ".yml")
EVAL_SAMPLE_SEED = 0


@dataclass(frozen=True)
class Question:
    id: str
    context: str
    # The choices and the correct one's index; () and -1 for a generative task.
    choices: tuple[str, ...]
    gold: int
    # The answer the model learns and is scored against: the correct choice or the reference.
    answer: str
    delimiter: str = " "
    # The row itself: natural partitions group by its fields.
    doc: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # A generative row's other references (SciTLDR has several), scored beside `answer`.
    other_references: tuple[str, ...] = ()

    @property
    def continuation(self) -> str:
        return self.delimiter + self.answer

    @property
    def references(self) -> tuple[str, ...]:
        """Every reference a generation is scored against, the trained one first."""
        return (self.answer, *self.other_references)


class Task:
    """A task file with its templates compiled."""

    def __init__(self, spec: TaskFile) -> None:
        self.spec = spec
        try:
            self.templates = {
                key: Template(key, value)
                for key, value in (
                    ("description", spec.description),
                    ("doc_to_text", spec.doc_to_text),
                    ("doc_to_choice", spec.doc_to_choice),
                    ("doc_to_target", spec.doc_to_target),
                )
            }
        except BadTemplate as err:
            raise DataError(f"{spec.path}: {err}") from None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def generative(self) -> bool:
        return self.spec.generative

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What evaluation reports, headline first; generation always adds the target loss
        (cheap and noise-free, so it can be tracked every round)."""
        names = tuple(m.name for m in self.spec.metrics)
        return names + ("target_loss",) * (self.generative and "target_loss" not in names)

    def question(self, row: Row, index: int, split: str) -> Question:
        spec, doc, templates = self.spec, row.doc, self.templates
        context = templates["description"].render(doc) + text(templates["doc_to_text"], doc)
        others: tuple[str, ...] = ()
        if spec.generative:
            answer = target(templates["doc_to_target"], doc, is_choice=False)
            if isinstance(answer, list):
                answer, others = answer[0], tuple(answer[1:])
            if not answer.strip():
                raise BadRow("doc_to_target gives an empty answer; every row needs one")
            options, gold = (), -1
        else:
            options = tuple(choices(templates["doc_to_choice"], doc))
            answer = target(templates["doc_to_target"], doc, is_choice=True)
            gold = answer if isinstance(answer, int) else _index(options, answer)
            if not 0 <= gold < len(options):
                raise BadRow(f"doc_to_target {answer!r} is not among the choices {list(options)}")
            answer = options[gold]
        return Question(
            id=str(doc.get("id", f"{split}-{index}")),
            context=context,
            choices=options,
            gold=gold,
            answer=answer,
            delimiter=spec.target_delimiter,
            doc=doc,
            other_references=others,
        )


def _index(options: tuple[str, ...], answer: str) -> int:
    return options.index(answer) if answer in options else -1


def is_task_file(name: str) -> bool:
    return name.endswith(TASK_FILE_SUFFIXES)


def get_task(name: str) -> Task:
    """The task of a built-in name or a task file's path."""
    if is_task_file(name):
        return Task(read_task_file(name))
    if name not in TASKS:
        raise DataError(
            f"unknown task {name!r}; choose one of {', '.join(TASKS)}, or give the path of a "
            "task file (.yaml)"
        )
    return Task(read_task_file(TASKS[name]))


def split_files(task: Task, split: str, data_dir: str | Path | None) -> list[Path]:
    """The data files of one split (relative paths: under `data_dir`, else beside the task
    file); [] for a task whose rows come from its `custom_dataset`."""
    spec = task.spec
    if spec.custom_dataset is not None:
        return []
    if split not in spec.data_files:
        if not spec.data_files and spec.dataset_path not in ("json", "csv", "parquet"):
            raise DataError(
                f"{spec.path}: dataset_path {spec.dataset_path!r} is a hub data set, which "
                "cannot be reached here; give dataset_path: json and dataset_kwargs.data_files"
            )
        raise DataError(
            f"{spec.path}: split {split!r} has no file in dataset_kwargs.data_files; add one"
        )
    base = Path(data_dir).expanduser() if data_dir else spec.path.parent
    return [base / Path(name).expanduser() for name in spec.data_files[split]]


def _split_rows(task: Task, split: str, data_dir: str | Path | None) -> list[Row]:
    spec = task.spec
    if spec.custom_dataset is not None:
        docs = spec.custom_dataset()[split]
        return [Row(dict(doc), f"{spec.name} {split} row {i}") for i, doc in enumerate(docs)]
    rows = []
    for path in split_files(task, split, data_dir):
        rows += read_rows(path, spec.dataset_path)
    return rows


def _processed(task: Task, rows: list[Row]) -> list[Row]:
    """lm-eval's `process_docs`, which takes and returns a `datasets.Dataset`."""
    if task.spec.process_docs is None:
        return rows
    import datasets

    datasets.disable_progress_bars()
    try:
        returned = task.spec.process_docs(datasets.Dataset.from_list([r.doc for r in rows]))
    except Exception as err:  # noqa: BLE001 - the user's function: name it, once
        raise DataError(
            f"{task.spec.path}: process_docs fails ({err!r}); fix the function"
        ) from None
    fix = "return the rows (a datasets.Dataset or a list of dicts)"
    if returned is None or isinstance(returned, str | bytes | Mapping):
        raise DataError(f"{task.spec.path}: process_docs returned {type(returned).__name__}; {fix}")
    docs = list(returned)
    for i, doc in enumerate(docs):
        if not isinstance(doc, Mapping):
            raise DataError(
                f"{task.spec.path}: process_docs returned {type(doc).__name__} "
                f"{shown(doc)} as row {i}; {fix}"
            )
    return [Row(dict(doc), f"{task.name} processed row {i}") for i, doc in enumerate(docs)]


def split_questions(task: Task, role: str, data_dir: str | Path | None) -> list[Question]:
    """Every question of one of the task's splits ("train", "validation" or "test")."""
    split = task.spec.split(role)
    questions = []
    for index, row in enumerate(_processed(task, _split_rows(task, split, data_dir))):
        try:
            questions.append(task.question(row, index, split))
        except BadRow as err:
            raise DataError(
                f"{row.where}: {err} (task {task.spec.path}); fix the row or the template"
            ) from None
    if not questions:
        raise DataError(f"{task.spec.path}: split {split!r} holds no rows")
    return questions


def load_questions(task_name: str, role: str, data_dir: str | Path | None) -> list[Question]:
    return split_questions(get_task(task_name), role, data_dir)


def take(questions: list[Question], limit: int, sample: str = "first") -> list[Question]:
    """`limit` of the questions (0: all): the first ones, or a random draw in file order.
    The draw's seed is fixed, not the run's: every seed and method scores the same
    questions, so their answers pair up."""
    if not limit or limit >= len(questions):
        return questions
    if sample == "first":
        return questions[:limit]
    drawn = sorted(random.Random(EVAL_SAMPLE_SEED).sample(range(len(questions)), limit))
    return [questions[i] for i in drawn]


def evaluation_questions(config: Config) -> list[Question]:
    """The questions a run is scored on: the config's evaluation split, up to its limit."""
    questions = load_questions(config.task, config.eval.split, config.data_dir)
    return take(questions, config.eval.limit, config.eval.sample)
