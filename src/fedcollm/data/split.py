"""The paper's data layout: the training split cut into D_a (the server's auxiliary data) and
D_1..D_K (the clients' private data)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcollm import seeds
from fedcollm.config import Config
from fedcollm.data.rows import DataError
from fedcollm.data.tasks import Question, load_questions
from fedcollm.data.templates import BadRow, Template


@dataclass
class DataSplit:
    """Indices into the training split: the server's auxiliary part and one part per client."""

    aux: list[int]
    clients: list[list[int]]
    # Rows left out because an earlier row of the file is the same question.
    duplicates: int = 0
    # Of every training question's content: a resumed run must see the very same data.
    fingerprint: str = ""
    # data.partition = "by_field": which client holds each value of the field.
    assignment: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        """What the run's outputs record of the split (partition.json)."""
        return {
            "aux_size": len(self.aux),
            "client_sizes": [len(c) for c in self.clients],
            "duplicates_left_out": self.duplicates,
            "assignment": self.assignment,
        }


def field_values(questions: Sequence[Question], indices, partition_field: str) -> list[str]:
    """Each row's value of `partition_field`: a field name or a Jinja template, as in task
    files (`"{{ id.split('_')[0] }}"` is the exam an ARC question comes from)."""
    template = Template("data.partition_field", partition_field)
    values = []
    for i in indices:
        doc = questions[i].doc
        try:
            value = doc[partition_field] if partition_field in doc else template.render(doc)
        except BadRow as err:
            raise DataError(
                f"training row {i}: {err}; set data.partition_field to a field"
            ) from None
        values.append(str(value))
    return values


def questions_digest(questions: Sequence[Question]) -> str:
    digest = hashlib.sha256()
    for q in questions:
        # A generative row's answer; a choice row's is its choices and gold already.
        content = [q.id, q.context, q.choices, q.gold] + ([] if q.choices else [q.answer])
        content += [list(q.other_references)] if q.other_references else []
        digest.update(json.dumps(content).encode())
    return digest.hexdigest()[:16]


def first_occurrences(questions: Sequence[Question]) -> list[bool]:
    """False for every row that repeats an earlier one (same prompt, choices and answer):
    left in, it could land in D_a and in a client's D_k at once."""
    seen: set[tuple] = set()
    keep = []
    for q in questions:
        key = (q.context, q.choices, q.gold, q.answer)
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


def _by_field_parts(
    indices: np.ndarray, values: Sequence[str], num_clients: int
) -> tuple[list[list[int]], dict[str, int]]:
    """Whole field values to clients, largest first, each to the client with the fewest
    rows so far (ties: the lower client): deterministic and about balanced."""
    groups: dict[str, list[int]] = {}
    for i, value in zip(indices.tolist(), values, strict=True):
        groups.setdefault(value, []).append(i)
    if len(groups) < num_clients:
        raise DataError(
            f"data.partition_field has {len(groups)} distinct values, fewer than the "
            f"{num_clients} clients; use fewer clients or another field"
        )
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    assignment = {}
    for value in sorted(groups, key=lambda v: (-len(groups[v]), v)):
        client = min(range(num_clients), key=lambda k: (len(parts[k]), k))
        parts[client] += groups[value]
        assignment[value] = client
    return [sorted(p) for p in parts], dict(sorted(assignment.items()))


def split_training_data(
    questions: Sequence[Question],
    num_clients: int,
    seed: int,
    partition: str = "iid",
    alpha: float = 0.5,
    by: str = "label",
    limit: int = 0,
    partition_field: str = "",
    aux_fraction: float = 0.0,
) -> DataSplit:
    """Cut the training split into D_a (server) and D_1..D_K (clients), seeded and disjoint.

    As in the paper, D_a gets an equal 1/(K+1) share at random (or `aux_fraction` of the
    rows, rounded down, at least one, and leaving a row per client); "iid" cuts the rest equally
    at random, "dirichlet" spreads it by answer position or by `partition_field` with
    Dirichlet(alpha), "by_field" gives each value of `partition_field` to one client.
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
    if aux_fraction:
        aux_size = min(max(1, int(aux_fraction * len(order))), len(order) - num_clients)
    aux, rest = order[:aux_size], order[aux_size:]
    assignment: dict[str, int] = {}
    if partition == "iid":
        clients = [sorted(p.tolist()) for p in np.array_split(rest, num_clients)]
    elif partition == "by_field":
        values = field_values(questions, rest, partition_field)
        clients, assignment = _by_field_parts(rest, values, num_clients)
    else:
        if by == "field":
            groups = field_values(questions, rest, partition_field)
        else:  # the answer's position: ARC's "1" and "A" are both the first choice
            groups = [questions[i].gold for i in rest]
        clients = _dirichlet_parts(rest, groups, num_clients, alpha, rng)
    return DataSplit(
        sorted(aux.tolist()),
        clients,
        duplicates=keep.count(False),
        fingerprint=questions_digest(questions),
        assignment=assignment,
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
        partition_field=config.data.partition_field,
        aux_fraction=config.data.aux_fraction,
    )
    return questions, split
