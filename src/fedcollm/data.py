"""The paper's data layout (D_a and D_1..D_K) and the tokenised batches every loop trains on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedcollm.tasks import TARGET_DELIMITER, DataError, Question


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


@dataclass
class Example:
    """One tokenised (context, continuation) pair; `answer_mask` marks continuation tokens."""

    input_ids: list[int]
    answer_mask: list[bool]


def encode_continuations(
    tokenizer, context: str, continuations: Sequence[str], max_length: int
) -> tuple[list[int], list[list[int]]]:
    """Tokenise as lm-evaluation-harness does: a continuation's tokens are the whole text's
    tokens after as many tokens as the context alone encodes to, and the model reads the
    context's own tokens followed by those. Trailing spaces of the context move to the
    continuation; no special tokens are added. Returns the context tokens (shared by every
    continuation; its left end cut so that the longest pair fits in `max_length`) and the
    tokens of each continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuations = context[:-spaces], [context[-spaces:] + c for c in continuations]
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    answers = [
        tokenizer.encode(context + c, add_special_tokens=False)[len(context_ids) :]
        for c in continuations
    ]
    keep = max(max_length - max(len(a) for a in answers), 1)
    return context_ids[-keep:], answers


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> Example:
    """One (context, continuation) pair as a training example; see `encode_continuations`."""
    context_ids, (answer_ids,) = encode_continuations(
        tokenizer, context, [continuation], max_length
    )
    ids = (context_ids + answer_ids)[-max_length:]
    mask = [False] * len(context_ids) + [True] * len(answer_ids)
    return Example(input_ids=ids, answer_mask=mask[-len(ids) :])


def encode_answer(tokenizer, question: Question, max_length: int) -> Example:
    """The training example of a question: its prompt followed by the correct answer."""
    return encode_pair(tokenizer, question.context, TARGET_DELIMITER + question.answer, max_length)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    answer_mask: torch.Tensor  # (B, L) True where the token belongs to the answer

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.answer_mask))
        )


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    answer = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        answer[row, :n] = torch.tensor(e.answer_mask)
    return Batch(ids, attention, answer)


def training_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, epochs: int, seed: int
) -> Iterator[Batch]:
    """Shuffled batches, epoch after epoch; the order depends only on `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def cycle_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, steps: int, seed: int
) -> Iterator[Batch]:
    """Exactly `steps` shuffled batches, wrapping around the examples as often as needed."""
    epochs = -(-steps * batch_size // len(examples))
    stream = training_batches(examples, batch_size, pad_id, epochs, seed)
    for _ in range(steps):
        yield next(stream)
