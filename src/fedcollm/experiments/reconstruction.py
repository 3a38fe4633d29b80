"""What an honest-but-curious server can read of a client's batch from its upload: DAGER's
span test (Petrov et al., NeurIPS 2024) adapted to what fedcollm's server receives.

DAGER's observation: a linear layer's weight gradient is a sum of (output gradient) x
(input) outer products, so its rows lie in the span of the layer's inputs. At the first
decoder layer the inputs of the query, key and value projections are the normalised token
embeddings, the same for a token wherever it stands (rotary positions act after the
projection); a vocabulary token whose normalised embedding lies in that span was in the
batch. What changes with LoRA and with fedcollm's clients:

- LoRA's A (r x d) has the gradient B^T (sum_i delta_i x_i^T): its rows are in the span of
  the inputs x_i, but there are r of them, so the update shows at most r directions of that
  span per projection (3r for q, k and v together), however many steps or rows the client
  ran. A batch whose distinct first-layer tokens exceed that cannot be read this way. In
  round 1, B = 0 and A's gradient is exactly zero: only B moves, and B's gradient lies in the
  span of the r-dimensional projections A x_i, which says nothing of the tokens.
- The clients step with AdamW. Its first step moves each weight by -lr (g / (|g| + eps))
  - lr wd theta: the server, knowing theta, lr and wd, reads g / (|g| + eps) up to fp32,
  that is the sign of every gradient entry and, where |g| is small, its size
  (|g| = eps u / (1 - u)); `gradient_estimate` inverts it. After several AdamW steps no such
  inversion exists and the update (DAGER's FedAvg mode) is the attacker's best proxy.

`recover_tokens` runs the span test on a gradient or an estimate of one; `token_scores` gives
every token's distance from the span. `pursue_tokens` needs only some entries of the rows:
those AdamW's inversion recovers well (`adam_observations`), so it reads a one-step AdamW
upload where the span test cannot.
"""

from __future__ import annotations

import torch

from fedcollm.config import OptimConfig
from fedcollm.models import Adapter

# Projections whose input is the first layer's normalised token embedding.
EMBEDDING_INPUTS = ("q_proj", "k_proj", "v_proj")
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which fedcollm's clients use


def gradient_estimate(
    upload: Adapter, theta: Adapter, lr: float, optim: OptimConfig, steps: int
) -> Adapter:
    """The server's estimate of the gradient behind theta_k - theta: after one AdamW step,
    its inversion (g up to a positive factor per entry: exact in sign, in size where |g| is
    small); after several, minus the update itself."""
    estimate = {}
    for key, value in upload.items():
        if steps != 1:
            estimate[key] = theta[key].double() - value.double()
            continue
        u = _adam_ratio(value, theta[key], lr, optim)
        size = u.abs().clamp(max=1 - 1e-12)
        estimate[key] = torch.sign(u) * ADAM_EPS * size / (1 - size)
    return estimate


def _adam_ratio(value: torch.Tensor, theta: torch.Tensor, lr: float, optim: OptimConfig):
    """u = g / (|g| + eps) of AdamW's first step, read off its update:
    value - theta = -lr * wd * theta - lr * u."""
    delta = value.double() - theta.double()
    return -(delta + lr * optim.weight_decay * theta.double()) / lr


