"""The D_a / D_1..D_K split, lm-eval style tokenisation and the training batches."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tinymodels import mc

from fedcollm.config import ConfigError, config_from_dict
from fedcollm.data import (
    DataError,
    Example,
    Question,
    collate,
    cycle_batches,
    encode_answer,
    encode_examples,
    encode_pair,
    load_questions,
    split_training_data,
    training_batches,
)
from fedcollm.models import byte_tokenizer

TOKENIZER = byte_tokenizer()
PAD = TOKENIZER.pad_token_id


@pytest.fixture(scope="module")
def arc_train(data_dir) -> list[Question]:
    return load_questions("arc_easy", "train", data_dir)


def parts(split) -> list[list[int]]:
    return [split.aux, *split.clients]


def assert_disjoint_cover(split, expected: set[int]) -> None:
    all_parts = parts(split)
    for i, a in enumerate(all_parts):
        assert len(set(a)) == len(a), "duplicate index inside one part"
        for b in all_parts[i + 1 :]:
            assert not set(a) & set(b), "two parts share a row"
    assert set().union(*map(set, all_parts)) == expected
    assert sum(len(p) for p in all_parts) == len(expected)


# --- split_training_data ------------------------------------------------------------------


@pytest.mark.parametrize("num_clients", [1, 3, 5])
def test_iid_split_is_disjoint_and_covers_the_training_split(arc_train, num_clients):
    n = len(arc_train)
    split = split_training_data(arc_train, num_clients=num_clients, seed=0)
    assert len(split.clients) == num_clients
    assert_disjoint_cover(split, set(range(n)))
    # Every question of the training split lands in exactly one part.
    ids = [arc_train[i].id for p in parts(split) for i in p]
    assert sorted(ids) == sorted(q.id for q in arc_train)
    # D_a gets 1/(K+1); the clients share the rest equally.
    assert len(split.aux) == n // (num_clients + 1)
    sizes = [len(c) for c in split.clients]
    assert max(sizes) - min(sizes) <= 1
    assert all(p == sorted(p) for p in parts(split))


def test_aux_fraction_sets_the_share_of_d_a_and_zero_is_the_papers(arc_train):
    n = len(arc_train)
    paper = split_training_data(arc_train, num_clients=4, seed=0)
    assert split_training_data(arc_train, num_clients=4, seed=0, aux_fraction=0.0) == paper
    assert len(paper.aux) == n // 5
    for fraction in (0.05, 0.5):
        split = split_training_data(arc_train, num_clients=4, seed=0, aux_fraction=fraction)
        assert len(split.aux) == int(fraction * n)
        assert_disjoint_cover(split, set(range(n)))
    tiny = split_training_data(arc_train[:10], num_clients=4, seed=0, aux_fraction=0.99)
    assert len(tiny.aux) == 6 and all(len(c) == 1 for c in tiny.clients)  # a row per client
    with pytest.raises(ConfigError, match="data.aux_fraction: must be in"):
        config_from_dict({"data": {"aux_fraction": 1.0}})


def test_iid_split_is_random_not_contiguous(arc_train):
    split = split_training_data(arc_train, num_clients=3, seed=0)
    n = len(arc_train)
    assert split.aux != list(range(len(split.aux)))
    # Each part draws from the whole file, not from one stretch of it.
    for p in parts(split):
        assert min(p) < n // 10 and max(p) > n - n // 10


def test_split_depends_only_on_the_seed(arc_train):
    a = split_training_data(arc_train, num_clients=3, seed=7)
    b = split_training_data(arc_train, num_clients=3, seed=7)
    c = split_training_data(arc_train, num_clients=3, seed=8)
    assert parts(a) == parts(b)
    assert a.aux != c.aux
    assert all(x != y for x, y in zip(a.clients, c.clients, strict=True))


def test_train_limit_keeps_exactly_n_rows(arc_train):
    split = split_training_data(arc_train, num_clients=3, seed=0, limit=200)
    kept = {i for p in parts(split) for i in p}
    assert len(kept) == 200
    assert_disjoint_cover(split, kept)
    assert len(split.aux) == 50
    assert [len(c) for c in split.clients] == [50, 50, 50]
    # A seeded sample of the whole split, not its first 200 rows.
    assert kept != set(range(200))
    other = split_training_data(arc_train, num_clients=3, seed=1, limit=200)
    assert {i for p in parts(other) for i in p} != kept
    again = split_training_data(arc_train, num_clients=3, seed=0, limit=200)
    assert parts(again) == parts(split)


def test_train_limit_above_the_split_keeps_everything(arc_train):
    split = split_training_data(arc_train, num_clients=2, seed=0, limit=10**6)
    assert_disjoint_cover(split, set(range(len(arc_train))))


def label_shares(arc_train, client: list[int]) -> float:
    """The share of a client's rows whose answer sits at its most common position."""
    counts = Counter(arc_train[i].gold for i in client)
    return counts.most_common(1)[0][1] / len(client)


