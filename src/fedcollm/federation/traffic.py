"""Bytes on the wire, as Flower serialises its messages, counted per node on the server."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid


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
