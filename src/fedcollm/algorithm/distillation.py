"""Mutual knowledge distillation between the server LLM and the SLM on D_a (step 4).

Each model's loss is its answer-token cross-entropy plus kd_weight times its distance
(`distances.py`: the KL by default) toward the other model's next-token distribution at the
same answer positions, in one vectorised pass over all answer positions of the batch; the
teacher side carries no gradient. When the two tokenizers differ, D_a holds both
tokenizations (`AlignedExample`), each model's cross-entropy covers its own answer tokens,
and the distance compares only the aligned positions' rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedcollm.algorithm.distances import Distance, distances, position_mean
from fedcollm.algorithm.training import make_optimizer, optimizer_step
from fedcollm.config import DistillConfig, OptimConfig
from fedcollm.data import Batch, Example, collate, cycle_batches
from fedcollm.data.alignment import AlignedBatch, AlignedExample, collate_aligned
from fedcollm.models import answer_logits, eval_mode, has_dropout
from fedcollm.models.vocabulary import VocabularyMap


@dataclass
class DistillLosses:
    """Per-step losses of one round of mutual distillation, and the share of the compared
    answer positions at which each model learned from the other (its distance term's
    weight was not 0)."""

    slm_ce: list[float] = field(default_factory=list)
    slm_kd: list[float] = field(default_factory=list)
    llm_ce: list[float] = field(default_factory=list)
    llm_kd: list[float] = field(default_factory=list)
    slm_learned: list[float] = field(default_factory=list)
    llm_learned: list[float] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        return {
            f"distill_{name}": (sum(v) / len(v) if v else float("nan"))
            for name, v in vars(self).items()
        }


@torch.no_grad()
def selection_gate(
    selection: str,
    student: torch.Tensor,
    student_targets: torch.Tensor,
    teacher: torch.Tensor,
    teacher_targets: torch.Tensor,
    examples: torch.Tensor,
) -> torch.Tensor | None:
    """FedMKT's selective rule (Fan et al. 2024): 1 where the teacher's cross-entropy on the
    gold token is lower than the student's, else 0; per answer position, or per example
    (each example's mean over its positions, given to all of them). None: no selection.

    student, teacher: (N, V_s), (N, V_t) logits at the N compared positions; their targets
    (N,), each in its own vocabulary; examples: (N,) the example of each position."""
    if selection == "none":
        return None
    device = student.device
    own = F.cross_entropy(student.float(), student_targets.to(device), reduction="none")
    other = F.cross_entropy(
        teacher.to(device).float(), teacher_targets.to(device), reduction="none"
    )
    if selection == "example":
        examples = examples.to(device)
        count = torch.bincount(examples).clamp_min(1).float()
        own = (own.new_zeros(len(count)).index_add_(0, examples, own) / count)[examples]
        other = (other.new_zeros(len(count)).index_add_(0, examples, other) / count)[examples]
    return (other < own).float()


@torch.no_grad()
def teacher_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Answer-position logits of a model acting as teacher: eval mode, no gradient."""
    with eval_mode(model):
        return answer_logits(model, batch)[0]


def distillation_steps(cfg: DistillConfig, aux_examples: int) -> int:
    """R, the steps of one round's distillation: `kd_steps`, or one pass over D_a if 0."""
    return cfg.kd_steps or -(-aux_examples // cfg.batch_size)


def _model_batch(batch: Batch | AlignedBatch, role: str) -> Batch:
    return getattr(batch, role) if isinstance(batch, AlignedBatch) else batch


def _aligned_rows(batch: Batch | AlignedBatch, role: str) -> torch.Tensor | None:
    """The rows of `role`'s answer logits that are compared; None: all (one tokenizer)."""
    return getattr(batch, f"{role}_rows") if isinstance(batch, AlignedBatch) else None


class MutualDistillation:
    """Holds the two optimisers and runs R steps of co-tuning per call.

    The LLM's optimiser (for omega) lives across rounds. The SLM's is made anew each round,
    because theta is overwritten by the clients' aggregate before every distillation.
    `vocabulary`: the map between the two vocabularies when the tokenizers differ (D_a is
    then made of `AlignedExample`s); None when they are one.
    """

    def __init__(
        self,
        llm,
        slm,
        cfg: DistillConfig,
        optim: OptimConfig,
        vocabulary: VocabularyMap | None = None,
    ):
        self.llm, self.slm, self.cfg, self.optim = llm, slm, cfg, optim
        # Whose train-mode forward is random; fixed for the run, so found once.
        self._with_dropout = {m for m in (llm, slm) if has_dropout(m)}
        self.llm_optimizer = make_optimizer(llm.parameters(), cfg.llm_lr, optim)
        self._make_slm_optimizer = lambda: make_optimizer(slm.parameters(), cfg.slm_lr, optim)
        self.distance: dict[str, Distance] = distances(cfg, vocabulary)  # by student

    def _loss(
        self,
        role: str,
        student,
        targets,
        teacher,
        batch: Batch | AlignedBatch,
        weights: torch.Tensor | None = None,
    ):
        """`role`'s loss as student: cross-entropy on all its answer tokens, distance to the
        teacher's rows at the aligned positions, each position's distance weighted by
        `weights` (one per compared position), by default `distill.selection`'s gate.
        Returns the loss, its two terms and the share of positions it learned from."""
        ce = F.cross_entropy(student.float(), targets)
        teacher_role = "llm" if role == "slm" else "slm"
        teacher_targets = _model_batch(batch, teacher_role).answer_targets
        examples = _model_batch(batch, role).answer_examples
        student_rows = _aligned_rows(batch, role)
        if student_rows is not None:
            teacher_rows = _aligned_rows(batch, teacher_role)
            rows = student_rows.to(student.device)
            student, targets, examples = student[rows], targets[rows], examples[student_rows]
            teacher, teacher_targets = teacher[teacher_rows], teacher_targets[teacher_rows]
        if weights is None:
            weights = selection_gate(
                self.cfg.selection, student, targets, teacher, teacher_targets, examples
            )
        kd = position_mean(self.distance[role](student, teacher), weights)
        # One-way ablations (distill.direction): the other model keeps its cross-entropy only;
        # its distance is still computed, for the metrics.
        learns = self.cfg.direction in ("mutual", f"{teacher_role}_to_{role}")
        weight = self.cfg.kd_weight if learns else 0.0
        learned = (1.0 if weights is None else weights.mean().item()) if weight else 0.0
        return ce + weight * kd, ce.item(), kd.item(), learned

    def _slm_step(self, optimizer, batch, slm_out, llm_teacher, losses: DistillLosses) -> None:
        slm_batch = _model_batch(batch, "slm")
        logits, targets = slm_out if slm_out is not None else answer_logits(self.slm, slm_batch)
        loss, ce, kd, learned = self._loss("slm", logits, targets, llm_teacher, batch)
        optimizer_step(optimizer, loss, self.optim.max_grad_norm)
        losses.slm_ce.append(ce)
        losses.slm_kd.append(kd)
        losses.slm_learned.append(learned)

    def _llm_step(self, batch, llm_out, slm_teacher, losses: DistillLosses) -> None:
        llm_batch = _model_batch(batch, "llm")
        logits, targets = llm_out if llm_out is not None else answer_logits(self.llm, llm_batch)
        loss, ce, kd, learned = self._loss("llm", logits, targets, slm_teacher, batch)
        optimizer_step(self.llm_optimizer, loss, self.optim.max_grad_norm)
        losses.llm_ce.append(ce)
        losses.llm_kd.append(kd)
        losses.llm_learned.append(learned)

    def _teacher(self, model, batch: Batch, student_out) -> torch.Tensor:
        """A model's logits as the other model's teacher: those of eval mode, no gradient.
        Its train-mode student forward serves instead when that is the same (no dropout
        anywhere) or when `teacher_forward = "shared"` accepts LoRA dropout in the teacher."""
        if self.cfg.teacher_forward == "shared" or model not in self._with_dropout:
            return student_out[0].detach()
        return teacher_logits(model, batch)

    def _mutual_step(self, slm_optimizer, batch, losses: DistillLosses) -> None:
        """One batch of the alternating (Algorithm 1) or the simultaneous schedule."""
        slm_batch, llm_batch = _model_batch(batch, "slm"), _model_batch(batch, "llm")
        # The LLM's student forward comes first: omega does not change before its own step.
        llm_out = answer_logits(self.llm, llm_batch)
        llm_teacher = self._teacher(self.llm, llm_batch, llm_out)
        if self.cfg.schedule == "alternating":
            # Algorithm 1: theta steps toward the LLM, then omega toward the *updated* SLM,
            # which costs the SLM one more forward.
            self._slm_step(slm_optimizer, batch, None, llm_teacher, losses)
            slm_teacher = teacher_logits(self.slm, slm_batch)
        else:
            # Both step toward the other's logits from before this step's updates.
            slm_out = answer_logits(self.slm, slm_batch)
            slm_teacher = self._teacher(self.slm, slm_batch, slm_out)
            self._slm_step(slm_optimizer, batch, slm_out, llm_teacher, losses)
        self._llm_step(batch, llm_out, slm_teacher, losses)

    def batches(self, aux_data, pad_id, seed: int) -> list[Batch | AlignedBatch]:
        """The R batches of D_a one round distils on, in the seed's order."""
        steps = distillation_steps(self.cfg, len(aux_data))
        aligned = bool(aux_data) and isinstance(aux_data[0], AlignedExample)
        make_batch = collate_aligned if aligned else collate
        return list(cycle_batches(aux_data, self.cfg.batch_size, pad_id, steps, seed, make_batch))

    def run(
        self,
        aux_data: Sequence[Example] | Sequence[AlignedExample],
        pad_id: int | tuple[int, int],
        seed: int,
        on_step: Callable[[int, int, DistillLosses], None] | None = None,
    ) -> DistillLosses:
        """R steps on D_a; `pad_id`: (SLM's, LLM's) when D_a is aligned."""
        batches = self.batches(aux_data, pad_id, seed)
        steps = len(batches)
        slm_optimizer = self._make_slm_optimizer()
        self.llm.train()
        self.slm.train()
        torch.manual_seed(seed)  # LoRA dropout
        losses = DistillLosses()
        if self.cfg.schedule == "sequential":
            for step, batch in enumerate(batches, start=1):
                teacher = teacher_logits(self.llm, _model_batch(batch, "llm"))
                self._slm_step(slm_optimizer, batch, None, teacher, losses)
                if on_step:
                    on_step(step, 2 * steps, losses)
            for step, batch in enumerate(batches, start=steps + 1):
                teacher = teacher_logits(self.slm, _model_batch(batch, "slm"))
                self._llm_step(batch, None, teacher, losses)
                if on_step:
                    on_step(step, 2 * steps, losses)
            return losses
        for step, batch in enumerate(batches, start=1):
            self._mutual_step(slm_optimizer, batch, losses)
            if on_step:
                on_step(step, steps, losses)
        return losses


def distil_groups(
    groups: Sequence[MutualDistillation],
    aux_data: Sequence[Sequence],
    pad_ids: Sequence,
    seed: int,
    on_step: Callable[[int, int, DistillLosses], None] | None = None,
) -> list[DistillLosses]:
    """One round's mutual distillation of one LLM with the SLMs of several groups (clients of
    several SLM families): each step every group's SLM steps toward the LLM as in Algorithm 1,
    then the LLM steps once on its cross-entropy plus kd_weight times the mean of its
    distances toward the updated SLMs (each group's gate and vocabulary map its own).

    All groups share the LLM and its optimiser; `aux_data[g]` is D_a encoded for group g,
    the same questions in the same order, so that every step's batches hold the same
    examples. The first group's losses carry the LLM's."""
    lead = groups[0]
    batches = [
        g.batches(data, pad, seed) for g, data, pad in zip(groups, aux_data, pad_ids, strict=True)
    ]
    optimizers = [g._make_slm_optimizer() for g in groups]
    for model in (lead.llm, *(g.slm for g in groups)):
        model.train()
    torch.manual_seed(seed)  # LoRA dropout
    losses = [DistillLosses() for _ in groups]
    for step, step_batches in enumerate(zip(*batches, strict=True), start=1):
        llm_batch = _model_batch(step_batches[0], "llm")
        for batch in step_batches[1:]:
            if not torch.equal(_model_batch(batch, "llm").input_ids, llm_batch.input_ids):
                raise ValueError("the groups' D_a gives the LLM different inputs")
        llm_out = answer_logits(lead.llm, llm_batch)
        llm_teacher = lead._teacher(lead.llm, llm_batch, llm_out)
        terms = []
        for group, optimizer, batch, record in zip(
            groups, optimizers, step_batches, losses, strict=True
        ):
            group._slm_step(optimizer, batch, None, llm_teacher, record)
            slm_teacher = teacher_logits(group.slm, _model_batch(batch, "slm"))
            terms.append(group._loss("llm", *llm_out, slm_teacher, batch))
        loss = sum(t[0] for t in terms) / len(terms)
        optimizer_step(lead.llm_optimizer, loss, lead.optim.max_grad_norm)
        losses[0].llm_ce.append(terms[0][1])
        losses[0].llm_kd.append(sum(t[2] for t in terms) / len(terms))
        losses[0].llm_learned.append(sum(t[3] for t in terms) / len(terms))
        if on_step:
            on_step(step, len(batches[0]), losses[0])
    return losses
