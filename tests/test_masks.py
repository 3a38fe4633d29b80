"""SecAgg+ with ChaCha20 masks: the masks are the keystream under the whole secret, not a
Mersenne Twister under 32 bits of it, and the protocol still sums to the mean."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import types
from pathlib import Path

import flwr
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation import secaggplus_utils

from fedcollm.federation.masks import (
    CLIENT_MODULE,
    MASK_PURPOSE,
    SERVER_MODULE,
    chacha20_masks,
    replace_generator,
)

ROOT = Path(__file__).parents[1]


def _reference_stream(secret: bytes, words: int) -> np.ndarray:
    """ChaCha20 (RFC 7539 block function, counter 0, nonce 0) under SHA-256 of the secret,
    written out here independently of the code under test."""
    key = hashlib.sha256(MASK_PURPOSE + b"\x00" + secret).digest()
    cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(cipher.update(bytes(8 * words)), dtype="<u8")


def test_the_masks_are_the_chacha20_stream_and_not_the_mersenne_twister():
    secret = bytes(range(32))
    shapes = [(4,), (2, 3), ()]
    masks = chacha20_masks(secret, 2**32, shapes)
    assert [m.shape for m in masks] == shapes and all(m.dtype == np.int64 for m in masks)
    flat = np.concatenate([m.ravel() for m in masks])
    expected = (_reference_stream(secret, 11) & np.uint64(2**32 - 1)).astype(np.int64)
    assert flat.tolist() == expected.tolist()
    # A known answer, so that a change of key derivation or stream shows up as a diff.
    assert flat[:2].tolist() == [3195545013, 1196999906]
    mersenne = secaggplus_utils.pseudo_rand_gen(secret, 2**32, shapes)
    assert np.concatenate([m.ravel() for m in mersenne]).tolist() != flat.tolist()
    # Two secrets that fold to the same 32-bit Mersenne seed (equal XOR of their words)
    # give Flower's generator the same masks; ChaCha20 keyed by the whole secret does not.
    twin = secret[4:8] + secret[:4] + secret[8:]
    assert _flower(secret) == _flower(twin)
    assert chacha20_masks(secret, 2**32, [(8,)])[0].tolist() != (
        chacha20_masks(twin, 2**32, [(8,)])[0].tolist()
    )


def _flower(secret: bytes) -> list[int]:
    return secaggplus_utils.pseudo_rand_gen(secret, 2**32, [(8,)])[0].tolist()


def test_the_masks_are_uniform_over_the_whole_modulus():
    values = chacha20_masks(b"k" * 44, 8, [(80_000,)])[0]
    counts = np.bincount(values, minlength=8)
    assert counts.size == 8 and counts.min() > 0  # 7 = modulus - 1 is drawn too
    chi2 = (((counts - 10_000) ** 2) / 10_000).sum()
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001
    with pytest.raises(ValueError, match="power of two"):
        chacha20_masks(b"k" * 32, 10, [(1,)])


def test_both_flower_modules_draw_their_masks_through_the_replaced_generator():
    """Fails loudly when Flower changes what is replaced: its version, the generator's
    signature, or a call site that stops going through the module's `pseudo_rand_gen`."""
    pinned = [
        line.split("==")[1].strip()
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line.startswith("flwr==")
    ]
    assert pinned == [flwr.__version__]
    for name, calls in ((CLIENT_MODULE, 2), (SERVER_MODULE, 2)):
        module = importlib.import_module(name)
        source = inspect.getsource(module)
        assert source.count("pseudo_rand_gen(") == calls, name
        assert "RandomState" not in source and "default_rng" not in source, name
        replace_generator(name)
        replace_generator(name)  # idempotent
        assert sys.modules[name].pseudo_rand_gen is chacha20_masks


def test_a_flower_without_the_generator_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "fake_secagg", types.ModuleType("fake_secagg"))
    with pytest.raises(RuntimeError, match="Flower's SecAgg\\+ changed"):
        replace_generator("fake_secagg")
    changed = types.ModuleType("fake_secagg")
    changed.pseudo_rand_gen = lambda seed, num_range: None
    monkeypatch.setitem(sys.modules, "fake_secagg", changed)
    with pytest.raises(RuntimeError, match="Flower's SecAgg\\+ changed"):
        replace_generator("fake_secagg")
