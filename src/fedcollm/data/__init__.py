"""Data: the tasks and their prompts, the D_a / D_k split, tokenised examples and batches."""

from fedcollm.data.batches import Batch, collate, cycle_batches, training_batches
from fedcollm.data.encoding import (
    Example,
    encode_answer,
    encode_continuations,
    encode_examples,
    encode_pair,
)
from fedcollm.data.split import DataSplit, split_training_data, training_split
from fedcollm.data.tasks import (
    TARGET_DELIMITER,
    TASKS,
    DataError,
    Question,
    evaluation_questions,
    get_task,
    load_questions,
)

__all__ = [
    "TARGET_DELIMITER",
    "TASKS",
    "Batch",
    "DataError",
    "DataSplit",
    "Example",
    "Question",
    "collate",
    "cycle_batches",
    "encode_answer",
    "encode_continuations",
    "encode_examples",
    "encode_pair",
    "evaluation_questions",
    "get_task",
    "load_questions",
    "split_training_data",
    "training_batches",
    "training_split",
]