def test_dirichlet_by_label_is_disjoint_covering_and_skewed(arc_train):
    n = len(arc_train)
    split = split_training_data(
        arc_train, num_clients=4, seed=0, partition="dirichlet", alpha=0.1, by="label"
    )
    assert len(split.clients) == 4
    assert all(split.clients)
    assert_disjoint_cover(split, set(range(n)))
    assert len(split.aux) == n // 5
    skewed = [label_shares(arc_train, c) for c in split.clients]
    assert max(skewed) > 0.5, skewed
    # The IID split of the same data keeps every client near the overall ~25% per label.
    iid = split_training_data(arc_train, num_clients=4, seed=0)
    balanced = [label_shares(arc_train, c) for c in iid.clients]
    assert max(balanced) < 0.35, balanced


def test_dirichlet_by_label_groups_by_answer_position_not_label_text(arc_train):
    # ARC labels its choices "A".."D" in most rows and "1".."4" in some: the first choice is
    # one group whatever it is called.
    numeric = next(q for q in arc_train if q.doc["answerKey"] == "1")
    lettered = next(q for q in arc_train if q.doc["answerKey"] == "A")
    assert numeric.gold == lettered.gold == 0
    split = split_training_data(
        arc_train, num_clients=2, seed=0, partition="dirichlet", alpha=0.01, by="label"
    )
    # With a tiny alpha each answer position lands almost whole on one client.
    for position in range(4):
        holders = Counter(
            k for k, part in enumerate(split.clients) for i in part if arc_train[i].gold == position
        )
        assert holders.most_common(1)[0][1] / sum(holders.values()) > 0.9


