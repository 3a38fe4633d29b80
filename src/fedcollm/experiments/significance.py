"""Paired significance for the paper's claims, from the per-question predictions.

Two methods scored on the same questions under the same seeds are compared question by
question: the difference of their means with a paired bootstrap 95% interval that resamples
questions and seeds together, an exact paired test per seed (binary metrics: McNemar for
one model against one, a sign test over questions for the clients, whose answers share the
questions and theta), and the smallest difference the design could have detected (80%
power, two-sided 5%). The LLM's claim is a ratio (FedCoLLM over Centralized), bootstrapped
from the same resamples.

Results kept before predictions were (older runs) are compared unpaired from their per-seed
scores and standard errors; that interval is wider than a paired one, and says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest

from fedcollm.evaluation.multiple_choice import stderr
from fedcollm.registry import METHODS

# z(0.975) + z(0.80): a difference this many standard errors from 0 is found 80% of the time.
POWER_80 = 1.959964 + 0.841621
RESAMPLES = 4000

ROLE_NAMES = {"llm": "LLM", "slm_clients": "clients' SLMs", "slm_global": "global SLM"}


def pairs() -> list[tuple[str, str, str]]:
    """(role, method, baseline) of every comparison a registered method carries."""
    return [(role, m.name, baseline) for m in METHODS.values() for role, baseline in m.pairs]


@dataclass
class Comparison:
    """`method` against `baseline` for one role, task and metric, over `seeds`."""

    role: str
    method: str
    baseline: str
    metric: str
    seeds: list[int]
    questions: int
    mean: float  # the method's score, mean over seeds and questions
    baseline_mean: float
    diff_ci: tuple[float, float]
    ratio_ci: tuple[float, float]
    se: float  # of the difference
    paired: bool
    seed_diffs: list[float]
    mcnemar: list[tuple[int, int, int, float]] = field(default_factory=list)  # seed, b, c, p

    @property
    def diff(self) -> float:
        return self.mean - self.baseline_mean

    @property
    def ratio(self) -> float:
        return self.mean / self.baseline_mean if self.baseline_mean else math.nan

    @property
    def detectable(self) -> float:
        """The smallest true difference found with 80% power at this standard error."""
        return POWER_80 * self.se

    @property
    def label(self) -> str:
        return (
            f"{ROLE_NAMES[self.role]}: {METHODS[self.method].short} - "
            f"{METHODS[self.baseline].short}"
        )


def _model_values(result: dict[str, Any], role: str, metric: str) -> list[dict[str, float]]:
    """Per scored model of the role (each client for `slm_clients`), question id -> value."""
    predictions = (result.get("predictions") or {}).get(role)
    if not predictions:
        return []
    models = predictions if role == "slm_clients" else [predictions]
    if any(m is None or metric not in m for m in models):
        return []
    return [dict(zip(question_keys(m["id"]), m[metric], strict=True)) for m in models]


def question_keys(ids: list[str]) -> list[tuple[str, int]]:
    """Each question's id with how often it came before: a task whose rows share ids (a
    file with repeated ids) still pairs question by question, by position among its
    namesakes in the fixed question list, instead of collapsing them into one."""
    seen: dict[str, int] = {}
    keys = []
    for question in ids:
        keys.append((question, seen.get(question, 0)))
        seen[question] = seen.get(question, 0) + 1
    return keys


def _runs(results, task: str, method: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in results if (r["task"], r["method"]) == (task, method)}


def compare_methods(
    results: list[dict[str, Any]], task: str, role: str, method: str, baseline: str, metric: str
) -> Comparison | None:
    """`method` against `baseline` on `role`, paired where every seed kept predictions."""
    ours, theirs = _runs(results, task, method), _runs(results, task, baseline)
    if not METHODS[baseline].trains and theirs:  # its one run stands for every seed
        theirs = {seed: next(iter(theirs.values())) for seed in ours}
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return None
    a = {s: _model_values(ours[s], role, metric) for s in seeds}
    b = {s: _model_values(theirs[s], role, metric) for s in seeds}
    if all(a.values()) and all(b.values()):
        return _paired(role, method, baseline, metric, seeds, a, b)
    return _unpaired(role, method, baseline, metric, seeds, ours, theirs)


def _paired(role, method, baseline, metric, seeds, a, b) -> Comparison | None:
    ids = sorted(set.intersection(*(set(m) for s in seeds for m in (*a[s], *b[s]))))
    if not ids:
        return None

    def matrix(models: dict[int, list[dict[str, float]]]) -> np.ndarray:
        # seeds x questions: the mean over the role's models (clients) of each question.
        return np.array([[statistics.fmean(m[q] for m in models[s]) for q in ids] for s in seeds])

    ours, theirs = matrix(a), matrix(b)
    mean_a, mean_b = _bootstrap_means(ours, theirs)
    diffs, ratios = mean_a - mean_b, mean_a / np.where(mean_b == 0, np.nan, mean_b)
    binary = all(v in (0.0, 1.0) for s in seeds for m in (*a[s], *b[s]) for v in m.values())
    mcnemar = [(s, *_mcnemar(a[s], b[s], ids)) for s in seeds] if binary else []
    return Comparison(
        role,
        method,
        baseline,
        metric,
        seeds,
        len(ids),
        float(ours.mean()),
        float(theirs.mean()),
        tuple(np.percentile(diffs, [2.5, 97.5]).tolist()),
        tuple(np.nanpercentile(ratios, [2.5, 97.5]).tolist()),
        float(diffs.std(ddof=1)),
        True,
        (ours - theirs).mean(axis=1).tolist(),
        mcnemar,
    )


def _bootstrap_means(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES):
    """Means of a and b (seeds x questions) under the same resamples of seeds and of
    questions, with replacement; seeded, so that a report is the same when rebuilt."""
    rng = np.random.default_rng(0)
    n_seeds, n_questions = a.shape
    seed_counts = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=resamples)
    means_a, means_b = [], []
    for start in range(0, resamples, 500):  # chunks keep the question counts small
        w = seed_counts[start : start + 500].astype(np.float64)
        v = rng.multinomial(n_questions, [1 / n_questions] * n_questions, size=len(w))
        scale = n_seeds * n_questions
        means_a.append(np.einsum("bs,sq,bq->b", w, a, v) / scale)
        means_b.append(np.einsum("bs,sq,bq->b", w, b, v) / scale)
    return np.concatenate(means_a), np.concatenate(means_b)


def _mcnemar(ours, theirs, ids) -> tuple[int, int, float]:
    """A paired exact test per seed, question by question. One model against one: McNemar
    on the questions only one of them got right. Where a side has several models (the
    clients, who share the questions and theta, so their answers are not independent): a
    sign test over questions of the clients' mean correctness, one pair per question.
    Returns (questions ours did better on, questions theirs did better on, p)."""
    mean_ours = {q: statistics.fmean(m[q] for m in ours) for q in ids}
    mean_theirs = {q: statistics.fmean(m[q] for m in theirs) for q in ids}
    wins = sum(mean_ours[q] > mean_theirs[q] for q in ids)
    losses = sum(mean_ours[q] < mean_theirs[q] for q in ids)
    p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return int(wins), int(losses), float(p)


def seed_score(result: dict[str, Any], which: str, metric: str) -> tuple[float, float] | None:
    """One seed's score and its standard error on the questions scored: the LLM, the global
    SLM, or the mean over the clients' SLMs (None where the result lacks the metric)."""
    value = result.get(which)
    if value is None:
        return None
    scores = value if which == "slm_clients" else [value]
    if any(metric not in s for s in scores):
        return None
    # The standard error on these questions: stored, or (results of older runs) binomial.
    errors = [s.get(f"{metric}_stderr", stderr(s[metric], s["n"])) for s in scores]
    return statistics.fmean(s[metric] for s in scores), statistics.fmean(errors)


