"""Causal LMs from a config: "tiny" (a random Llama built in code, with a byte-level
tokenizer that needs no download), a short name from the registry (`registry.py`), a local
directory saved with `save_pretrained`, or a hub id.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from fedcollm.config import ModelConfig
from fedcollm.errors import ModelError  # noqa: F401 - re-exported
from fedcollm.models.quantization import load_quantized, quantize_built
from fedcollm.models.registry import REGISTRY, RegistryError, ensure_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus an end-of-text token.

    Built in code, so tiny models need no files; it splits text exactly like GPT-2's
    pre-tokenizer, which keeps lm-eval's context/continuation split meaningful."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


# The words `piece_tokenizer` knows whole; every other word is cut into letters, and what
# is not printable ASCII into byte pieces.
PIECE_WORDS = (
    "the a an is are of and to in on for with what which who how why when where not this that "
    "Question Answer answer true false yes no fruit colour color taste sweet sour red green "
    "yellow blue water heat ice sun east west mammal whale four two one"
).split()


def piece_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE built in code: "▁" marks a word's start (and a dummy one
    goes before the first word), the words of PIECE_WORDS are one token each, other text is
    letters, and characters outside printable ASCII fall back to <0xNN> byte pieces. It
    splits text unlike `byte_tokenizer`: another family, for cross-family tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in ["▁", *map(chr, range(0x21, 0x7F))]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in PIECE_WORDS:
        piece = "▁"
        for c in word:  # one merge per letter: ▁ + w -> ▁w, ▁w + h -> ▁wh, ...
            if piece + c not in vocab:
                merges.append((piece, c))
                vocab[piece + c] = len(vocab)
            piece += c
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_tokenizer(spec: ModelConfig) -> PreTrainedTokenizerFast:
    return piece_tokenizer() if spec.tiny.tokenizer == "pieces" else byte_tokenizer()


def tiny_config(spec: ModelConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.tiny.hidden_size,
        intermediate_size=spec.tiny.intermediate_size,
        num_hidden_layers=spec.tiny.num_layers,
        num_attention_heads=spec.tiny.num_heads,
        num_key_value_heads=spec.tiny.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def tiny_llama(spec: ModelConfig, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama; the same seed gives the same weights on every node."""
    config = tiny_config(spec, vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(DTYPES[spec.dtype])


def resolve_device(name: str) -> torch.device:
    """The device a config's `device` names; "auto" takes a CUDA GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(
            f"device {name!r}: PyTorch sees no CUDA GPU here (torch {torch.__version__}); "
            'set llm.device / slm.device to "auto" or "cpu"'
        )
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def looks_like_path(name: str) -> bool:
    """A model name meant as a directory (a hub id is "org/name", which neither starts so
    nor exists here)."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def model_path(name: str) -> Path:
    """Where a model name points: a registry model's converted directory (fetched and
    converted on first use), else the name itself as a path (a hub id when none exists)."""
    if name in REGISTRY:
        try:
            return ensure_model(name)
        except RegistryError as err:
            raise ModelError(str(err)) from None
    return Path(name).expanduser()


def check_model_dir(directory: Path) -> None:
    """A model directory must hold what from_pretrained needs; say what is missing."""
    needs = {
        "config.json": ["config.json"],
        "weights (*.safetensors or pytorch_model*.bin)": ["*.safetensors", "pytorch_model*.bin"],
        "a tokenizer (tokenizer.json or tokenizer_config.json)": [
            "tokenizer.json",
            "tokenizer_config.json",
        ],
    }
    missing = [
        what
        for what, patterns in needs.items()
        if not any(any(directory.glob(p)) for p in patterns)
    ]
    if missing:
        raise ModelError(
            f"model directory {directory} lacks {' and '.join(missing)}; save the model and "
            "its tokenizer there with save_pretrained"
        )


def load_model(spec: ModelConfig, seed: int) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """The model and tokenizer a config names; raises ModelError with the fix on failure."""
    device = resolve_device(spec.device)
    if spec.name == "tiny":
        tokenizer = tiny_tokenizer(spec)
        model = tiny_llama(spec, len(tokenizer), seed)
        if spec.quantization != "none":
            return quantize_built(model, spec, device, DTYPES[spec.dtype]), tokenizer
        return model.to(device), tokenizer
    local = model_path(spec.name)
    if looks_like_path(spec.name) and not local.is_dir():
        raise ModelError(
            f"model directory {local} does not exist; give a directory saved with "
            'save_pretrained, a registry name (fedcollm models), "tiny" or a hub id'
        )
    source = str(local) if local.is_dir() else spec.name
    if local.is_dir():
        check_model_dir(local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local.is_dir())
        if spec.quantization != "none":
            model = load_quantized(spec, source, local.is_dir(), device, DTYPES[spec.dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=DTYPES[spec.dtype], local_files_only=local.is_dir()
            ).to(device)
    except (OSError, ValueError) as err:
        where = "the directory" if local.is_dir() else "the hub (is it reachable?)"
        raise ModelError(f"could not load model {spec.name!r} from {where}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def architecture(spec: ModelConfig) -> PretrainedConfig:
    """A model's architecture (its config.json), without loading weights; the registry
    model must have been fetched."""
    if spec.name == "tiny":
        return tiny_config(spec, len(tiny_tokenizer(spec)))
    local = model_path(spec.name)
    try:
        return AutoConfig.from_pretrained(str(local), local_files_only=local.is_dir())
    except (OSError, ValueError) as err:
        raise ModelError(f"could not read the config of model {spec.name!r}: {err}") from None
