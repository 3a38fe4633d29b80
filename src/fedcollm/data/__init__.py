"""Data: the tasks and their prompts, the D_a / D_k split, tokenised examples and batches.
Names load with their module on first use: listing the tasks needs no torch."""

from fedcollm.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "batches": ["Batch", "collate", "cycle_batches", "training_batches"],
        "encoding": [
            "Example",
            "encode_answer",
            "encode_continuations",
            "encode_examples",
            "encode_pair",
        ],
        "rows": ["DataError"],
        "split": ["DataSplit", "split_training_data", "training_split"],
        "tasks": [
            "TASKS",
            "Question",
            "Task",
            "evaluation_questions",
            "get_task",
            "is_task_file",
            "load_questions",
        ],
    },
)
