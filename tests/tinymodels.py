"""Tiny models and batches built in code, shared by the tests."""

from __future__ import annotations

import torch

from fedcollm.config import Config, ModelConfig, TinyModel
from fedcollm.data import Example, Question, collate, encode_pair
from fedcollm.models import add_lora, byte_tokenizer, tiny_llama

TOKENIZER = byte_tokenizer()
PAD = TOKENIZER.pad_token_id

PAIRS = [
    ("Question: Which is a mammal?\nAnswer:", " a whale"),
    ("Question: What melts ice?\nAnswer:", " heat"),
    ("The sun rises in the", " east"),
    ("Question: 2 + 2 =\nAnswer:", " four"),
]


def tiny_config(**overrides) -> Config:
    config = Config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(hidden: int = 32, layers: int = 2, seed: int = 0):
    spec = ModelConfig(tiny=TinyModel(hidden, layers, 4, 2 * hidden))
    return tiny_llama(spec, len(TOKENIZER), seed)


def tiny_lora_model(hidden: int = 32, layers: int = 2, seed: int = 0, config: Config | None = None):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return add_lora(tiny_model(hidden, layers, seed), (config or Config()).lora)


def examples() -> list[Example]:
    return [encode_pair(TOKENIZER, context, answer, 128) for context, answer in PAIRS]


def batch():
    return collate(examples(), PAD)


def nudge_lora_b(model, scale: float = 0.05, seed: int = 1) -> None:
    """LoRA starts with B = 0 (no effect); give B values so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def mc(id: str, context: str, choices: tuple[str, ...], gold: int) -> Question:
    """A multiple-choice question, as a task file would give it."""
    return Question(id, context, choices, gold, choices[gold])
