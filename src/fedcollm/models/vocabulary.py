"""Two tokenizers' vocabularies side by side: each token's bytes, and a map between them.

A token's bytes are the text it stands for, whatever the family writes for a word boundary
(GPT-2's byte alphabet with "Ġ", SentencePiece's "▁" and <0xNN> byte pieces); special tokens
stand for no text. The `VocabularyMap` sends every token of one vocabulary to a token of
the other: the token with the same bytes where there is one, else the nearest by edit
distance over bytes (FedMKT's idea); special tokens go to the other side's end of text.

The nearest search groups tokens by byte length: Levenshtein distance is at least the
difference of two lengths, so for the queries of one length it compares against the other
vocabulary's length groups in order of that difference and stops at the first group that
cannot beat every query's best so far. Each comparison of a query group with a length group
is one `rapidfuzz.process.cdist` (C++, both cores). A map is built once per pair and cached
under the model cache, keyed by both vocabularies.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedcollm.config import ConfigError, DistillConfig
from fedcollm.models.registry import cache_dir

MAP_VERSION = 1  # bump when the way maps are built changes: older cached maps are ignored
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (printable bytes stand for
    themselves, the others are shifted above 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, shifted = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _byte_level(tokenizer) -> bool:
    """Whether the tokenizer writes bytes in GPT-2's alphabet (GPT-2, Llama 3, Qwen, SmolLM)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return decoder is not None and b"ByteLevel" in decoder.__getstate__()


def token_bytes(tokenizer, size: int) -> list[bytes]:
    """The bytes each of the ids 0..size-1 stands for (size: the model's logits width, which
    may exceed the tokenizer's); b"" for special tokens and ids with no token."""
    alphabet = _byte_alphabet() if _byte_level(tokenizer) else None
    special = set(tokenizer.all_special_ids)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(b"")
        elif i in added:
            out.append(added[i].content.encode())
        elif alphabet is not None and all(c in alphabet for c in piece):
            out.append(bytes(alphabet[c] for c in piece))
        elif match := _BYTE_PIECE.match(piece):
            out.append(bytes([int(match.group(1), 16)]))
        else:
            out.append(piece.replace("▁", " ").encode())
    return out + [b""] * (size - len(out))


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers are one: the same tokens with the same ids."""
    return a is b or a.get_vocab() == b.get_vocab()


def logits_width(model: torch.nn.Module) -> int:
    """The number of next-token logits a model gives (its vocabulary, perhaps padded)."""
    return model.get_output_embeddings().weight.shape[0]


def check_cross_family(cfg: DistillConfig) -> None:
    """What a pair of different tokenizers rules out in the distillation settings."""
    if cfg.top_k:
        raise ConfigError(
            "distill.top_k keeps the teacher's best tokens of one vocabulary; the LLM's and "
            "the SLM's tokenizers differ, so set distill.top_k = 0"
        )


def byte_lengths(tokenizer, size: int) -> torch.Tensor:
    """(size,) the byte length of each token, 0 for special tokens."""
    return torch.tensor([len(b) for b in token_bytes(tokenizer, size)], dtype=torch.long)


@dataclass
class VocabularyMap:
    """llm_to_slm[i]: the SLM token closest to LLM token i; slm_to_llm the other way.
    `exact_*`: how many tokens of each side have a token with the same bytes."""

    llm_to_slm: torch.Tensor
    slm_to_llm: torch.Tensor
    exact_llm: int
    exact_slm: int


def _nearest(queries: list[bytes], choices: list[bytes]) -> np.ndarray:
    """For each query, the index of a choice at the least Levenshtein distance over bytes
    (ties: the closest length first, then the lowest index)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    as_text = [c.decode("latin-1") for c in choices]  # one character per byte
    by_length: dict[int, list[int]] = defaultdict(list)
    for j, c in enumerate(as_text):
        by_length[len(c)].append(j)
    lengths = sorted(by_length)
    found = np.zeros(len(queries), dtype=np.int64)
    query_groups: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        query_groups[len(q)].append(i)
    for n, members in query_groups.items():
        for start in range(0, len(members), 4096):  # bounds the distance matrix's memory
            chunk = members[start : start + 4096]
            texts = [queries[i].decode("latin-1") for i in chunk]
            best = np.full(len(chunk), np.iinfo(np.int32).max, dtype=np.int64)
            for m in sorted(lengths, key=lambda m: (abs(m - n), m)):
                if abs(m - n) >= best.max():
                    break  # no group further away can be closer for any query of this chunk
                ids = by_length[m]
                d = cdist(
                    texts,
                    [as_text[j] for j in ids],
                    scorer=Levenshtein.distance,
                    dtype=np.int32,
                    workers=-1,
                )
                arg = d.argmin(axis=1)
                closer = d[np.arange(len(chunk)), arg] < best
                best[closer] = d[np.arange(len(chunk)), arg][closer]
                found[np.asarray(chunk)[closer]] = np.asarray(ids)[arg[closer]]
    return found


