"""Distances between next-token distributions over two different vocabularies.

At aligned answer positions (`data.alignment`) both models predict the same text, each in
its own tokens, so the KL of one vocabulary does not apply. `distill.cross_tokenizer`
chooses:
- "map": the teacher's distribution carried onto the student's vocabulary through the
  vocabulary map (each teacher token's probability added to its closest student token,
  `models.vocabulary`), then the KL of `kd_loss`'s direction and temperature;
- "uld": Universal Logit Distillation (Boizard et al. 2024): the Wasserstein distance
  between the two distributions with each one's tokens ranked by probability, which is the
  L1 distance of the sorted probability vectors (the shorter padded with zeros). It needs
  no map and ignores which token is which: it matches how sure the models are.
Both work on (N, V) rows at once; nothing loops over positions or tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedcollm.config import DistillConfig

# A floor for carried-over probabilities that no teacher token lands on, so that the reverse
# KL stays finite (mass of 1e-10 where the student puts some is a large but finite penalty).
FLOOR = 1e-10


def uld_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0):
    """ULD between (N, V_s) student and (N, V_t) teacher logits, mean over positions."""
    p = F.softmax(student.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    q = F.softmax(teacher.to(student.device).float() / temperature, dim=-1)
    q = q.sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p, q = F.pad(p, (0, width - p.shape[-1])), F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(dim=-1).mean()


def carried_over(teacher_probs: torch.Tensor, teacher_to_student: torch.Tensor, width: int):
    """(N, V_t) teacher probabilities as (N, width) over the student's vocabulary: each
    teacher token's probability added to the student token the map sends it to."""
    carried = teacher_probs.new_zeros(teacher_probs.shape[0], width)
    return carried.index_add_(1, teacher_to_student.to(teacher_probs.device), teacher_probs)


def mapped_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    teacher_to_student: torch.Tensor,
    temperature: float = 1.0,
    direction: str = "forward",
    support: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The KL of `kd_loss` after carrying the teacher's distribution onto the student's
    vocabulary; scaled by T^2 as `kd_loss` is.

    Only the student tokens the map reaches (its support, `torch.unique(teacher_to_student,
    return_inverse=True)`, computed once by the caller or here) can carry teacher mass, so
    everything but the student's log-softmax runs over those columns: for an LLM student of
    152k tokens taught by a 49k-token SLM, under a third of its vocabulary. The rest of the
    student's vocabulary enters the reverse KL only through its total probability."""
    columns, inverse = support or torch.unique(teacher_to_student, return_inverse=True)
    teacher = teacher.to(student.device).float()
    p = carried_over(F.softmax(teacher / temperature, dim=-1), inverse, len(columns))
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_q_on = log_q[:, columns.to(student.device)]

    def forward() -> torch.Tensor:  # KL(p || q): p is 0 off its support
        return (torch.xlogy(p, p) - p * log_q_on).sum(dim=-1)

    def reverse() -> torch.Tensor:  # KL(q || p), p floored; off the support p = FLOOR
        off = (1 - log_q_on.exp().sum(dim=-1)).clamp_min(0)
        cross = (log_q_on.exp() * p.clamp_min(FLOOR).log()).sum(dim=-1) + off * math.log(FLOOR)
        return (log_q.exp() * log_q).sum(dim=-1) - cross

    kl = {"forward": forward, "reverse": reverse, "symmetric": lambda: (forward() + reverse()) / 2}
    if direction not in kl:
        raise ValueError(f"kd_direction must be one of {sorted(kl)}, got {direction!r}")
    return kl[direction]().mean() * temperature**2


Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student, teacher) -> loss


def cross_vocabulary_distance(cfg: DistillConfig, teacher_to_student: torch.Tensor) -> Distance:
    """The distance `cfg.cross_tokenizer` names, for a student and a teacher whose
    vocabularies differ; `teacher_to_student`: the vocabulary map in that direction."""
    if cfg.cross_tokenizer == "uld":
        return lambda student, teacher: uld_loss(student, teacher, cfg.kd_temperature)
    support = torch.unique(teacher_to_student, return_inverse=True)
    return lambda student, teacher: mapped_kd_loss(
        student, teacher, teacher_to_student, cfg.kd_temperature, cfg.kd_direction, support
    )
