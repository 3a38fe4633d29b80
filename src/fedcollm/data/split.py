"""The paper's data layout: the training split cut into D_a (the server's auxiliary data) and
D_1..D_K (the clients' private data)."""

from __future__ import annotations

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


def _dirichlet_parts(
    indices: np.ndarray, groups: Sequence[str], num_clients: int, alpha: float, rng
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
    "dirichlet" spreads it by answer label or question source with Dirichlet(alpha).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(questions))
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
        groups = [getattr(questions[i], by) for i in rest]
        clients = _dirichlet_parts(rest, groups, num_clients, alpha, rng)
    return DataSplit(aux=sorted(aux.tolist()), clients=clients)


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