def _unpaired(role, method, baseline, metric, seeds, ours, theirs) -> Comparison | None:
    """From per-seed scores: the seeds' mean difference, with the standard error of each
    side on its questions (questions are the same across seeds, so seeds do not shrink it)."""
    a = [seed_score(ours[s], role, metric) for s in seeds]
    b = [seed_score(theirs[s], role, metric) for s in seeds]
    if None in a or None in b:
        return None
    mean_a, mean_b = statistics.fmean(x for x, _ in a), statistics.fmean(x for x, _ in b)
    se_a, se_b = statistics.fmean(e for _, e in a), statistics.fmean(e for _, e in b)
    se = math.hypot(se_a, se_b)
    diff = mean_a - mean_b
    ratio = mean_a / mean_b if mean_b else math.nan
    se_ratio = abs(ratio) * math.hypot(se_a / mean_a, se_b / mean_b) if mean_a else math.nan
    return Comparison(
        role,
        method,
        baseline,
        metric,
        seeds,
        _questions(ours[seeds[0]], role),
        mean_a,
        mean_b,
        (diff - 1.96 * se, diff + 1.96 * se),
        (ratio - 1.96 * se_ratio, ratio + 1.96 * se_ratio),
        se,
        False,
        [x - y for (x, _), (y, _) in zip(a, b, strict=True)],
    )


def _questions(result: dict[str, Any], role: str) -> int:
    scores = result.get(role)
    return int((scores[0] if isinstance(scores, list) else scores)["n"])


def claim_comparisons(results: list[dict[str, Any]], task: str, metric: str) -> list[Comparison]:
    """The registered pairs that this experiment's methods allow."""
    found = (compare_methods(results, task, *pair, metric) for pair in pairs())
    return [c for c in found if c is not None]