def layer_inputs(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """(n, d): the input of layer `layer`'s projections (its input norm's output) at the last
    position of each sequence in `ids` (n, t), as the model with its current adapter computes
    it; only the layers below `layer` run."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    captured = []

    def stop(module, args, output):
        captured.append(output)
        raise _Stop

    handle = base.model.layers[layer].input_layernorm.register_forward_hook(stop)
    try:
        with torch.no_grad():
            base.model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0][:, -1].float()


class _Stop(Exception):
    """Ends a forward pass once the layer the attack reads has its input."""


def first_layer_inputs(model) -> torch.Tensor:
    """(V, d): every vocabulary token's input to the first layer's projections, the
    embedding after that layer's input norm (the same wherever the token stands)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocabulary = base.get_input_embeddings().weight.shape[0]
    return layer_inputs(model, torch.arange(vocabulary).unsqueeze(1), 0)


def _layer_a(key: str, layer: int) -> bool:
    """Whether an adapter key is layer `layer`'s A of a projection of that layer's input."""
    return (
        f".layers.{layer}." in key and "lora_A" in key and any(p in key for p in EMBEDDING_INPUTS)
    )


def layer_rows(estimate: Adapter, layer: int = 0) -> torch.Tensor:
    """(3r, d): a layer's q/k/v A rows of an adapter-shaped estimate, stacked."""
    return torch.cat([v for k, v in estimate.items() if _layer_a(k, layer)])


def input_span(estimate: Adapter, layer: int = 0, tolerance: float = 1e-6) -> torch.Tensor:
    """(k, d): an orthonormal basis of the directions a layer's A updates show: the row
    space of its stacked q/k/v A estimates, singular values above `tolerance` times the
    largest."""
    rows = layer_rows(estimate, layer).double()
    _, singular, vh = torch.linalg.svd(rows, full_matrices=False)
    if not len(singular) or singular[0] == 0:
        return vh[:0].float()
    return vh[singular > tolerance * singular[0]].float()


def token_scores(inputs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(V,): each token's relative distance from the span, ||x - P x|| / ||x|| (0: in it)."""
    x = inputs.double()
    projected = (x @ basis.double().T) @ basis.double()
    return ((x - projected).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).float()


def recover_tokens(model, estimate: Adapter, threshold: float = 1e-3) -> set[int]:
    """The token ids the span test puts in the client's batch: those within `threshold` of
    the span its first layer's A shows in `estimate` (`gradient_estimate` of an upload, or
    a gradient itself)."""
    scores = token_scores(first_layer_inputs(model), input_span(estimate))
    return set(torch.nonzero(scores < threshold).flatten().tolist())


def adam_observations(
    upload: Adapter,
    theta: Adapter,
    lr: float,
    optim: OptimConfig,
    layer: int = 0,
    reliable: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a layer's q/k/v A gradient that one AdamW step's upload shows, (3r, d),
    and where they are trustworthy: the entries whose |u| = |g| / (|g| + eps) is below
    1 - `reliable`, so that fp32 kept their size (larger entries keep only a sign)."""
    rows = {k: v for k, v in upload.items() if _layer_a(k, layer)}
    masks = [(1 - _adam_ratio(v, theta[k], lr, optim).abs()) > reliable for k, v in rows.items()]
    return layer_rows(gradient_estimate(rows, theta, lr, optim, 1), layer), torch.cat(masks)


class MaskedPursuit:
    """Orthogonal matching pursuit of rows known only on some entries: each row (one row of
    a gradient of A, a combination of the layer's inputs) is explained by inputs chosen one
    at a time, every row refitted by least squares on its observed entries after each
    choice (kept as one orthonormal basis per row, so a choice costs O(rows d k))."""

    def __init__(self, rows: torch.Tensor, observed: torch.Tensor):
        self.mask = observed.double()
        self.residual = rows.double() * self.mask
        self.basis = self.residual.new_zeros(len(rows), rows.shape[1], 0)

    def norms(self, inputs: torch.Tensor) -> torch.Tensor:
        """(rows, n): each input's squared norm on each row's observed entries."""
        return (self.mask @ (inputs.double() ** 2).T).clamp_min(1e-30)

    def gains(self, inputs: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """(n,): how much of what is left of the rows each input explains (summed over rows
        of (r . x)^2 / |x|^2 on each row's observed entries); `norms` as `norms` gives
        them, when the same inputs are scored again."""
        norms = self.norms(inputs) if norms is None else norms
        return ((self.residual @ inputs.double().T) ** 2 / norms).sum(0)

    def choose(self, vector: torch.Tensor) -> None:
        atoms = self.mask * vector.double()  # (rows, d): the input as each row observes it
        for _ in range(2):  # twice: Gram-Schmidt keeps the basis orthogonal in fp64
            atoms = atoms - torch.einsum(
                "rdk,rk->rd", self.basis, torch.einsum("rdk,rd->rk", self.basis, atoms)
            )
        size = atoms.norm(dim=1, keepdim=True)
        atoms = torch.where(size > 1e-12, atoms / size.clamp_min(1e-30), torch.zeros_like(atoms))
        self.residual = self.residual - (self.residual * atoms).sum(1, keepdim=True) * atoms
        self.basis = torch.cat([self.basis, atoms.unsqueeze(-1)], dim=-1)


def pursue_tokens(
    inputs: torch.Tensor, rows: torch.Tensor, observed: torch.Tensor, count: int
) -> list[int]:
    """`count` tokens, greedily: each time the token whose first-layer input best explains
    what is left of the rows on their observed entries (`MaskedPursuit`). Where the span
    test needs every entry, this needs only some: AdamW's inversion gives them."""
    pursuit, chosen = MaskedPursuit(rows, observed), []
    norms = pursuit.norms(inputs)  # the same vocabulary every time
    for _ in range(count):
        gain = pursuit.gains(inputs, norms)
        gain[chosen] = -1
        chosen.append(int(gain.argmax()))
        pursuit.choose(inputs[chosen[-1]])
    return chosen


def grow_sequences(
    model, tokens: list[int], basis: torch.Tensor, branches: list[int]
) -> list[list[int]]:
    """DAGER's sequence search through the second layer: the batch's prefixes grown one
    position at a time from `tokens` (the first layer's recovered set), keeping at position t
    the `branches[t]` extensions (prefix + token) whose second-layer inputs lie nearest the
    span `basis` (`input_span` of the second layer's A). Returns the sequences not extended
    further (the search tree's leaves)."""
    prefixes, leaves, seen = [[]], [], torch.zeros(0, basis.shape[1])
    for count in branches:
        grown = [p + [t] for p in prefixes for t in tokens]
        inputs = layer_inputs(model, torch.tensor(grown, dtype=torch.long), 1)
        distance = token_scores(inputs, basis)
        # An extension whose input repeats one already kept explains nothing new (a token
        # repeated at the start attends to copies of itself: the same input as before).
        distance[_repeats(inputs, seen)] = float("inf")
        order = distance.argsort()[:count].tolist()
        kept = [grown[i] for i in order]
        seen = torch.cat([seen, inputs[order]])
        parents = {tuple(k[:-1]) for k in kept}
        leaves += [p for p in prefixes if p and tuple(p) not in parents]
        prefixes = kept
    return leaves + prefixes


def _repeats(inputs: torch.Tensor, seen: torch.Tensor, tolerance: float = 1e-4) -> torch.Tensor:
    """(n,): whether each input lies within `tolerance` (relative) of one in `seen`."""
    if not len(seen):
        return torch.zeros(len(inputs), dtype=torch.bool)
    gaps = torch.cdist(inputs.double(), seen.double()).min(1).values
    return gaps < tolerance * inputs.double().norm(dim=1)


def branch_counts(sequences: list[list[int]]) -> list[int]:
    """How many distinct prefixes the batch has at each length: the sequence search's count
    per position (an oracle, as the token count is to `pursue_tokens`)."""
    longest = max(len(s) for s in sequences)
    return [len({tuple(s[: t + 1]) for s in sequences if len(s) > t}) for t in range(longest)]


def precision_recall(recovered: set[int], true: set[int]) -> tuple[float, float]:
    """Token-set precision and recall, as the attack papers report them."""
    hits = len(recovered & true)
    return hits / max(len(recovered), 1), hits / max(len(true), 1)
