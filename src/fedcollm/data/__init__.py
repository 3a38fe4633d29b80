"""Data: the tasks and their prompts, the D_a / D_k split, tokenised examples and batches."""

from fedcollm.data.batches import Batch, collate, cycle_batches, training_batches
from fedcollm.data.encoding import (
    Example,
    encode_answer,
    encode_continuations,
    encode_examples,
    encode_pair,
)
from fedcollm.data.rows import DataError
from fedcollm.data.split import DataSplit, split_training_data, training_split
from fedcollm.data.tasks import (
    TASKS,
    Question,
    Task,
    evaluation_questions,
    get_task,
    is_task_file,
    load_questions,
)

__all__ = [
    "TASKS",
    "Batch",
    "DataError",
    "DataSplit",
    "Example",
    "Question",
    "Task",
    "collate",
    "cycle_batches",
    "encode_answer",
    "encode_continuations",
    "encode_examples",
    "encode_pair",
    "evaluation_questions",
    "get_task",
    "is_task_file",
    "load_questions",
    "split_training_data",
    "training_batches",
    "training_split",
]
