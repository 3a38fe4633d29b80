"""Cryptographic masks for Flower's SecAgg+: one function of Flower's replaced, nothing else.

Flower's SecAgg+ (flwr 1.41) is sound in its protocol: ECDH key agreement, HKDF-SHA256,
Fernet-encrypted shares, Shamir sharing from pycryptodome. Its weak point is the mask
generator, `secaggplus_utils.pseudo_rand_gen`: it folds a 256-bit secret into a 32-bit seed
(XOR of its words) for NumPy's Mersenne Twister, so 2**32 guesses unmask a client
(flwr#7522), and its draws fall on [0, modulus - 1), not on the whole modulus. We replace it,
in the two modules that call it (the client's mod masking, the server's workflow unmasking
dropped clients' pairwise masks and active clients' own masks), by a ChaCha20 keystream
under SHA-256 of the whole secret, exactly uniform on the power-of-two modulus. Both sides
must use the same generator or the masks do not cancel: every party runs fedcollm.

`replace_generator` refuses, loudly, a Flower whose module no longer has the generator in the
form replaced here; tests/test_masks.py fails too if a call site stops going through it.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np

from fedcollm.keystream import stream_key, uniform_integers

MASK_PURPOSE = b"fedcollm secagg+ mask"
CLIENT_MODULE = "flwr.client.mod.secure_aggregation.secaggplus_mod"
SERVER_MODULE = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
_SIGNATURE = ["seed", "num_range", "dimensions_list"]


def chacha20_masks(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Flower's `pseudo_rand_gen` contract: one int64 array per shape, uniform on
    [0, num_range), from the secret `seed` (a 32-byte random seed or a 44-byte shared key)."""
    return uniform_integers(stream_key(seed, MASK_PURPOSE), num_range, list(dimensions_list))


def replace_generator(module_name: str) -> None:
    """Point one Flower SecAgg+ module's mask generator at `chacha20_masks` (idempotent)."""
    module = importlib.import_module(module_name)
    current = getattr(module, "pseudo_rand_gen", None)
    if current is chacha20_masks:
        return
    if current is None or list(inspect.signature(current).parameters) != _SIGNATURE:
        raise RuntimeError(
            f"{module_name} no longer has pseudo_rand_gen(seed, num_range, dimensions_list): "
            "Flower's SecAgg+ changed, and fedcollm's cryptographic masks would not be used; "
            "install the flwr version in requirements.lock"
        )
    module.pseudo_rand_gen = chacha20_masks