def test_repeated_rows_are_left_out_before_the_split():
    rows = [mc(f"q{i}", f"Question {i % 7}?", ("a", "b"), 0) for i in range(21)]
    split = split_training_data(rows, num_clients=2, seed=0)
    kept = split.aux + [i for part in split.clients for i in part]
    assert sorted(kept) == list(range(7)) and split.duplicates == 14
    texts = [{rows[i].context for i in part} for part in (split.aux, *split.clients)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    # The same question with another answer is another row.
    other = [*rows[:7], mc("x", "Question 0?", ("a", "b"), 1)]
    assert split_training_data(other, num_clients=2, seed=0).duplicates == 0


def test_dirichlet_is_seeded(arc_train):
    kwargs = dict(num_clients=3, partition="dirichlet", alpha=0.3, by="label")
    a = split_training_data(arc_train, seed=3, **kwargs)
    b = split_training_data(arc_train, seed=3, **kwargs)
    c = split_training_data(arc_train, seed=4, **kwargs)
    assert parts(a) == parts(b)
    assert parts(a) != parts(c)


def test_dirichlet_by_a_template_field(arc_train):
    exam = "{{ id.split('_')[0] }}"  # the exam an ARC question comes from
    split = split_training_data(
        arc_train,
        num_clients=3,
        seed=0,
        partition="dirichlet",
        alpha=0.1,
        by="field",
        partition_field=exam,
    )
    assert_disjoint_cover(split, set(range(len(arc_train))))
    assert all(split.clients)

    def mercury_shares(alpha: float) -> list[float]:
        """Each client's share of the largest exam's rows (68% of the file's)."""
        parts = split_training_data(
            arc_train, 3, 0, "dirichlet", alpha=alpha, by="field", partition_field=exam
        ).clients
        return [sum(arc_train[i].id.startswith("Mercury") for i in p) / len(p) for p in parts]

    # The field drives the skew: a small alpha gives clients very different exams, a huge
    # one about the file's own mix.
    skewed, even = mercury_shares(0.1), mercury_shares(1000.0)
    assert max(skewed) - min(skewed) > 0.5 and max(even) - min(even) < 0.1


def test_by_field_gives_each_value_to_one_client_balanced(data_dir):
    medmcqa = load_questions("medmcqa", "train", data_dir)
    split = split_training_data(
        medmcqa, num_clients=4, seed=0, partition="by_field", partition_field="subject_name"
    )
    assert_disjoint_cover(split, set(range(len(medmcqa))))
    holders: dict[str, set[int]] = {}
    for k, part in enumerate(split.clients):
        for i in part:
            holders.setdefault(medmcqa[i].doc["subject_name"], set()).add(k)
    assert all(len(clients) == 1 for clients in holders.values())
    assert {v: next(iter(c)) for v, c in holders.items()} == split.assignment
    sizes = [len(p) for p in split.clients]
    assert max(sizes) < 1.5 * min(sizes), sizes
    # Deterministic: the same assignment from another seed of D_a's draw is still whole.
    again = split_training_data(
        medmcqa, num_clients=4, seed=0, partition="by_field", partition_field="subject_name"
    )
    assert again.assignment == split.assignment and parts(again) == parts(split)


def test_by_field_needs_as_many_values_as_clients(arc_train):
    with pytest.raises(DataError, match="2 distinct values, fewer than the 3 clients"):
        split_training_data(
            arc_train,
            num_clients=3,
            seed=0,
            partition="by_field",
            partition_field="{{ 'even' if choices.text|length % 2 == 0 else 'odd' }}",
        )
    with pytest.raises(DataError, match="data.partition_field names a missing field"):
        split_training_data(
            arc_train, num_clients=2, seed=0, partition="by_field", partition_field="{{ hospital }}"
        )


def test_too_many_clients_for_the_rows(arc_train):
    with pytest.raises(DataError, match="cannot feed 3 clients"):
        split_training_data(arc_train[:3], num_clients=3, seed=0)
    with pytest.raises(DataError, match="cannot feed 4 clients"):
        split_training_data(arc_train, num_clients=4, seed=0, limit=4)
    # K + 1 rows are just enough: one each.
    split = split_training_data(arc_train[:4], num_clients=3, seed=0)
    assert [len(p) for p in parts(split)] == [1, 1, 1, 1]


# --- encode_pair / encode_answer ----------------------------------------------------------


def masked(example: Example) -> list[int]:
    return [t for t, m in zip(example.input_ids, example.answer_mask, strict=True) if m]


def test_encode_answer_masks_exactly_the_answer(arc_train):
    for q in arc_train[:50]:
        ex = encode_answer(TOKENIZER, q, max_length=512)
        assert len(ex.input_ids) == len(ex.answer_mask)
        assert TOKENIZER.decode(ex.input_ids) == q.context + " " + q.answer
        assert TOKENIZER.decode(masked(ex)) == " " + q.answer
        # The answer is one block at the end.
        n = sum(ex.answer_mask)
        assert n == len(TOKENIZER.encode(" " + q.answer, add_special_tokens=False))
        assert ex.answer_mask == [False] * (len(ex.input_ids) - n) + [True] * n


def test_shifted_mask_selects_the_answer_tokens_as_targets(arc_train):
    q = arc_train[0]
    ex = encode_answer(TOKENIZER, q, max_length=512)
    ids = torch.tensor(ex.input_ids)
    mask = torch.tensor(ex.answer_mask)
    # Position t predicts token t+1: labels are input_ids[1:], selected by answer_mask[1:].
    targets = ids[1:][mask[1:]]
    answer_ids = TOKENIZER.encode(" " + q.answer, add_special_tokens=False)
    assert targets.tolist() == answer_ids
    # The positions doing the predicting end one before the last token.
    predicting = mask[1:].nonzero()[:, 0]
    assert predicting[0].item() == len(ex.input_ids) - len(answer_ids) - 1
    assert predicting[-1].item() == len(ex.input_ids) - 2


def test_no_special_tokens_are_added():
    ex = encode_pair(TOKENIZER, "Q:", " a", max_length=64)
    assert TOKENIZER.eos_token_id not in ex.input_ids
    assert ex.input_ids == TOKENIZER.encode("Q: a", add_special_tokens=False)


def test_trailing_spaces_of_the_context_move_to_the_continuation():
    ex = encode_pair(TOKENIZER, "Answer:  ", "x", max_length=64)
    assert TOKENIZER.decode(ex.input_ids) == "Answer:  x"
    assert TOKENIZER.decode(masked(ex)) == "  x"
    context_part = [t for t, m in zip(ex.input_ids, ex.answer_mask, strict=True) if not m]
    assert TOKENIZER.decode(context_part) == "Answer:"


def test_truncation_keeps_the_whole_answer_at_the_end():
    context = "Question: " + "background " * 60 + "\nAnswer:"
    answer = " the final answer"
    ex = encode_pair(TOKENIZER, context, answer, max_length=48)
    assert len(ex.input_ids) == len(ex.answer_mask) == 48
    assert TOKENIZER.decode(ex.input_ids) == (context + answer)[-48:]  # left end dropped
    assert TOKENIZER.decode(masked(ex)) == answer
    n = len(answer)  # one byte token per character
    assert ex.answer_mask == [False] * (48 - n) + [True] * n


def test_a_generative_answer_ends_with_eos_in_training_and_a_choice_does_not(arc_train):
    config = config_from_dict({"task": "code_alpaca", "data": {"max_length": 18}})
    written = Question("w", "Write:", (), -1, "a long answer", delimiter=" ")
    (example,) = encode_examples([written], [0], TOKENIZER, config)
    eos = TOKENIZER.eos_token_id
    assert example.input_ids[-1] == eos and example.answer_mask[-1]  # a target, kept when cut
    assert len(example.input_ids) == 18
    assert TOKENIZER.decode(masked(example)[:-1]) == " a long answer"
    (choice,) = encode_examples([arc_train[0]], [0], TOKENIZER, config)
    assert eos not in choice.input_ids
    # Scoring reads the reference text's own loss, without EOS.
    assert eos not in encode_answer(TOKENIZER, written, max_length=18).input_ids


def test_short_examples_are_not_padded_or_truncated():
    ex = encode_pair(TOKENIZER, "Hi", " yo", max_length=256)
    assert len(ex.input_ids) == len("Hi yo")


# --- collate and batches ------------------------------------------------------------------


def test_collate_right_pads_with_pad_id():
    examples = [
        Example([10, 11, 12], [False, True, True]),
        Example([20, 21, 22, 23, 24], [False, False, False, True, True]),
        Example([30, 31], [False, True]),
    ]
    batch = collate(examples, pad_id=PAD)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.answer_mask.shape
    assert batch.input_ids.tolist() == [
        [10, 11, 12, PAD, PAD],
        [20, 21, 22, 23, 24],
        [30, 31, PAD, PAD, PAD],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert batch.answer_mask.tolist() == [
        [False, True, True, False, False],
        [False, False, False, True, True],
        [False, True, False, False, False],
    ]
    assert batch.input_ids.dtype == torch.long
    assert batch.answer_mask.dtype == torch.bool


def make_examples(n: int) -> list[Example]:
    """Example i is made of token i + 1, with varying lengths."""
    return [Example([i + 1] * (2 + i % 3), [False] + [True] * (1 + i % 3)) for i in range(n)]


def batch_ids(batch) -> list[int]:
    return (batch.input_ids[:, 0] - 1).tolist()


def test_training_batches_cover_every_example_once_per_epoch():
    examples = make_examples(10)
    batches = list(training_batches(examples, batch_size=3, pad_id=0, epochs=3, seed=0))
    assert len(batches) == 3 * 4  # 3 + 3 + 3 + 1 per epoch
    assert [len(b.input_ids) for b in batches[:4]] == [3, 3, 3, 1]
    epochs = [sum((batch_ids(b) for b in batches[e * 4 : e * 4 + 4]), []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert epochs[0] != list(range(10))  # shuffled
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_training_batches_depend_only_on_the_seed():
    examples = make_examples(12)

    def order(seed):
        batches = training_batches(examples, batch_size=4, pad_id=0, epochs=2, seed=seed)
        return [batch_ids(b) for b in batches]

    assert order(5) == order(5)
    assert order(5) != order(6)
    # The global torch generator plays no part.
    torch.manual_seed(123)
    first = order(5)
    torch.manual_seed(456)
    assert order(5) == first


def test_training_batches_rows_are_the_examples():
    examples = make_examples(5)
    for batch in training_batches(examples, batch_size=2, pad_id=0, epochs=1, seed=0):
        for row, i in enumerate(batch_ids(batch)):
            n = len(examples[i].input_ids)
            assert batch.input_ids[row, :n].tolist() == examples[i].input_ids
            assert batch.answer_mask[row, :n].tolist() == examples[i].answer_mask
            assert batch.attention_mask[row].sum().item() == n


@pytest.mark.parametrize(
    ("n", "batch_size", "steps"), [(10, 3, 1), (10, 3, 4), (10, 3, 7), (10, 4, 25), (3, 8, 5)]
)
def test_cycle_batches_yields_exactly_steps_batches(n, batch_size, steps):
    examples = make_examples(n)
    batches = list(cycle_batches(examples, batch_size, pad_id=0, steps=steps, seed=0))
    assert len(batches) == steps
    assert all(len(b.input_ids) <= batch_size for b in batches)
    # The same stream as training_batches with that seed, cut after `steps` batches.
    reference = training_batches(examples, batch_size, pad_id=0, epochs=steps, seed=0)
    for got, want in zip(batches, reference, strict=False):
        assert torch.equal(got.input_ids, want.input_ids)


def test_cycle_batches_wraps_around():
    examples = make_examples(4)
    batches = list(cycle_batches(examples, batch_size=2, pad_id=0, steps=6, seed=1))
    seen = Counter(i for b in batches for i in batch_ids(b))
    assert seen == Counter({0: 3, 1: 3, 2: 3, 3: 3})


class _MergingTokenizer:
    """Encodes "ab" as one token when the two letters meet, else one token per letter."""

    bos_token_id, eos_token_id = None, 0

    def decode(self, ids):
        return "<eos>"

    def encode(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text[i : i + 2] == "ab":
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def test_the_model_reads_the_contexts_own_tokens_as_lm_eval_does():
    # "xa" + "b" merges across the boundary in the whole text; lm-eval feeds the context's own
    # tokens and then whatever the whole text has after that many tokens.
    example = encode_pair(_MergingTokenizer(), "xa", "bc", max_length=16)
    assert example.input_ids == [ord("x"), ord("a"), ord("c")]
    assert example.answer_mask == [False, False, True]
