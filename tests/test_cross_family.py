"""Cross-family co-tuning: an LLM and an SLM whose tokenizers differ.

The two tokenizers built in code split text differently: GPT-2-style bytes (every byte a
token) and SentencePiece-style pieces ("▁" word starts, whole words, letters, byte fallback).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tinymodels import PAIRS, nudge_lora_b

from fedcollm.algorithm.distances import FLOOR, carried_over, kd_loss, mapped_distance, uld
from fedcollm.algorithm.distillation import MutualDistillation, teacher_logits
from fedcollm.algorithm.round import reference_rounds
from fedcollm.algorithm.server import CoTuningServer
from fedcollm.config import Config, DistillConfig, ModelConfig, OptimConfig, TinyModel, load_config
from fedcollm.data import encode_pair, evaluation_questions, training_split
from fedcollm.data.alignment import (
    AlignedExample,
    align,
    collate_aligned,
    predicted_answer_starts,
)
from fedcollm.evaluation.generation import target_losses
from fedcollm.models import add_lora, answer_logits, byte_tokenizer, tiny_llama
from fedcollm.models.loading import piece_tokenizer
from fedcollm.models.vocabulary import byte_lengths, token_bytes, vocabulary_map


def mapped_kd_loss(student, teacher, teacher_to_student, temperature, direction):
    cfg = DistillConfig(kd_temperature=temperature, kd_direction=direction)
    return mapped_distance(cfg, teacher_to_student)(student, teacher).mean()


def uld_loss(student, teacher):
    return uld(student, teacher).mean()


TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"
BYTES, PIECES = byte_tokenizer(), piece_tokenizer()
# Whitespace runs, tabs, newlines, digits, punctuation, accents, CJK and an emoji.
HARD = [
    ("Question: Which fruit is  sweet?\nAnswer:", " the red one, 12.5%!"),
    ("Über\tcafé:", " naïve 日本語 🙂 (x=3)"),
    ("Count:", " 1, 22, 333,\n\n4444"),
    ("What?", "   three spaces\ttab"),
    *PAIRS,
]


def test_token_bytes_spell_the_text_for_both_families():
    for context, answer in HARD:
        text = context + answer
        for tokenizer, lead in ((BYTES, b""), (PIECES, b" ")):  # SentencePiece's dummy space
            pieces = token_bytes(tokenizer, len(tokenizer))
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert b"".join(pieces[i] for i in ids) == lead + text.encode(), (tokenizer, text)
    assert token_bytes(BYTES, len(BYTES) + 3)[-4:] == [b""] * 4  # end of text, padded ids


def _tiny(tokenizer, hidden: int, seed: int):
    spec = ModelConfig(tiny=TinyModel(hidden, 2, 4, 2 * hidden))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = add_lora(tiny_llama(spec, len(tokenizer), seed), Config().lora)
    nudge_lora_b(model, seed=seed + 2)
    # A random model's next-token distribution is nearly uniform; a trained one's is peaked.
    # (Between two near-uniform distributions over vocabularies of different sizes, every
    # student probability exceeds its rank's teacher probability and ULD's gradient is 0.)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    return model


def _aligned(pairs=HARD) -> list[AlignedExample]:
    """The SLM reads bytes, the LLM pieces (as in configs/tiny.toml with llm pieces)."""
    lengths = byte_lengths(BYTES, len(BYTES)), byte_lengths(PIECES, len(PIECES))
    return [
        align(encode_pair(BYTES, c, a, 128), encode_pair(PIECES, c, a, 128), *lengths)
        for c, a in pairs
    ]


def _rest(example, row: int, tokenizer) -> bytes:
    """The bytes from the token that answer position `row` predicts to the end."""
    pieces = token_bytes(tokenizer, len(tokenizer))
    positions = [j for j in range(1, len(example.input_ids)) if example.answer_mask[j]]
    return b"".join(pieces[i] for i in example.input_ids[positions[row] :])


def test_aligned_positions_predict_the_same_text_and_cover_every_piece_start():
    fewer = 0
    for e in _aligned():
        assert e.slm_rows and len(e.slm_rows) == len(e.llm_rows)
        for s, t in zip(e.slm_rows, e.llm_rows, strict=True):
            assert _rest(e.slm, s, BYTES) == _rest(e.llm, t, PIECES)
        # Every token the pieces tokenizer starts is also a byte boundary: all its answer
        # positions align (the bytes side has more, inside the pieces' tokens).
        starts = predicted_answer_starts(e.llm, byte_lengths(PIECES, len(PIECES)))
        assert len(e.llm_rows) == len(starts) <= sum(e.slm.answer_mask)
        fewer += len(starts) < sum(e.slm.answer_mask)
    assert fewer >= 4  # whole-word pieces
    # Inside a token of the other side nothing aligns: " whale" is one piece, six bytes.
    e = _aligned([("Question: A", " whale")])[0]
    assert e.llm_rows == [0] and e.slm_rows == [0]


def test_collated_rows_index_each_examples_answer_logits():
    examples = _aligned()
    b = collate_aligned(examples, (BYTES.pad_token_id, PIECES.pad_token_id))
    predicted = [sum(e.slm.answer_mask[1:]) for e in examples]
    first = sum(predicted[:1])
    assert b.slm_rows[: len(examples[0].slm_rows)].tolist() == examples[0].slm_rows
    assert b.slm_rows[len(examples[0].slm_rows)] == first + examples[1].slm_rows[0]
    assert int(b.slm_rows.max()) < sum(predicted)
    assert b.slm.answer_mask[:, 1:].sum() == sum(predicted)


def test_uld_is_the_l1_distance_of_sorted_probabilities():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 7), torch.randn(3, 11)
    p = torch.softmax(student, -1).sort(-1, descending=True).values
    q = torch.softmax(teacher, -1).sort(-1, descending=True).values
    expected = (F.pad(p, (0, 4)) - q).abs().sum(-1).mean()
    assert uld_loss(student, teacher).item() == pytest.approx(expected.item(), 1e-6)
    # It ignores which token is which: a permuted teacher is at distance 0.
    same = torch.randn(2, 9)
    assert uld_loss(same, same[:, torch.randperm(9)]).item() == pytest.approx(0.0, abs=1e-6)


def test_the_mapped_kl_with_the_identity_map_is_the_kl_of_one_vocabulary():
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    identity = torch.arange(10)
    for direction in ("forward", "reverse", "symmetric"):
        assert mapped_kd_loss(student, teacher, identity, 2.0, direction).item() == pytest.approx(
            kd_loss(student, teacher, 2.0, direction).item(), 1e-5
        )
    # A map that sends several teacher tokens to one student token and reaches only some
    # student tokens: the KL over its support equals the KL written out over the whole
    # student vocabulary, with FLOOR where no teacher token lands.
    many_to_one = torch.tensor([0, 0, 3, 3, 3, 5, 5, 7, 8, 8])
    carried = carried_over(torch.softmax(teacher / 2.0, -1), many_to_one, 10)
    log_q = torch.log_softmax(student / 2.0, -1)
    q, log_p = log_q.exp(), carried.clamp_min(FLOOR).log()
    dense = {
        "forward": (torch.xlogy(carried, carried) - carried * log_q).sum(-1).mean() * 4,
        "reverse": (q * (log_q - log_p)).sum(-1).mean() * 4,
    }
    dense["symmetric"] = (dense["forward"] + dense["reverse"]) / 2
    for direction, expected in dense.items():
        got = mapped_kd_loss(student, teacher, many_to_one, 2.0, direction)
        assert got.item() == pytest.approx(expected.item(), rel=1e-4), direction
    # Carrying over keeps the teacher's mass, however many tokens land on one.
    probs = torch.softmax(torch.randn(4, 10), -1)
    carried = carried_over(probs, torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 5]), 6)
    assert torch.allclose(carried.sum(-1), torch.ones(4))
    assert carried[:, 3].eq(0).all() and carried[:, 0].allclose(probs[:, :2].sum(-1))


def _brute_nearest(query: bytes, choices: list[bytes]) -> int:
    def distance(a: bytes, b: bytes) -> int:
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
        return row[-1]

    return min(distance(query, c) for c in choices)


def test_vocabulary_map_matches_bytes_exactly_else_by_least_edit_distance(tmp_path):
    pieces, raw = token_bytes(PIECES, len(PIECES)), token_bytes(BYTES, len(BYTES))
    m = vocabulary_map(PIECES, BYTES, len(PIECES), len(BYTES), cache=tmp_path)
    assert m.llm_to_slm.shape == (len(PIECES),) and m.slm_to_llm.shape == (len(BYTES),)
    # Every byte is a piece (byte fallback): all 256 byte tokens match exactly.
    assert m.exact_slm == 256 and all(pieces[m.slm_to_llm[i]] == raw[i] for i in range(256))
    assert m.slm_to_llm[BYTES.eos_token_id] == PIECES.eos_token_id
    for i, b in enumerate(pieces):
        if not b:
            assert m.llm_to_slm[i] == BYTES.eos_token_id  # special tokens: end of text
            continue
        nearest = raw[m.llm_to_slm[i]]
        assert _brute_nearest(b, [c for c in raw if c]) == _brute_nearest(b, [nearest]), b
    # Built once: the second call reads the cached file.
    (saved,) = tmp_path.glob("*.safetensors")
    again = vocabulary_map(PIECES, BYTES, len(PIECES), len(BYTES), cache=tmp_path)
    assert torch.equal(again.llm_to_slm, m.llm_to_slm) and list(tmp_path.iterdir()) == [saved]


@pytest.mark.parametrize("distance", ["map", "uld"])
def test_both_directions_give_the_student_gradient_and_the_teacher_none(distance, tmp_path):
    llm, slm = _tiny(PIECES, 48, 1), _tiny(BYTES, 32, 0)
    cfg = DistillConfig(cross_tokenizer=distance, kd_direction="symmetric")
    vocab = vocabulary_map(PIECES, BYTES, len(PIECES), len(BYTES), cache=tmp_path)
    run = MutualDistillation(llm, slm, cfg, OptimConfig(), vocab)
    examples = _aligned()
    for start in range(0, len(examples), 2):  # every batch of the hard texts
        b = collate_aligned(examples[start : start + 2], (BYTES.pad_token_id, PIECES.pad_token_id))
        for role, student, teacher in (("slm", slm, llm), ("llm", llm, slm)):
            other = "llm" if role == "slm" else "slm"
            student.zero_grad()
            teacher.zero_grad()
            logits, _ = answer_logits(student, getattr(b, role))
            taught = teacher_logits(teacher, getattr(b, other))
            rows, teacher_rows = getattr(b, f"{role}_rows"), getattr(b, f"{other}_rows")
            loss = run.distance[role](logits[rows], taught[teacher_rows]).mean()
            assert torch.isfinite(loss) and loss.item() > 0, (role, start)
            loss.backward()
            grads = [p.grad for n, p in student.named_parameters() if p.requires_grad]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(g.abs().sum().item() for g in grads) > 0
            assert all(p.grad is None for p in teacher.parameters())


def test_a_cross_family_distillation_runs_and_learns(tmp_path):
    llm, slm = _tiny(PIECES, 48, 1), _tiny(BYTES, 32, 0)
    cfg = DistillConfig(kd_steps=12, batch_size=4, slm_lr=1e-2, llm_lr=1e-2)
    vocab = vocabulary_map(PIECES, BYTES, len(PIECES), len(BYTES), cache=tmp_path)
    losses = MutualDistillation(llm, slm, cfg, OptimConfig(), vocab).run(
        _aligned(), (BYTES.pad_token_id, PIECES.pad_token_id), seed=0
    )
    assert all(torch.isfinite(torch.tensor(v)).all() for v in vars(losses).values())
    assert losses.slm_kd[-1] < losses.slm_kd[0] and losses.llm_kd[-1] < losses.llm_kd[0]


def test_the_server_takes_todays_path_when_the_tokenizers_are_one(data_dir):
    overrides = ["data.train_limit=40"]
    same = CoTuningServer.from_config(
        load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    )
    assert same.pad_id == same.tokenizer.pad_token_id
    assert not isinstance(same.aux_data[0], AlignedExample)
    student, teacher = torch.randn(3, 40), torch.randn(3, 40)
    assert torch.equal(
        same.distillation.distance["slm"](student, teacher).mean(), kd_loss(student, teacher)
    )
    overrides.append('llm.tiny.tokenizer="pieces"')
    cross = CoTuningServer.from_config(
        load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    )
    assert cross.pad_id == (BYTES.pad_token_id, PIECES.pad_token_id)
    assert all(isinstance(e, AlignedExample) and e.slm_rows for e in cross.aux_data)
    # Who knows D_a better: each model's own tokens' loss (the SLM's is the same model and
    # data either way; the LLM's differs with its tokenizer).
    same_losses, cross_losses = same.aux_losses(), cross.aux_losses()
    assert same_losses["slm_aux_loss"] == pytest.approx(cross_losses["slm_aux_loss"])
    assert same_losses["llm_aux_loss"] != pytest.approx(cross_losses["llm_aux_loss"])
    questions, split = training_split(cross.config)
    aux = [questions[i] for i in split.aux]
    expected = target_losses(cross.llm, PIECES, aux, max_length=cross.config.data.max_length)
    assert cross_losses["llm_aux_loss"] == pytest.approx(sum(expected) / len(expected))


def test_a_cross_family_tiny_run_completes_and_scores_both_models(tmp_path, data_dir):
    """In the in-process reference (what the Flower run gives, bit for bit): Flower adds
    nothing across families, the server alone sees both tokenizers."""
    overrides = ['llm.tiny.tokenizer="pieces"', "rounds=1", "data.train_limit=80", "eval.limit=8"]
    config = load_config(TINY, data_dir=str(data_dir), overrides=overrides)
    server = CoTuningServer.from_config(config)
    (result,) = reference_rounds(config, server)
    scores = server.evaluate(evaluation_questions(config))
    assert all(0 <= scores[role].mean("acc") <= 1 for role in ("llm", "slm"))
    kd = [v for k, v in result.losses.items() if k.endswith("_kd")]
    assert len(kd) == 2 and all(0 < v < float("inf") for v in kd), result.losses
