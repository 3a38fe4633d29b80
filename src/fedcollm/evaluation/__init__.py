"""Evaluation: a task's metrics as lm-evaluation-harness computes them (multiple-choice
log-likelihood, generation), and FlowerTune's parsed generations."""

from fedcollm.evaluation.multiple_choice import (
    Accuracy,
    accuracy,
    choice_loglikelihoods,
    evaluate_multiple_choice,
)
from fedcollm.evaluation.scores import Scores, evaluate_task, majority_share, score

__all__ = [
    "Accuracy",
    "Scores",
    "accuracy",
    "choice_loglikelihoods",
    "evaluate_multiple_choice",
    "evaluate_task",
    "majority_share",
    "score",
]
