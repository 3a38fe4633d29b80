"""What travels between server and clients: the SLM adapter theta as a Flower ArrayRecord
(or, under SecAgg+, as the legacy Parameters its workflow masks).

Shared by the two Flower apps; the algorithm modules never see these types.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays

from fedcollm.config import Config, load_config
from fedcollm.models import DTYPES, Adapter


class WireError(ValueError):
    """Arrays that do not read as the adapter they should carry."""


def adapter_to_record(adapter: Adapter, dtype: str = "float32") -> ArrayRecord:
    """theta in the wire dtype (ArrayRecord takes fp32 or fp16, not bf16)."""
    return ArrayRecord(
        OrderedDict((k, v.to(DTYPES[dtype]).contiguous()) for k, v in adapter.items())
    )


def record_to_adapter(record: ArrayRecord) -> Adapter:
    return {k: v.float() for k, v in record.to_torch_state_dict().items()}


def parameters_from_adapter(adapter: Adapter) -> Parameters:
    """The adapter as legacy Parameters: its tensors in key order, fp32 (SecAgg+ quantises
    from float; fp16 would overflow there)."""
    return ndarrays_to_parameters([v.float().numpy() for v in adapter.values()])


def adapter_from_parameters(parameters: Parameters, reference: Adapter) -> Adapter:
    """Legacy Parameters back into an adapter with `reference`'s keys and shapes, in fp32."""
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(reference):
        raise WireError(f"{len(arrays)} arrays, expected {len(reference)}")
    adapter = {}
    for (key, ref), array in zip(reference.items(), arrays, strict=True):
        if array.size != ref.numel():
            raise WireError(f"{key}: shape {array.shape}, expected {tuple(ref.shape)}")
        adapter[key] = torch.from_numpy(np.asarray(array, dtype=np.float32)).reshape(ref.shape)
    return adapter


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the serialised arrays (what dominates the message on the wire)."""
    return sum(len(array.data) for array in record.values())


def config_from_run_config(run_config: dict[str, Any], data_dir: str | None = None) -> Config:
    """The experiment config named by Flower's run config (`[tool.flwr.app.config]`);
    `data_dir`, when given, is where this node keeps its data (its node config)."""
    overrides = [s for s in str(run_config.get("set", "")).split(";") if s.strip()]
    data_dir = data_dir or run_config.get("data-dir") or None
    return load_config(run_config["config"], overrides=overrides, data_dir=data_dir)


def torch_threads(config: Config) -> None:
    torch.set_num_threads(config.federation.client_cpus)
