"""The distances of mutual distillation, between a student's and a teacher's next-token
distributions at the same answer positions.

A distance is one registered function (TRL's `generalized_jsd_loss` is the anchor):
- `DISTANCES` (`distill.kd_direction`): over one vocabulary, a function of the student's
  and the teacher's log-probabilities, (N, V) each, returning one value per position (N,).
  Built in: forward KL(teacher || student), reverse KL(student || teacher), their mean.
- `CROSS_VOCABULARY` (`distill.cross_tokenizer`): when the two tokenizers differ, a factory
  that, given the config and the map from the teacher's vocabulary to the student's, returns
  a distance between (N, V_s) student and (N, V_t) teacher logits, one value per position.
  Built in: "map" carries the teacher's distribution onto the student's vocabulary (each
  teacher token's probability added to the student token the map sends it to), then the
  `kd_direction` distance; "uld" is Universal Logit Distillation (Boizard et al. 2024), the
  L1 distance of the two distributions' sorted probabilities, which needs no map.

`position_mean` reduces per-position values to the loss; its `weights` argument is the one
place where a per-position weight or gate enters (distillation's `_loss`). Every distance is
scaled by T^2 and runs over all rows at once; nothing loops over positions or tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedcollm.config import DistillConfig
from fedcollm.registry import CROSS_VOCABULARY, DISTANCES

# A floor for carried-over probabilities that no teacher token lands on, so that the reverse
# KL stays finite (mass of 1e-10 where the student puts some is a large but finite penalty).
FLOOR = 1e-10

# (student, teacher) logits at the same N positions -> (N,) distances; the student's carries
# the gradient.
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@DISTANCES.register("forward")
def forward_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position: p the teacher's distribution, q the student's."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@DISTANCES.register("reverse")
def reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per position."""
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


@DISTANCES.register("symmetric")
def symmetric_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return (forward_kl(log_q, log_p) + reverse_kl(log_q, log_p)) / 2


def position_mean(per_position: torch.Tensor, weights: torch.Tensor | None = None):
    """The loss from per-position distances: their mean, each weighted by `weights` (N,)
    if given (a gate of 0 drops a position; all ones is the plain mean)."""
    if weights is not None:
        per_position = per_position * weights.to(per_position)
    return per_position.sum() / max(per_position.numel(), 1)


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kd_distance(cfg: DistillConfig) -> Distance:
    """The `distill.kd_direction` distance between two models of one vocabulary. If the
    embedding matrices differ in size (padding), the shared leading tokens are compared;
    `top_k` > 0 keeps the teacher's k most likely tokens and renormalises both over them."""
    direction, temperature = DISTANCES[cfg.kd_direction], cfg.kd_temperature

    def distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        teacher = teacher.to(student.device)  # the two models may sit on different devices
        vocab = min(student.shape[-1], teacher.shape[-1])
        student, teacher = student[:, :vocab], teacher[:, :vocab]
        if cfg.top_k:
            keep = teacher.float().topk(cfg.top_k, dim=-1).indices
            student, teacher = student.gather(-1, keep), teacher.gather(-1, keep)
        return direction(log_probs(student, temperature), log_probs(teacher, temperature)) * (
            temperature**2
        )

    return distance


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    direction: str = "forward",
    top_k: int = 0,
) -> torch.Tensor:
    """The mean `kd_distance` over positions, for (N, V) logits of one vocabulary."""
    cfg = DistillConfig(kd_temperature=temperature, kd_direction=direction, top_k=top_k)
    return position_mean(kd_distance(cfg)(student, teacher))


def carried_over(teacher_probs: torch.Tensor, teacher_to_student: torch.Tensor, width: int):
    """(N, V_t) teacher probabilities as (N, width) over the student's vocabulary: each
    teacher token's probability added to the student token the map sends it to."""
    carried = teacher_probs.new_zeros(teacher_probs.shape[0], width)
    return carried.index_add_(1, teacher_to_student.to(teacher_probs.device), teacher_probs)


@CROSS_VOCABULARY.register("map")
def mapped_distance(cfg: DistillConfig, teacher_to_student: torch.Tensor) -> Distance:
    """The `kd_direction` distance after carrying the teacher's distribution onto the
    student's vocabulary; student tokens no teacher token reaches get FLOOR."""
    direction, temperature = DISTANCES[cfg.kd_direction], cfg.kd_temperature

    def distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p = F.softmax(teacher.to(student.device).float() / temperature, dim=-1)
        carried = carried_over(p, teacher_to_student, student.shape[-1])
        log_p = carried.clamp_min(FLOOR).log()
        return direction(log_probs(student, temperature), log_p) * temperature**2

    return distance


@CROSS_VOCABULARY.register("uld")
def uld_distance(cfg: DistillConfig, teacher_to_student: torch.Tensor) -> Distance:
    """ULD: how sure the models are, whichever token is which (the map is not used)."""
    return lambda student, teacher: uld(student, teacher, cfg.kd_temperature)


def uld(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0):
    """Per position, the L1 distance of the (N, V_s) and (N, V_t) distributions' sorted
    probabilities, the shorter padded with zeros."""
    p = F.softmax(student.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    q = F.softmax(teacher.to(student.device).float() / temperature, dim=-1)
    q = q.sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p, q = F.pad(p, (0, width - p.shape[-1])), F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(dim=-1)


def distances(cfg: DistillConfig, vocabulary=None) -> dict[str, Distance]:
    """Each model's distance as student ("slm", "llm"): `kd_direction`'s over one
    vocabulary, or `cross_tokenizer`'s through the `vocabulary` map when the two differ."""
    if vocabulary is None:
        one = kd_distance(cfg)
        return {"slm": one, "llm": one}
    factory = CROSS_VOCABULARY[cfg.cross_tokenizer]
    return {
        "slm": factory(cfg, vocabulary.llm_to_slm),
        "llm": factory(cfg, vocabulary.slm_to_llm),
    }
