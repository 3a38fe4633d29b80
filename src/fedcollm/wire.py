"""What travels between server and clients: the SLM adapter theta as a Flower ArrayRecord.

Shared by the two Flower apps; the algorithm modules never see these types.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid

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


def config_from_run_config(run_config: dict[str, Any], data_dir: str | None = None) -> Config:
    """The experiment config named by Flower's run config (`[tool.flwr.app.config]`);
    `data_dir`, when given, is where this node keeps its data (its node config)."""
    overrides = [s for s in str(run_config.get("set", "")).split(";") if s.strip()]
    data_dir = data_dir or run_config.get("data-dir") or None
    return load_config(run_config["config"], overrides=overrides, data_dir=data_dir)


def torch_threads(config: Config) -> None:
    torch.set_num_threads(config.federation.client_cpus)


class MeteredGrid(Grid):
    """A Grid that counts the serialised bytes of every message to and from each node, so
    that traffic is measured on what Flower actually sends, whichever workflow sends it."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.to_node: Counter[int] = Counter()
        self.from_node: Counter[int] = Counter()

    def take(self) -> tuple[Counter[int], Counter[int]]:
        """Bytes to and from each node since the last call."""
        counts = self.to_node, self.from_node
        self.to_node, self.from_node = Counter(), Counter()
        return counts

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        messages = list(messages)
        for message in messages:
            self.to_node[message.metadata.dst_node_id] += message_to_proto(message).ByteSize()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self.from_node[reply.metadata.src_node_id] += message_to_proto(reply).ByteSize()
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            self.to_node[message.metadata.dst_node_id] += message_to_proto(message).ByteSize()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            self.from_node[reply.metadata.src_node_id] += message_to_proto(reply).ByteSize()
        return replies

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()