def _one_way(source: list[bytes], target: list[bytes], target_end: int) -> tuple[torch.Tensor, int]:
    """Each source token's closest target token; the number that matched exactly."""
    exact: dict[bytes, int] = {}
    for j, b in enumerate(target):
        if b:
            exact.setdefault(b, j)
    mapping = np.full(len(source), target_end, dtype=np.int64)
    rest = []
    for i, b in enumerate(source):
        if not b:
            continue  # special tokens and empty ids: the other side's end of text
        if b in exact:
            mapping[i] = exact[b]
        else:
            rest.append(i)
    matched = sum(1 for b in source if b) - len(rest)
    if rest:
        choices = sorted(exact.values())
        nearest = _nearest([source[i] for i in rest], [target[j] for j in choices])
        mapping[rest] = np.asarray(choices)[nearest]
    return torch.from_numpy(mapping), matched


def _fingerprint(*vocabularies: list[bytes]) -> str:
    digest = hashlib.sha256(str(MAP_VERSION).encode())
    for vocabulary in vocabularies:
        digest.update(len(vocabulary).to_bytes(8, "little"))
        for b in vocabulary:
            digest.update(len(b).to_bytes(4, "little") + b)
    return digest.hexdigest()[:32]


def end_of_text(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id


def vocabulary_map(
    llm_tokenizer,
    slm_tokenizer,
    llm_size: int,
    slm_size: int,
    cache: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> VocabularyMap:
    """The map between the two vocabularies, built once per pair and cached (`cache`, else
    <model cache>/vocabulary_maps)."""
    llm_bytes, slm_bytes = (
        token_bytes(llm_tokenizer, llm_size),
        token_bytes(slm_tokenizer, slm_size),
    )
    path = (
        cache or cache_dir() / "vocabulary_maps"
    ) / f"{_fingerprint(llm_bytes, slm_bytes)}.safetensors"
    if path.is_file():
        saved = load_file(path)
        return VocabularyMap(
            saved["llm_to_slm"], saved["slm_to_llm"], int(saved["exact"][0]), int(saved["exact"][1])
        )
    progress(
        f"building the map between the vocabularies ({llm_size:,} and {slm_size:,} tokens), "
        f"once; it is kept in {path.parent}"
    )
    start = time.perf_counter()
    llm_to_slm, exact_llm = _one_way(llm_bytes, slm_bytes, end_of_text(slm_tokenizer))
    slm_to_llm, exact_slm = _one_way(slm_bytes, llm_bytes, end_of_text(llm_tokenizer))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(
        {
            "llm_to_slm": llm_to_slm,
            "slm_to_llm": slm_to_llm,
            "exact": torch.tensor([exact_llm, exact_slm]),
        },
        str(partial),
    )
    partial.replace(path)  # whole or not at all: a killed build leaves no half map
    progress(
        f"vocabulary map built in {time.perf_counter() - start:.0f} s: {exact_llm:,} tokens "
        "have the same bytes on both sides, the others map to the nearest by edit distance"
    )
    return VocabularyMap(llm_to_slm, slm_to_llm, exact_llm, exact_slm)
