"""A task's metrics on a model: multiple choice by log-likelihood (and FlowerTune's parsed
generations), generation by its text and its reference's loss. A metric is a mean over
questions with the standard error lm-eval reports (sample standard deviation over sqrt(n)),
or a corpus-level score (BLEU, chrF++) with lm-eval's bootstrap standard error; multiple
choice also reports the majority-class floor beside it. Scores keep what each question got
(its id, the answer given, each metric's value, and each choice's log-likelihood), so that
two models can be compared on the same questions."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedcollm.config import Config
from fedcollm.data import Question, Task, get_task
from fedcollm.data.encoding import as_prompted
from fedcollm.data.taskfile import Metric as MetricEntry
from fedcollm.evaluation.metrics import Answers, metric_spec


@dataclass
class Scores:
    """Per-question values of each metric (headline first), and the majority floor; with
    each question's id, the answer given (a choice's index, or the generated text) and, for
    multiple choice, every choice's summed log-likelihood."""

    values: dict[str, list[float]]
    majority: float | None = None
    ids: list[str] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    choice_loglikelihoods: list[list[float]] | None = None
    # A corpus-level metric's (score, bootstrap standard error); its `values` are then the
    # sentence scores a paired test compares.
    corpus: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(next(iter(self.values.values())))

    def mean(self, metric: str) -> float:
        """The task's score: the mean over questions, or the corpus-level score."""
        if metric in self.corpus:
            return self.corpus[metric][0]
        return statistics.fmean(self.values[metric])

    def stderr(self, metric: str) -> float:
        if metric in self.corpus:
            return self.corpus[metric][1]
        values = self.values[metric]
        return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in self.values:
            out[metric] = self.mean(metric)
            out[f"{metric}_stderr"] = self.stderr(metric)
        out["n"] = self.n
        if self.majority is not None:
            out["majority"] = self.majority
        return out

    def predictions(self) -> dict[str, list]:
        """Per question, as columns: `id`, `answer`, each metric's value and (multiple
        choice) `choice_loglikelihoods`. What a paired test between two models needs."""
        columns: dict[str, list] = {"id": self.ids, "answer": self.answers, **self.values}
        if self.choice_loglikelihoods is not None:
            columns["choice_loglikelihoods"] = [
                [round(ll, 4) for ll in lls] for lls in self.choice_loglikelihoods
            ]
        return columns


def majority_share(questions: Sequence[Question]) -> float:
    """The accuracy of always giving the most common correct choice: by position, which for
    fixed choices (yes/no) is the class and for ARC's varying ones is all a constant
    answer can be (always "the first")."""
    return Counter(q.gold for q in questions).most_common(1)[0][1] / len(questions)


BOOTSTRAP_RESAMPLES = 100  # lm-eval's for its corpus-level metrics (bleu, chrf, ter)


def corpus_with_stderr(corpus, answers: Answers) -> tuple[float, float]:
    """A corpus-level score and its standard error, the spread of the score over questions
    resampled with replacement (lm-eval's bootstrap), with a fixed seed."""
    generations, references = answers.generations, [q.references for q in answers.questions]
    value = corpus(generations, references)
    draw, n = random.Random(0), len(generations)
    resampled = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        picks = [draw.randrange(n) for _ in range(n)]
        resampled.append(corpus([generations[i] for i in picks], [references[i] for i in picks]))
    return value, statistics.stdev(resampled)


def evaluate_task(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    questions: Sequence[Question],
    batch_size: int = 16,
    max_length: int = 0,
) -> Scores:
    """Every metric the task lists (`task.metric_names`), each by its registered function
    (`metrics.py`), over what the model answers once."""
    if not questions:
        raise ValueError("no questions to evaluate")
    answers = Answers(model, tokenizer, task, questions, batch_size, max_length)
    entries = {m.name: m for m in task.spec.metrics}
    values = {
        name: metric_spec(name).function(answers, entries.get(name, MetricEntry(name)))
        for name in task.metric_names
    }
    if task.generative:
        corpus = {
            name: corpus_with_stderr(metric_spec(name).corpus, answers)
            for name in task.metric_names
            if metric_spec(name).corpus
        }
        return Scores(values, None, [q.id for q in questions], answers.given(), corpus=corpus)
    majority = majority_share(questions)
    return Scores(
        values, majority, [q.id for q in questions], answers.given(), answers.loglikelihoods
    )


def score(model, tokenizer, config: Config, questions: Sequence[Question]) -> Scores:
    """The config's task's metrics with the config's evaluation settings and prompt format."""
    return evaluate_task(
        model,
        tokenizer,
        get_task(config.task),
        as_prompted(questions, tokenizer, config.data.prompt_format),
        config.eval.batch_size,
        config.eval.max_length,
    )
