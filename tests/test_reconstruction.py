"""The reconstruction attack's span test (DAGER, adapted to LoRA uploads): what it reads of
a planted batch from the exact gradient, where LoRA's rank stops it, what noise does to it,
and what AdamW's first step leaves of the gradient in a client's upload."""

from __future__ import annotations

import torch
from tinymodels import nudge_lora_b

from fedcollm.algorithm.training import answer_loss, fine_tune
from fedcollm.config import LoraConfig, ModelConfig, OptimConfig, TinyModel
from fedcollm.data import collate, encode_pair
from fedcollm.experiments.reconstruction import (
    adam_observations,
    branch_counts,
    first_layer_inputs,
    gradient_estimate,
    grow_sequences,
    input_span,
    precision_recall,
    pursue_tokens,
    recover_tokens,
)
from fedcollm.models import add_lora, byte_tokenizer, get_adapter, tiny_llama

TOKENIZER = byte_tokenizer()
BATCH = [("Question: the cat sat?\nAnswer:", " yes")]  # 19 distinct byte tokens
LR = 3e-4


def _client(rank: int, hidden: int = 128, first_round: bool = False):
    """A tiny client SLM as in round 2 or later (B != 0; in round 1 B = 0 and A's gradient
    is zero), without dropout, and its planted batch."""
    spec = ModelConfig(tiny=TinyModel(hidden, 2, 4, 2 * hidden))
    lora = LoraConfig(r=rank, alpha=2 * rank, dropout=0.0)
    model = add_lora(tiny_llama(spec, len(TOKENIZER), 0), lora)
    if not first_round:
        nudge_lora_b(model, scale=0.05, seed=3)
    examples = [encode_pair(TOKENIZER, context, answer, 128) for context, answer in BATCH]
    return model, examples


def _gradient(model, examples) -> dict[str, torch.Tensor]:
    answer_loss(model, collate(examples, TOKENIZER.pad_token_id)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _true_tokens(examples) -> set[int]:
    return {t for e in examples for t in e.input_ids}


def test_the_exact_gradient_gives_the_batch_away_when_its_tokens_fit_three_times_the_rank():
    # q, k and v of the first layer show 3 r = 24 directions of the inputs' span: the
    # batch's 19 distinct tokens fit, and every one of them, and nothing else, is in it.
    model, examples = _client(rank=8)
    recovered = recover_tokens(model, _gradient(model, examples))
    assert len(_true_tokens(examples)) == 19
    assert precision_recall(recovered, _true_tokens(examples)) == (1.0, 1.0)


def test_a_rank_too_low_for_the_batch_shows_none_of_its_tokens():
    # 3 r = 6 directions of a 19-dimensional span: no token's input lies in them.
    model, examples = _client(rank=2)
    assert recover_tokens(model, _gradient(model, examples)) == set()


def test_the_second_layer_gives_the_sequence_in_order_when_its_positions_fit_its_span():
    # The second layer's input at a position depends on every token before it. Grown one
    # token at a time from the first layer's set, the planted row comes back exactly (but
    # its last token, which feeds no loss) once 3r covers its 33 positions (r = 16: 48);
    # at r = 8 (24 directions) it does not.
    for rank, recovered in ((16, True), (8, False)):
        model, examples = _client(rank=rank)
        gradient = _gradient(model, examples)
        row = list(examples[0].input_ids[:-1])
        found = grow_sequences(
            model,
            sorted(_true_tokens(examples)),
            input_span(gradient, layer=1),
            branch_counts([row]),
        )
        assert (found == [row]) is recovered, rank


def test_branch_counts_are_the_distinct_prefixes_at_each_length():
    assert branch_counts([[1, 2, 3], [1, 2, 4], [1, 5]]) == [1, 2, 2]


def test_noise_on_the_gradient_fills_the_span_and_every_token_passes():
    # DP's noise (here N(0, 1e-3), far above the gradient's smallest directions) makes A's
    # update full rank: every token is "in" the span, and precision falls to the batch's
    # share of the vocabulary.
    model, examples = _client(rank=64)
    gradient = _gradient(model, examples)
    generator = torch.Generator().manual_seed(0)
    noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in gradient.items()}
    precision, recall = precision_recall(recover_tokens(model, noisy), _true_tokens(examples))
    assert recall == 1.0 and precision < 0.1


def test_adamws_first_step_shows_every_gradient_sign_but_not_the_span():
    # The upload after one AdamW step is -lr (g / (|g| + eps)) - lr wd theta: the server
    # inverts it to every entry's sign (and small entries' sizes), but the inversion is not
    # linear, the update is full rank, and the span test reads nothing at rank 8.
    model, examples = _client(rank=8)
    theta = get_adapter(model)
    gradient = _gradient(model, examples)
    model.zero_grad(set_to_none=True)
    pad = TOKENIZER.pad_token_id
    fine_tune(model, examples, epochs=1, max_steps=1, batch_size=1, lr=LR, optim=OptimConfig(),
              pad_id=pad, seed=0)  # fmt: skip
    estimate = gradient_estimate(get_adapter(model), theta, LR, OptimConfig(), steps=1)
    for name, grad in gradient.items():
        key = name.replace(".default", "")
        assert torch.equal(torch.sign(estimate[key]).float(), torch.sign(grad)), key
    assert recover_tokens(model, estimate) == set()


def _one_adamw_step(rank: int, first_round: bool = False):
    model, examples = _client(rank=rank, first_round=first_round)
    theta = get_adapter(model)
    pad = TOKENIZER.pad_token_id
    fine_tune(model, examples, epochs=1, max_steps=1, batch_size=1, lr=LR, optim=OptimConfig(),
              pad_id=pad, seed=0)  # fmt: skip
    return model, examples, get_adapter(model), theta


def test_the_entries_adamw_keeps_give_the_batch_away_whatever_the_rank():
    # The server knows theta, lr and wd; the entries whose size survived fp32 (about 70%
    # here) are enough. Each row of A's gradient is a combination of the batch's 19 inputs
    # out of 259: a sparse combination, which a greedy pursuit over the vocabulary finds
    # from one row as well as from many, so the rank does not protect (the span test's 3r
    # limit is not the attack's). Told how many distinct tokens there are, it names 18 of
    # the 19 at rank 8 and at rank 2. In round 1 (B = 0) A does not move: nothing to read.
    for rank, first_round, floor, ceiling in ((8, False, 0.8, 1.0), (2, False, 0.8, 1.0),
                                              (8, True, 0.0, 0.3)):  # fmt: skip
        model, examples, upload, theta = _one_adamw_step(rank, first_round)
        true = _true_tokens(examples)
        rows, observed = adam_observations(upload, theta, LR, OptimConfig())
        chosen = pursue_tokens(first_layer_inputs(model), rows, observed, len(true))
        precision, _ = precision_recall(set(chosen), true)
        assert floor <= precision <= ceiling, (rank, first_round, precision)
