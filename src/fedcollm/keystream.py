"""Randomness that must be unpredictable: ChaCha20 keystreams (from `cryptography`).

Secure aggregation's masks and differential privacy's noise are only as good as their
generator: a Mersenne Twister seeded with 32 bits (what Flower's SecAgg+ uses, flwr#7522)
can be guessed from 2**32 tries. Here every draw is a ChaCha20 keystream under a 256-bit key,
so predicting it means breaking ChaCha20.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
# Counter 0, nonce 0: every key here is fresh (a new secret per round and party) and used for
# one stream only, so a fixed nonce never repeats a (key, nonce) pair.
_NONCE = bytes(16)


def stream_key(secret: bytes, purpose: bytes) -> bytes:
    """A 256-bit ChaCha20 key from a secret of any length (all of its bits count), bound to
    what the stream is for, so two uses of one secret never share a stream."""
    return hashlib.sha256(purpose + b"\x00" + secret).digest()


def keystream(key: bytes, nbytes: int) -> bytes:
    """The first `nbytes` bytes of ChaCha20's keystream under `key` (32 bytes)."""
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


def random_words(key: bytes, count: int) -> np.ndarray:
    """`count` uniform 64-bit words of the stream, little-endian."""
    return np.frombuffer(keystream(key, 8 * count), dtype="<u8")


def uniform_integers(key: bytes, modulus: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Integers uniform on [0, modulus) for a power-of-two modulus (exactly uniform: the low
    bits of uniform words), one array per shape, consumed from one stream in order."""
    if modulus < 2 or modulus & (modulus - 1) or modulus > 2**62:
        raise ValueError(f"modulus must be a power of two in [2, 2**62], got {modulus}")
    sizes = [math.prod(shape) for shape in shapes]
    words = random_words(key, sum(sizes)) & np.uint64(modulus - 1)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(words[start : start + size].astype(np.int64).reshape(shape))
        start += size
    return out


def standard_normal(key: bytes, count: int) -> np.ndarray:
    """`count` standard normal draws (float64) by Box-Muller from the stream's words."""
    pairs = (count + 1) // 2
    words = random_words(key, 2 * pairs) >> np.uint64(11)  # 53 random bits each
    u1 = (words[:pairs].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log is finite
    u2 = words[pairs:].astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


def fresh_secret() -> bytes:
    """256 bits from the operating system's CSPRNG."""
    return os.urandom(KEY_BYTES)
