"""The paper's data layout: the training split cut into D_a (the server's auxiliary data) and
D_1..D_K (the clients' private data)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcollm import seeds
from fedcollm.config import Config
from fedcollm.data.tasks import DataError, Question, load_questions


@dataclass
class DataSplit:
    """Indices into the training split: the server's auxiliary part and one part per client."""

    aux: list[int]
    clients: list[list[int]]
    # Rows left out because an earlier row of the file is the same question.
    duplicates: int = 0
    # Of every training question's content: a resumed run must see the very same data.
    fingerprint: str = ""


def partition_group(question: Question, by: str):
    """What a non-IID split groups rows by: the answer's position ("label"; ARC's "1" and
    "A" are both the first choice) or the question's source ("source")."""
    return question.gold if by == "label" else question.source


def questions_digest(questions: Sequence[Question]) -> str:
    digest = hashlib.sha256()
    for q in questions:
        digest.update(json.dumps([q.id, q.context, q.choices, q.gold]).encode())
    return digest.hexdigest()[:16]


def first_occurrences(questions: Sequence[Question]) -> list[bool]:
    """False for every row that repeats an earlier one (same prompt, choices and answer):
    left in, it could land in D_a and in a client's D_k at once."""
    seen: set[tuple] = set()
    keep = []
    for q in questions:
        key = (q.context, q.choices, q.gold)
        keep.append(key not in seen)
        seen.add(key)
    return keep


def _dirichlet_parts(
    indices: np.ndarray, groups: Sequence, num_clients: int, alpha: float, rng
) -> list[list[int]]:
    """Spread each group's rows over clients with proportions drawn from Dirichlet(alpha)."""
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for group in sorted(set(groups)):
            members = indices[[g == group for g in groups]]
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].extend(piece.tolist())
        if all(parts):
            return [sorted(p) for p in parts]
    raise DataError(
        f"a Dirichlet({alpha}) split left a client without data 100 times; "
        "raise data.dirichlet_alpha or use fewer clients"
    )


def split_training_data(
    questions: Sequence[Question],
    num_clients: int,
    seed: int,
    partition: str = "iid",
    alpha: float = 0.5,
    by: str = "label",
    limit: int = 0,
) -> DataSplit:
    """Cut the training split into D_a (server) and D_1..D_K (clients), seeded and disjoint.

    As in the paper, D_a gets an equal 1/(K+1) share; "iid" cuts the rest equally at random,
    "dirichlet" spreads it by answer position or question source with Dirichlet(alpha).
    Repeated rows are left out first (the first of each is kept).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(questions))
    keep = first_occurrences(questions)
    order = order[[keep[i] for i in order]]
    if limit:
        order = order[:limit]
    if len(order) < num_clients + 1:
        raise DataError(
            f"{len(order)} training rows cannot feed {num_clients} clients and the server; "
            "use fewer clients or a larger data.train_limit"
        )
    aux_size = len(order) // (num_clients + 1)
    aux, rest = order[:aux_size], order[aux_size:]
    if partition == "iid":
        clients = [sorted(p.tolist()) for p in np.array_split(rest, num_clients)]
    else:
        groups = [partition_group(questions[i], by) for i in rest]
        clients = _dirichlet_parts(rest, groups, num_clients, alpha, rng)
    return DataSplit(
        sorted(aux.tolist()),
        clients,
        duplicates=keep.count(False),
        fingerprint=questions_digest(questions),
    )


def training_split(config: Config) -> tuple[list[Question], DataSplit]:
    """The training questions and their seeded cut into D_a and D_1..D_K."""
    questions = load_questions(config.task, "train", config.data_dir)
    split = split_training_data(
        questions,
        config.num_clients,
        seeds.data_split(config.seed),
        partition=config.data.partition,
        alpha=config.data.dirichlet_alpha,
        by=config.data.dirichlet_by,
        limit=config.data.train_limit,
    )
    return questions, split
