"""Models, adapters and multiple-choice scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel
from tinymodels import PAD, TOKENIZER, batch, mc, nudge_lora_b, tiny_lora_model, tiny_model

from fedcollm.algorithm.training import answer_logits
from fedcollm.config import Config, LoraConfig, ModelConfig
from fedcollm.data import DataError, encode_continuations, encode_pair
from fedcollm.evaluation import accuracy, choice_loglikelihoods
from fedcollm.evaluation.multiple_choice import _score_packed
from fedcollm.models import (
    ModelError,
    add_lora,
    eval_mode,
    get_adapter,
    load_model,
    save_adapter,
    set_adapter,
    target_modules,
)

V = len(TOKENIZER)
TINY_ARCHITECTURES = {
    "llama": transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "qwen2": transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "gpt2": transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4),
    "opt": transformers.OPTConfig(
        vocab_size=V,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        word_embed_proj_dim=32,
    ),
    "gemma": transformers.GemmaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
    ),
}


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_default_lora_targets_and_answer_logits_for_each_architecture(arch):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TINY_ARCHITECTURES[arch]).eval()
    peft_model = add_lora(model, LoraConfig())
    assert get_adapter(peft_model), f"no LoRA modules found for {arch}"
    b = batch()
    logits, targets = answer_logits(peft_model, b)
    full = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.allclose(logits, full[:, :-1][b.answer_mask[:, 1:]], atol=1e-5)
    assert torch.equal(targets, b.input_ids[:, 1:][b.answer_mask[:, 1:]])


def test_default_adapter_of_gpt2_small_has_the_papers_size():
    # GPT-2-Small with LoRA r=8 on c_attn: 0.29M parameters, as in the paper's Table 2.
    config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    lora_model = add_lora(model, LoraConfig())
    lora_params = sum(p.numel() for n, p in lora_model.named_parameters() if "lora_" in n)
    assert lora_params == 294_912


def test_unknown_architecture_asks_for_target_modules():
    model = tiny_model()
    model.config.model_type = "mystery"
    with pytest.raises(ModelError, match="set lora.target_modules"):
        target_modules(model, LoraConfig())
    assert target_modules(model, LoraConfig(target_modules=["q_proj"])) == ["q_proj"]


def test_adapter_round_trip_and_peft_format(tmp_path):
    model = tiny_lora_model(seed=0)
    nudge_lora_b(model)
    adapter = get_adapter(model)
    other = tiny_lora_model(seed=0)
    assert any(not torch.equal(adapter[k], v) for k, v in get_adapter(other).items())
    set_adapter(other, adapter)
    assert all(torch.equal(adapter[k], v) for k, v in get_adapter(other).items())

    save_adapter(model, tmp_path / "slm")
    loaded = PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "slm").eval()
    b = batch()
    expected = model.eval()(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    got = loaded(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.allclose(expected, got, atol=1e-6)


QUESTIONS = [
    mc(
        "q1",
        "Question: Which is a mammal?\nAnswer:",
        ("a whale", "a trout", "an ant"),
        0,
    ),
    mc("q2", "The sun rises in the", ("east", "west"), 1),
    mc("q3", "Question: Pick\nAnswer:", ("x", "yyyyyyyy", "zz", "w"), 2),
]


def _naive_loglikelihood(model, context, continuation):
    """One unbatched full forward per choice, the slow obvious way."""
    ctx = TOKENIZER.encode(context, add_special_tokens=False)
    whole = TOKENIZER.encode(context + continuation, add_special_tokens=False)
    logprobs = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


# Same prompt length and choice count as q3.
SAME_LENGTH = mc("q4", "Question: Pack\nAnswer:", ("a", "bbbb", "cc", "ddddddd"), 3)
# Four choices too, and a much longer prompt: padding must not change its scores.
LONGER = mc(
    "q5",
    "Question: Which of these is the longest word here?\nAnswer:",
    ("x", "yy", "zzzzzz", "w"),
    2,
)


def _other_architecture(name: str) -> torch.nn.Module:
    """Tiny GPT-2 or Qwen2: the packed prompt-and-choices mask must hold beyond Llama."""
    torch.manual_seed(3)
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(TOKENIZER), n_embd=32, n_layer=2, n_head=2)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.Qwen2Config(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.Qwen2ForCausalLM(config)


@pytest.mark.parametrize(
    "architecture, batch_size",
    [("llama", 1), ("llama", 3), ("gpt2", 3), ("qwen2", 3), ("qwen2-eager", 3)],
)
def test_batched_loglikelihoods_equal_one_forward_per_choice(architecture, batch_size):
    if architecture == "llama":
        model = tiny_model(seed=3).eval()
    else:
        model = _other_architecture(architecture.removesuffix("-eager")).eval()
        if architecture.endswith("-eager"):
            model.config._attn_implementation = "eager"
    questions = [*QUESTIONS, SAME_LENGTH, LONGER]
    lls = choice_loglikelihoods(model, TOKENIZER, questions, batch_size=batch_size)
    for q, scores in zip(questions, lls, strict=True):
        naive = [_naive_loglikelihood(model, q.context, " " + c) for c in q.choices]
        assert scores == pytest.approx(naive, abs=1e-4)


def test_single_token_choices_are_read_off_the_context_alone():
    # CommonsenseQA's choices are single letters: the batch is contexts only, padding mask.
    model = tiny_model(seed=3).eval()
    contexts = [[5, 9, 33, 70], [12, 40], [7, 7, 81, 90, 100, 3]]
    choices = [[[65], [66], [67]], [[65], [66]], [[65], [66], [67], [68], [69]]]
    with torch.inference_mode():
        scores = _score_packed(model, list(zip(contexts, choices, strict=True)), pad_id=PAD)
        for context, options, got in zip(contexts, choices, scores, strict=True):
            last = F.log_softmax(model(torch.tensor([context])).logits[0, -1], -1)
            assert got == pytest.approx([last[c].item() for (c,) in options], abs=1e-5)


def test_acc_and_acc_norm_follow_lm_eval():
    # acc: argmax of summed log-likelihood; acc_norm: divided by the choice's characters.
    lls = [[-3.0, -2.0, -5.0], [-1.0, -4.0], [-9.0, -10.0, -8.5, -9.5]]
    result = accuracy(QUESTIONS, lls)
    assert result.predictions == [1, 0, 2]
    # q1: -3/7 > -2/7? no: -0.43 vs -0.29 vs -0.83 -> 1; q3: -9/1, -10/8, -8.5/2, -9.5/1 -> 1
    assert result.predictions_norm == [1, 0, 1]
    assert result.acc == pytest.approx(1 / 3)
    assert result.acc_norm == pytest.approx(0.0)
    assert result.n == 3


def test_evaluation_runs_in_eval_mode_and_leaves_the_mode_as_it_was():
    # With LoRA dropout on, a train-mode forward is random; scoring must not be.
    model = tiny_lora_model(seed=3, config=Config(lora=LoraConfig(dropout=0.5)))
    nudge_lora_b(model)
    model.train()
    first = choice_loglikelihoods(model, TOKENIZER, QUESTIONS)
    assert model.training
    assert choice_loglikelihoods(model, TOKENIZER, QUESTIONS) == first
    with eval_mode(model):
        expected = [
            [_naive_loglikelihood(model, q.context, " " + c) for c in q.choices] for q in QUESTIONS
        ]
    assert first == [pytest.approx(e, abs=1e-4) for e in expected]
    # The mode comes back even when the block raises.
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("out of memory")
    assert model.training


def test_a_model_directory_without_weights_or_tokenizer_names_what_is_missing(tmp_path):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="lacks weights .* and a tokenizer"):
        load_model(ModelConfig(name=str(tmp_path)), seed=0)
    model.save_pretrained(tmp_path)
    TOKENIZER.save_pretrained(tmp_path)
    loaded, _ = load_model(ModelConfig(name=str(tmp_path)), seed=0)
    assert loaded.config.hidden_size == model.config.hidden_size


def test_a_partial_adapter_is_refused_not_half_loaded():
    model = tiny_lora_model(seed=0)
    nudge_lora_b(model)
    partial = get_adapter(tiny_lora_model(seed=0))
    dropped = next(k for k in partial if "lora_B" in k)
    del partial[dropped]
    before = get_adapter(model)
    with pytest.raises(ModelError, match="lacks 1 LoRA tensors"):
        set_adapter(model, partial)
    with pytest.raises(ModelError, match="does not have"):
        set_adapter(model, {**get_adapter(model), "x.lora_A.weight": torch.zeros(1)})
    assert before[dropped].abs().sum() > 0  # the stale tensor the refusal protects against


def _lm_eval_loglikelihood(model, tokenizer, context, continuation, max_length):
    """lm-eval's HFLM.loglikelihood for one pair, written out from its source (0.4.13):
    encode with the tokenizer's special tokens, an empty context becomes BOS (else EOS), the
    pair is cut to its last max_length + 1 tokens and the last one is not fed."""
    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        ctx = [prefix]
    else:
        ctx = tokenizer.encode(context)
        cont = tokenizer.encode(context + continuation)[len(ctx) :]
    fed = (ctx + cont)[-(max_length + 1) :][:-1]
    logprobs = F.log_softmax(model(torch.tensor([fed])).logits[0].float(), -1)
    start = len(fed) - len(cont) + 1  # the position that predicts cont[0] is start - 1
    return sum(logprobs[start - 1 + i, t].item() for i, t in enumerate(cont))


# Prompts longer than the evaluation length, with choices of very different lengths: lm-eval
# keeps less of the prompt before a long choice than before a short one.
LONG_PROMPTS = [
    mc(
        "l1",
        "Question: " + "why is the sky so very blue " * 3 + "\nAnswer:",
        ("x", "a much longer answer", "mid"),
        0,
    ),
    mc(
        "l2",
        "Q: " + "count the stones " * 4 + "\nA:",
        ("one", "two stones here"),
        1,
    ),
    mc("e1", "", ("an empty prompt", "is read as EOS"), 0),
]


@pytest.mark.parametrize("max_length", [24, 40, 0])
def test_long_and_empty_prompts_are_scored_as_lm_eval_scores_them(max_length):
    model = tiny_model(seed=3).eval()
    questions = [*LONG_PROMPTS, *QUESTIONS]
    lls = choice_loglikelihoods(model, TOKENIZER, questions, batch_size=2, max_length=max_length)
    length = max_length or model.config.max_position_embeddings  # lm-eval's default
    for q, scores in zip(questions, lls, strict=True):
        expected = [
            _lm_eval_loglikelihood(model, TOKENIZER, q.context, " " + c, length) for c in q.choices
        ]
        assert scores == pytest.approx(expected, abs=1e-4), q.id


def _bos_tokenizer():
    """The byte tokenizer with a BOS that it adds by itself, as Llama's and Gemma's do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = TOKENIZER.backend_tokenizer.__class__.from_str(TOKENIZER.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def test_a_tokenizer_that_adds_bos_gets_it_in_scoring_and_training():
    tokenizer = _bos_tokenizer()
    bos = tokenizer.bos_token_id
    ((context, continuation),) = encode_continuations(tokenizer, "Question: x\nAnswer:", [" y"])
    assert context[0] == bos and context.count(bos) == 1 and bos not in continuation
    assert tokenizer.decode(continuation) == " y"
    # A prompt that already opens with BOS text gets no second one; an empty one is BOS.
    ((context, _),) = encode_continuations(tokenizer, "<s>Question", [" y"])
    assert context.count(bos) == 1
    assert encode_continuations(tokenizer, "", [" y"]) == [([bos], tokenizer.encode(" y")[1:])]
    example = encode_pair(tokenizer, "Question: x\nAnswer:", " y", 64)
    assert example.input_ids[0] == bos
    model = tiny_model(seed=3).eval()
    model.resize_token_embeddings(len(tokenizer))
    (scores,) = choice_loglikelihoods(model, tokenizer, [QUESTIONS[0]])
    expected = [
        _lm_eval_loglikelihood(model, tokenizer, QUESTIONS[0].context, " " + c, 1024)
        for c in QUESTIONS[0].choices
    ]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_a_choice_longer_than_the_evaluation_length_is_refused():
    question = mc("q", "Question: x\nAnswer:", ("short", "a" * 30), 0)
    with pytest.raises(DataError, match=r"question q: choice 2 has 31 tokens, more than .* 24"):
        choice_loglikelihoods(tiny_model(seed=3).eval(), TOKENIZER, [question], max_length=24)
