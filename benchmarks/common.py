"""Pieces both throughput benchmarks share: the machine line, randomly initialised models
shaped like Qwen2.5 with our LoRA, fixed-length synthetic examples, a timer and options."""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fedcollm.config import LoraConfig
from fedcollm.data import Example
from fedcollm.models import add_lora

# Qwen2Config kwargs of the two published models (their config.json), weights left random.
_QWEN25 = dict(
    vocab_size=151936,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_theta=1e6,
    max_position_embeddings=32768,
)
SHAPES = {
    "qwen2.5-0.5b": dict(
        _QWEN25,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
    ),
    "qwen2.5-1.5b": dict(
        _QWEN25,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
    ),
}
# SmolLM2-135M (a Llama), the cross-family client of configs/demo_cross.toml.
LLAMA_SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads{gpu}"
    )


def random_model(
    shape: str, layers: int | None = None, dtype=torch.float32, device="cpu", seed: int = 0
):
    """A Qwen2.5- (or SmolLM2-) shaped model with random weights (`layers` of the real width
    when given), built directly in `dtype` on `device` and wrapped with our default LoRA."""
    kind, config = (
        (LlamaForCausalLM, LlamaConfig)
        if shape in LLAMA_SHAPES
        else (
            Qwen2ForCausalLM,
            Qwen2Config,
        )
    )
    kwargs = dict(LLAMA_SHAPES.get(shape) or SHAPES[shape])
    if layers:
        kwargs["num_hidden_layers"] = layers
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy first: the peak-memory figures stay honest
    try:
        with torch.random.fork_rng(), torch.device(device):
            torch.manual_seed(seed)
            model = kind(config(**kwargs))
    finally:
        torch.set_default_dtype(default)
    return add_lora(model, LoraConfig())


def synthetic_examples(
    n: int, prompt_len: int, answer_len: int, vocab: int, seed: int
) -> list[Example]:
    """n examples of exactly prompt_len + answer_len random tokens: batches need no padding."""
    rng = random.Random(seed)
    mask = [False] * prompt_len + [True] * answer_len
    return [Example([rng.randrange(vocab) for _ in mask], list(mask)) for _ in range(n)]


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds `fn` takes, the GPU's queue drained before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def add_workload_args(p: argparse.ArgumentParser, repeats: int, steps: int, steps_help: str):
    """The options both throughput benchmarks share: model depth, batch, dtype, device."""
    p.add_argument("--layers", type=int, default=2, help="decoder layers; 0: the full depth")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--answer-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", help="write the figures to this file")


def write_figures(args: argparse.Namespace, figures: dict) -> None:
    """With --json: the machine, the options (but --json) and the figures, to that file."""
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "setup": setup, **figures}, f, indent=2)
