"""Mutual distillation: the KL is right, it has gradient where it should and none elsewhere."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tinymodels import PAD, batch, examples, nudge_lora_b, tiny_lora_model

from fedcollm.algorithm.distances import kd_loss, position_mean
from fedcollm.algorithm.distillation import MutualDistillation, selection_gate, teacher_logits
from fedcollm.algorithm.training import fine_tune
from fedcollm.config import Config, DistillConfig, LoraConfig, OptimConfig, load_config
from fedcollm.data import cycle_batches
from fedcollm.models import answer_logits, get_adapter
from fedcollm.registry import DISTANCES

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"


def _kl(p_logits, q_logits, t=1.0):
    """KL(p || q) per position, written out from the definition."""
    p = torch.softmax(p_logits / t, -1)
    return (p * (torch.log(p) - torch.log_softmax(q_logits / t, -1))).sum(-1).mean()


def test_kd_loss_matches_the_definition_in_every_direction():
    torch.manual_seed(0)
    student, teacher = torch.randn(7, 11), torch.randn(7, 11)
    t = 2.0
    forward = _kl(teacher, student, t) * t**2
    reverse = _kl(student, teacher, t) * t**2
    assert kd_loss(student, teacher, t, "forward").item() == pytest.approx(forward.item(), 1e-5)
    assert kd_loss(student, teacher, t, "reverse").item() == pytest.approx(reverse.item(), 1e-5)
    symmetric = kd_loss(student, teacher, t, "symmetric").item()
    assert symmetric == pytest.approx((forward + reverse).item() / 2, 1e-5)
    assert forward.item() != pytest.approx(reverse.item(), 1e-3)


def test_kd_loss_is_zero_for_identical_distributions_and_positive_otherwise():
    logits = torch.randn(5, 9)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits + torch.randn(5, 9)).item() > 0


def test_kd_loss_compares_the_shared_vocabulary_when_embedding_sizes_differ():
    student, teacher = torch.randn(3, 10), torch.randn(3, 12)
    assert kd_loss(student, teacher).item() == pytest.approx(
        kd_loss(student, teacher[:, :10]).item(), 1e-6
    )


def test_top_k_renormalises_over_the_teachers_best_tokens():
    student, teacher = torch.randn(4, 20), torch.randn(4, 20)
    keep = teacher.topk(5, -1).indices
    expected = _kl(teacher.gather(-1, keep), student.gather(-1, keep))
    assert kd_loss(student, teacher, top_k=5).item() == pytest.approx(expected.item(), 1e-5)


def test_kd_loss_has_no_python_loop_over_positions():
    # One vectorised pass: the cost of 10x more positions must not be anywhere near 10x
    # the number of autograd nodes.
    def nodes(n):
        student = torch.randn(n, 50, requires_grad=True)
        loss = kd_loss(student, torch.randn(n, 50), direction="symmetric")
        seen, stack = set(), [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                stack.extend(f for f, _ in fn.next_functions)
        return len(seen)

    assert nodes(40) == nodes(4)


def _pair():
    llm = tiny_lora_model(hidden=48, layers=2, seed=1)
    slm = tiny_lora_model(hidden=32, layers=2, seed=0)
    nudge_lora_b(llm, seed=3)
    nudge_lora_b(slm, seed=4)
    return llm, slm


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_distillation_loss_has_nonzero_gradient_for_both_adapters():
    llm, slm = _pair()
    b = batch()
    for student, teacher in ((slm, llm), (llm, slm)):
        student.zero_grad()
        teacher.zero_grad()
        logits, _ = answer_logits(student, b)
        kd_loss(logits, teacher_logits(teacher, b)).backward()
        grads = _lora_grads(student)
        assert grads and all(g is not None for g in grads.values())
        assert sum(g.abs().sum().item() for g in grads.values()) > 0
        # The teacher gets no gradient at all: it ran under no_grad.
        assert all(g is None for g in _lora_grads(teacher).values())


def test_teacher_logits_are_computed_without_gradient_in_eval_mode():
    llm, _ = _pair()
    llm.train()
    out = teacher_logits(llm, batch())
    assert not out.requires_grad
    assert llm.training  # the mode is restored afterwards


@pytest.mark.parametrize("schedule", ["alternating", "simultaneous", "sequential"])
def test_mutual_distillation_reduces_the_kl_on_a_fixed_batch(schedule):
    llm, slm = _pair()
    b = batch()

    def kl():
        s, _ = answer_logits(slm, b)
        return kd_loss(s, teacher_logits(llm, b)).item()

    before = kl()
    cfg = DistillConfig(kd_steps=15, batch_size=4, slm_lr=1e-2, llm_lr=1e-2, schedule=schedule)
    # Pure distillation (no CE) isolates the KL term.
    run = MutualDistillation(llm, slm, cfg, OptimConfig(weight_decay=0.0))
    run._loss = _kd_only(run)  # noqa: SLF001
    losses = run.run(examples(), PAD, seed=0)
    assert len(losses.slm_kd) == 15 and len(losses.llm_kd) == 15
    assert kl() < 0.5 * before


def _kd_only(run):
    def loss(role, student, targets, teacher, batch):
        kd = kd_loss(student, teacher)
        return kd, F.cross_entropy(student.float(), targets).item(), kd.item(), 1.0

    return loss


def test_alternating_schedule_updates_both_adapters_every_step():
    llm, slm = _pair()
    before = {
        m: {n: p.clone() for n, p in m.named_parameters() if p.requires_grad} for m in (llm, slm)
    }
    base = {
        m: {n: p.clone() for n, p in m.named_parameters() if "lora_" not in n} for m in (llm, slm)
    }
    cfg = DistillConfig(kd_steps=1, batch_size=4, slm_lr=1e-3, llm_lr=1e-3)
    losses = MutualDistillation(llm, slm, cfg, OptimConfig()).run(examples(), PAD, seed=0)
    for model in (llm, slm):
        changed = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and not torch.equal(p, before[model][n])
        ]
        assert changed, "one alternating step must update this adapter"
    assert all(math.isfinite(v) for v in losses.means().values())
    # Base weights never move, in either model: the values, not just their flags.
    for model in (llm, slm):
        after = dict(model.named_parameters())
        assert base[model] and all(torch.equal(after[n], p) for n, p in base[model].items())


def _llm_adapter_after_one_step(schedule: str, slm_lr: float) -> dict[str, torch.Tensor]:
    llm, slm = _pair()
    cfg = DistillConfig(kd_steps=1, batch_size=4, slm_lr=slm_lr, llm_lr=1e-2, schedule=schedule)
    MutualDistillation(llm, slm, cfg, OptimConfig()).run(examples(), PAD, seed=0)
    return get_adapter(llm)


@pytest.mark.parametrize("schedule", ["alternating", "simultaneous"])
def test_only_the_alternating_llm_step_learns_from_the_updated_slm(schedule):
    # Alternating (Algorithm 1): omega's teacher is the SLM after theta's step, so how far
    # theta moved changes omega's update. Simultaneous: omega's teacher is the SLM before the
    # step, so theta's learning rate cannot reach omega in the same step.
    slow = _llm_adapter_after_one_step(schedule, slm_lr=1e-4)
    fast = _llm_adapter_after_one_step(schedule, slm_lr=1e-1)
    same = all(torch.equal(slow[n], fast[n]) for n in slow)
    assert same == (schedule == "simultaneous")


def _dropout_pair(dropout: float = 0.5):
    config = Config(lora=LoraConfig(dropout=dropout))
    llm = tiny_lora_model(hidden=48, layers=2, seed=1, config=config)
    slm = tiny_lora_model(hidden=32, layers=2, seed=0, config=config)
    nudge_lora_b(llm, seed=3)
    nudge_lora_b(slm, seed=4)
    return llm, slm


def _teachers_of_one_step(llm, slm, schedule: str, teacher_forward: str) -> list[torch.Tensor]:
    """The teacher logits each loss of one mutual step saw: the SLM's first, then the LLM's."""
    cfg = DistillConfig(kd_steps=1, schedule=schedule, teacher_forward=teacher_forward)
    run = MutualDistillation(llm, slm, cfg, OptimConfig())
    seen, loss = [], run._loss  # noqa: SLF001

    def recording(role, student, targets, teacher, batch):
        seen.append(teacher.clone())
        return loss(role, student, targets, teacher, batch)

    run._loss = recording  # noqa: SLF001
    run.run(examples(), PAD, seed=0)
    return seen


@pytest.mark.parametrize("schedule", ["alternating", "simultaneous"])
def test_both_teachers_run_in_eval_mode_even_with_lora_dropout(schedule):
    # The SLM learns from the LLM before either has stepped; under "simultaneous" the LLM
    # learns from the SLM before its step too. Those teachers must be the eval-mode logits
    # (no dropout), not the students' own train-mode forwards.
    llm, slm = _dropout_pair()
    b = next(cycle_batches(examples(), 4, PAD, 1, seed=0))
    expected = [teacher_logits(llm, b), teacher_logits(slm, b)]
    slm_teacher, llm_teacher = _teachers_of_one_step(llm, slm, schedule, "eval")
    assert torch.equal(slm_teacher, expected[0])
    if schedule == "simultaneous":
        assert torch.equal(llm_teacher, expected[1])
    # "shared" keeps the train-mode forward, dropout and all: not the eval logits.
    llm, slm = _dropout_pair()
    shared = _teachers_of_one_step(llm, slm, schedule, "shared")[0]
    assert not torch.allclose(shared, expected[0], atol=1e-4)


def test_without_dropout_the_shared_forward_is_the_eval_teacher():
    llm, slm = _dropout_pair(dropout=0.0)
    b = next(cycle_batches(examples(), 4, PAD, 1, seed=0))
    expected = teacher_logits(llm, b)
    for teacher_forward in ("eval", "shared"):
        llm, slm = _dropout_pair(dropout=0.0)
        assert torch.equal(
            _teachers_of_one_step(llm, slm, "alternating", teacher_forward)[0], expected
        )


def _adapters_after_one_step(**settings) -> tuple[dict, dict]:
    llm, slm = _pair()
    cfg = DistillConfig(kd_steps=1, batch_size=4, slm_lr=1e-2, llm_lr=1e-2, **settings)
    MutualDistillation(llm, slm, cfg, OptimConfig()).run(examples(), PAD, seed=0)
    return get_adapter(llm), get_adapter(slm)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_one_way_distillation_removes_exactly_the_other_models_distance_term():
    mutual_llm, mutual_slm = _adapters_after_one_step()
    ce_llm, ce_slm = _adapters_after_one_step(kd_weight=0.0)
    # llm_to_slm: theta's step is Algorithm 1's (it comes first), omega's is cross-entropy only.
    llm, slm = _adapters_after_one_step(direction="llm_to_slm")
    assert _same(slm, mutual_slm) and _same(llm, ce_llm) and not _same(llm, mutual_llm)
    # slm_to_llm: theta learns from its cross-entropy only, omega from both terms.
    llm, slm = _adapters_after_one_step(direction="slm_to_llm")
    assert _same(slm, ce_slm) and not _same(slm, mutual_slm) and not _same(llm, ce_llm)


@pytest.fixture
def squared_probabilities():
    """A toy distance, registered in one place: the squared L2 distance of the two
    distributions per position."""

    def squared(log_q, log_p):
        return (log_q.exp() - log_p.exp()).pow(2).sum(-1)

    DISTANCES.register("squared_probabilities", squared)
    yield squared
    DISTANCES.unregister("squared_probabilities")


def test_a_distance_registered_in_one_place_is_chosen_by_config_and_used(squared_probabilities):
    overrides = ['distill.kd_direction="squared_probabilities"', "lora.dropout=0.0"]
    config = load_config(TINY, overrides=overrides)
    llm, slm = tiny_lora_model(48, 2, 1, config), tiny_lora_model(32, 2, 0, config)
    nudge_lora_b(llm, seed=3)
    nudge_lora_b(slm, seed=4)
    with torch.no_grad():
        s, t = answer_logits(slm, batch())[0], answer_logits(llm, batch())[0]
    expected = squared_probabilities(F.log_softmax(s, -1), F.log_softmax(t, -1)).mean().item()
    cfg = replace(config.distill, kd_steps=1, batch_size=len(examples()))
    losses = MutualDistillation(llm, slm, cfg, config.optim).run(examples(), PAD, seed=0)
    assert losses.slm_kd[0] == pytest.approx(expected, rel=1e-5)
    assert kd_loss(s, t).item() != pytest.approx(expected, rel=1e-2)  # not the KL


def test_a_per_position_weight_enters_the_loss_in_one_place():
    per_position = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert position_mean(per_position).item() == 2.5
    assert position_mean(per_position, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == 1.0
    llm, slm = _pair()
    run = MutualDistillation(llm, slm, DistillConfig(), OptimConfig())
    logits, targets = answer_logits(slm, batch())
    teacher = teacher_logits(llm, batch())
    gated = torch.zeros(len(targets))
    loss, ce, kd, learned = run._loss("slm", logits, targets, teacher, batch(), gated)  # noqa: SLF001
    assert kd == 0.0 and learned == 0.0 and loss.item() == pytest.approx(ce)
    _, _, plain, learned = run._loss("slm", logits, targets, teacher, batch())  # noqa: SLF001
    assert learned == 1.0
    assert plain == pytest.approx(kd_loss(logits, teacher).item())


# --- selective distillation (FedMKT's rule) -------------------------------------------------


def _knowing_slm_and_untuned_llm(config):
    """An SLM tuned on the batch until it predicts every answer token better than the
    untuned LLM does: the LLM is the worse teacher at every position and on every example."""
    llm, slm = tiny_lora_model(48, 2, 1, config), tiny_lora_model(32, 2, 0, config)
    nudge_lora_b(llm, seed=3)
    optim = OptimConfig(weight_decay=0.0)
    fine_tune(
        slm,
        examples(),
        epochs=40,
        max_steps=0,
        batch_size=4,
        lr=1e-2,
        optim=optim,
        pad_id=PAD,
        seed=0,
    )
    with torch.no_grad():
        s, targets = answer_logits(slm, batch())
        t, _ = answer_logits(llm, batch())
    own = F.cross_entropy(s, targets, reduction="none")
    other = F.cross_entropy(t, targets, reduction="none")
    assert (other > own).all()  # the premise of the tests below
    return llm, slm


def _one_step(llm, slm, cfg, config):
    llm, slm = copy.deepcopy(llm), copy.deepcopy(slm)
    losses = MutualDistillation(llm, slm, cfg, config.optim).run(examples(), PAD, seed=0)
    return get_adapter(llm), get_adapter(slm), losses


@pytest.mark.parametrize("selection", ["position", "example"])
def test_selection_learns_only_from_the_better_teacher_and_equals_algorithm_1_there(selection):
    config = load_config(TINY, overrides=["lora.dropout=0.0"])
    llm, slm = _knowing_slm_and_untuned_llm(config)
    base = replace(config.distill, kd_steps=1, batch_size=len(examples()))
    selective = _one_step(llm, slm, replace(base, selection=selection), config)
    # The SLM never learns from the worse LLM, and the LLM learns everywhere from the better
    # SLM: exactly the run where only the LLM has the distance term.
    one_way = _one_step(llm, slm, replace(base, direction="slm_to_llm"), config)
    for got, expected in zip(selective[:2], one_way[:2], strict=True):
        assert all(torch.equal(got[k], expected[k]) for k in got)
    losses = selective[2]
    assert losses.slm_learned == [0.0] and losses.llm_learned == [1.0]
    # ...and not the run of Algorithm 1, where the SLM learns from the LLM too.
    mutual = _one_step(llm, slm, base, config)
    assert not all(torch.equal(selective[1][k], mutual[1][k]) for k in selective[1])
    assert mutual[2].slm_learned == [1.0] and mutual[2].llm_learned == [1.0]


def test_the_gate_compares_each_models_gold_token_loss_and_carries_no_gradient():
    targets = torch.tensor([0, 1, 2, 0])
    student = torch.tensor([[5.0, 0, 0], [0, 0, 5.0], [0, 0, 5.0], [0, 5.0, 0]], requires_grad=True)
    teacher = torch.tensor([[0, 5.0, 0], [0, 5.0, 0], [0, 0, 1.0], [5.0, 0, 0]])
    examples = torch.tensor([0, 0, 1, 1])
    gate = selection_gate("position", student, targets, teacher, targets, examples)
    assert gate.tolist() == [0.0, 1.0, 0.0, 1.0] and not gate.requires_grad
    # Per example: the mean over each example's positions decides for all of them.
    by_example = selection_gate("example", student, targets, teacher, targets, examples)
    assert by_example.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert selection_gate("none", student, targets, teacher, targets, examples) is None
