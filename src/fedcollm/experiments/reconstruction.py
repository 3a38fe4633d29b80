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


def first_layer_inputs(model) -> torch.Tensor:
    """(V, d): every vocabulary token's input to the first layer's projections, the
    embedding after that layer's input norm."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = base.get_input_embeddings().weight.detach().float()
    norm = base.model.layers[0].input_layernorm
    with torch.no_grad():
        return norm(embeddings.unsqueeze(0)).squeeze(0).float()


def _first_layer_a(key: str) -> bool:
    """Whether an adapter key is the first layer's A of a projection of the embeddings."""
    return ".layers.0." in key and "lora_A" in key and any(p in key for p in EMBEDDING_INPUTS)


def first_layer_rows(estimate: Adapter) -> torch.Tensor:
    """(3r, d): the first layer's q/k/v A rows of an adapter-shaped estimate, stacked."""
    return torch.cat([v for k, v in estimate.items() if _first_layer_a(k)])


def input_span(estimate: Adapter, tolerance: float = 1e-6) -> torch.Tensor:
    """(k, d): an orthonormal basis of the directions the first layer's A updates show: the
    row space of the stacked q/k/v A estimates, singular values above `tolerance` times the
    largest."""
    rows = first_layer_rows(estimate).double()
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
    upload: Adapter, theta: Adapter, lr: float, optim: OptimConfig, reliable: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the first layer's q/k/v A gradient that one AdamW step's upload shows,
    (3r, d), and where they are trustworthy: the entries whose |u| = |g| / (|g| + eps) is
    below 1 - `reliable`, so that fp32 kept their size (larger entries keep only a sign)."""
    first = {k: v for k, v in upload.items() if _first_layer_a(k)}
    masks = [(1 - _adam_ratio(v, theta[k], lr, optim).abs()) > reliable for k, v in first.items()]
    return first_layer_rows(gradient_estimate(first, theta, lr, optim, 1)), torch.cat(masks)


def pursue_tokens(
    inputs: torch.Tensor, rows: torch.Tensor, observed: torch.Tensor, count: int
) -> list[int]:
    """`count` tokens, greedily (orthogonal matching pursuit over the vocabulary): each time
    the token whose input best explains what is left of the rows on their observed entries,
    then every row refitted on the tokens chosen. Where the span test needs every entry, this
    needs only some: AdamW's inversion gives them."""
    x, mask = inputs.double(), observed.double()
    target = rows.double() * mask
    residual, chosen = target.clone(), []
    norms = (mask @ (x**2).T).clamp_min(1e-30)  # (rows, V): each input's norm on each mask
    for _ in range(count):
        gain = ((residual @ x.T) ** 2 / norms).sum(0)
        gain[chosen] = -1
        chosen.append(int(gain.argmax()))
        # Every row refitted at once: zeroing a row's unobserved entries in its target and
        # in the chosen inputs gives its least squares on the observed ones.
        design = mask[:, :, None] * x[chosen].T[None]  # (rows, d, chosen)
        fit = torch.linalg.lstsq(design, target.unsqueeze(-1)).solution
        residual = target - (design @ fit).squeeze(-1)
    return chosen


def precision_recall(recovered: set[int], true: set[int]) -> tuple[float, float]:
    """Token-set precision and recall, as the attack papers report them."""
    hits = len(recovered & true)
    return hits / max(len(recovered), 1), hits / max(len(true), 1)
