"""A task's metrics, each one registration: its name, the output type it scores, its
function, its direction, how per-question values combine, and whether it is a share shown in
points (lm-eval's `@register_metric` is the anchor). The task-file reader, evaluation, the
report, the significance tests and the plots all read a metric's facts here.

A metric's function takes the `Answers` of one model on one task's questions, which work out
what the model answered lazily and once (choice log-likelihoods, greedy generations, target
losses) however many metrics read them, and returns one value per question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from fedcollm.data import Question, Task
from fedcollm.data.taskfile import Metric as MetricEntry
from fedcollm.data.templates import Template
from fedcollm.evaluation.flowertune import correct as flowertune_correct
from fedcollm.evaluation.text_metrics import (
    bleu_scorer,
    chrf_scorer,
    corpus_score,
    exact_match,
    rouge,
    sentence_scores,
)
from fedcollm.registry import METRICS

# What runs a model (torch) is imported where a model answers: reading a task's metrics
# (`fedcollm tasks`, the task-file checks) loads no torch.


@dataclass
class Answers:
    """What one model answers to a task's questions, each part computed when first asked."""

    model: Any
    tokenizer: Any
    task: Task
    questions: Sequence[Question]
    batch_size: int = 16
    max_length: int = 0
    # What a metric that generates with its own prompt produced, which is then the answer
    # given (FlowerTune's parsed generations).
    own_generations: list[str] | None = None

    @cached_property
    def loglikelihoods(self) -> list[list[float]]:
        from fedcollm.evaluation.multiple_choice import choice_loglikelihoods

        return choice_loglikelihoods(
            self.model, self.tokenizer, self.questions, self.batch_size, self.max_length
        )

    @cached_property
    def accuracy(self):
        from fedcollm.evaluation.multiple_choice import accuracy

        return accuracy(self.questions, self.loglikelihoods)

    @cached_property
    def generations(self) -> list[str]:
        """Greedy generations with the task's `until` and `max_gen_toks`."""
        from fedcollm.evaluation.generation import generate

        spec = self.task.spec
        prompts = [q.context for q in self.questions]
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            spec.until,
            spec.max_gen_toks,
            self.batch_size,
            self.max_length,
        )

    @cached_property
    def target_losses(self) -> list[float]:
        from fedcollm.evaluation.generation import target_losses

        return target_losses(
            self.model, self.tokenizer, self.questions, self.batch_size, self.max_length
        )

    def given(self) -> list[Any]:
        """Per question, the answer given: a metric's own generation, else the choice picked
        (multiple choice), else the generation if one was made."""
        if self.own_generations is not None:
            return self.own_generations
        if not self.task.generative:
            return self.accuracy.predictions
        if "generations" in self.__dict__:
            return self.generations
        return [None] * len(self.questions)


MetricFunction = Callable[[Answers, MetricEntry], list[float]]
# A corpus-level aggregation: the task's score from all generations and their references.
CorpusFunction = Callable[[Sequence[str], Sequence[Sequence[str]]], float]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    output_type: str  # "multiple_choice" or "generate_until"
    function: MetricFunction
    higher_is_better: bool = True
    # Over questions: "mean" of the per-question values, or the name of a corpus-level
    # score (`corpus`: BLEU and chrF sum n-gram counts over the corpus, as lm-eval's
    # aggregations of the same names); per-question values are then sentence scores.
    aggregation: str = "mean"
    percent: bool = True  # a share in [0, 1], shown in points; else shown as it is
    options: frozenset[str] = field(default_factory=frozenset)  # metric_list keys it takes
    corpus: CorpusFunction | None = None


def register_metric(
    name: str,
    output_type: str,
    higher_is_better: bool = True,
    percent: bool = True,
    options: Sequence[str] = (),
    corpus: CorpusFunction | None = None,
) -> Callable[[MetricFunction], MetricFunction]:
    """`@register_metric("name", "generate_until", higher_is_better=False)` over a function
    of (answers, the task file's entry) returning one value per question; with `corpus`,
    the task's score is that function of all answers (aggregation named after the metric)."""

    def add(function: MetricFunction) -> MetricFunction:
        aggregation = name if corpus else "mean"
        spec = MetricSpec(
            name,
            output_type,
            function,
            higher_is_better,
            aggregation,
            percent,
            frozenset(options),
            corpus,
        )
        METRICS.register(name, spec)
        return function

    return add


