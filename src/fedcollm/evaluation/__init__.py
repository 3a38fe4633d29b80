"""Evaluation: a task's metrics as lm-evaluation-harness computes them (multiple-choice
log-likelihood, generation), and FlowerTune's parsed generations. Names load with their
module on first use: reading a task's metrics needs no torch."""

from fedcollm.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "multiple_choice": [
            "Accuracy",
            "accuracy",
            "choice_loglikelihoods",
            "evaluate_multiple_choice",
        ],
        "scores": ["Scores", "evaluate_task", "majority_share", "score"],
    },
)
