"""What travels between server and clients: the SLM adapter theta as a Flower ArrayRecord.

Shared by the two Flower apps; the algorithm modules never see these types.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedcollm.config import Config, load_config
from fedcollm.models import DTYPES, Adapter


def adapter_to_record(adapter: Adapter, dtype: str = "float32") -> ArrayRecord:
    """theta in the wire dtype (ArrayRecord takes fp32 or fp16, not bf16)."""
    return ArrayRecord(
        OrderedDict((k, v.to(DTYPES[dtype]).contiguous()) for k, v in adapter.items())
    )


def record_to_adapter(record: ArrayRecord) -> Adapter:
    return {k: v.float() for k, v in record.to_torch_state_dict().items()}


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the serialised arrays (what dominates the message on the wire)."""
    return sum(len(array.data) for array in record.values())


def adapter_digest(adapter: Adapter) -> str:
    """A fingerprint of an adapter's values (fp32), to trace which theta went where."""
    digest = hashlib.sha256()
    for key in sorted(adapter):
        digest.update(key.encode())
        digest.update(adapter[key].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The experiment config named by Flower's run config (`[tool.flwr.app.config]`)."""
    overrides = [s for s in str(run_config.get("set", "")).split(";") if s.strip()]
    return load_config(
        run_config["config"], overrides=overrides, data_dir=run_config.get("data-dir") or None
    )


def torch_threads(config: Config) -> None:
    torch.set_num_threads(config.federation.client_cpus)
