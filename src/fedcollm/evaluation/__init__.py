"""Evaluation: multiple-choice accuracy as lm-evaluation-harness computes it."""

from fedcollm.evaluation.multiple_choice import (
    Accuracy,
    accuracy,
    choice_loglikelihoods,
    evaluate_multiple_choice,
    score,
)

__all__ = ["Accuracy", "accuracy", "choice_loglikelihoods", "evaluate_multiple_choice", "score"]