def metric_spec(name: str) -> MetricSpec:
    return METRICS[name]


def lower_is_better(name: str) -> bool:
    return name in METRICS and not METRICS[name].higher_is_better


def is_share(name: str) -> bool:
    """Whether a metric is a share in [0, 1] (shown in points, with a majority floor)."""
    return name not in METRICS or METRICS[name].percent


def shown(name: str) -> tuple[int, int, str]:
    """How tables and plots show a metric's values: (scale, digits, unit)."""
    return (100, 1, " points") if is_share(name) else (1, 3, "")


def _correct(picks: Sequence[int], questions: Sequence[Question]) -> list[float]:
    return [float(p == q.gold) for p, q in zip(picks, questions, strict=True)]


@register_metric("acc", "multiple_choice")
def acc(answers: Answers, entry: MetricEntry) -> list[float]:
    """The choice of highest summed log-likelihood is the gold one (lm-eval's acc)."""
    return _correct(answers.accuracy.predictions, answers.questions)


@register_metric("acc_norm", "multiple_choice")
def acc_norm(answers: Answers, entry: MetricEntry) -> list[float]:
    """The same, each choice's log-likelihood divided by its length in bytes."""
    return _correct(answers.accuracy.predictions_norm, answers.questions)


def _flowertune(answers: Answers, entry: MetricEntry) -> list[float]:
    """FlowerTune's metric: generate with its prompt, then parse the answer as it does."""
    from fedcollm.evaluation.generation import generate

    options, questions = entry.options, answers.questions
    prompt = Template(f"metric_list.{entry.name}.prompt", options.get("prompt"))
    prompts = [
        prompt.render(q.doc) if options.get("prompt") else q.context + q.delimiter
        for q in questions
    ]
    # FlowerTune stops at "###" (medical) or the end of the answer (finance).
    outputs = generate(
        answers.model,
        answers.tokenizer,
        prompts,
        ["###"],
        options.get("max_gen_toks", 16),
        answers.batch_size,
    )
    answers.own_generations = outputs
    return [
        flowertune_correct(entry.name, o, q.answer) for o, q in zip(outputs, questions, strict=True)
    ]


for _name in ("flowertune_finance", "flowertune_medical"):
    register_metric(_name, "multiple_choice", options=("prompt", "max_gen_toks"))(_flowertune)


@register_metric(
    "exact_match",
    "generate_until",
    options=("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"),
)
def exact_match_metric(answers: Answers, entry: MetricEntry) -> list[float]:
    return [
        max(exact_match(o, r, **entry.options) for r in q.references)
        for o, q in zip(answers.generations, answers.questions, strict=True)
    ]


def _rouge(kind: str) -> MetricFunction:
    def metric(answers: Answers, entry: MetricEntry) -> list[float]:
        return [
            rouge(o, q.references, kind)
            for o, q in zip(answers.generations, answers.questions, strict=True)
        ]

    return metric


for _kind in ("rouge1", "rouge2", "rougeL"):
    register_metric(_kind, "generate_until")(_rouge(_kind))


def _sacrebleu(make_scorer) -> tuple[MetricFunction, CorpusFunction]:
    """A sacrebleu metric: each generation's sentence score, and the corpus score."""

    def sentences(answers: Answers, entry: MetricEntry) -> list[float]:
        references = [q.references for q in answers.questions]
        return sentence_scores(make_scorer(), answers.generations, references)

    def corpus(generations: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        return corpus_score(make_scorer(), generations, references)

    return sentences, corpus


for _name, _scorer in (("chrf", chrf_scorer), ("bleu", bleu_scorer)):
    _sentences, _corpus = _sacrebleu(_scorer)
    register_metric(_name, "generate_until", percent=False, corpus=_corpus)(_sentences)


@register_metric("target_loss", "generate_until", higher_is_better=False, percent=False)
def target_loss(answers: Answers, entry: MetricEntry) -> list[float]:
    """The reference answer's mean token loss after its prompt (teacher-forced)."""
    return answers.target_losses
