"""Client sampling on Flower (`federation.clients_per_round`): the server draws partitions
(`algorithm.round.sampled_partitions`), so it must know which node holds which partition
before the first round. A roll call asks every node once; the answers bind partitions to
nodes as the first valid update does without sampling (docs/SECURITY.md)."""

from __future__ import annotations

import time

from flwr.app import MessageType, RecordDict
from flwr.serverapp import Grid

from fedcollm.config import Config


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The connected nodes, once at least `count` are (or `timeout` seconds have passed)."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return nodes


def roll_call(grid: Grid, config: Config) -> dict[int, int]:
    """partition -> node for every node that answers; the first claim of a partition wins."""
    nodes = wait_for_nodes(grid, config.num_clients, config.federation.round_timeout)
    messages = [
        grid.create_message(RecordDict(), MessageType.QUERY, node, group_id="roll-call")
        for node in nodes
    ]
    owners: dict[int, int] = {}
    replies = grid.send_and_receive(messages, timeout=config.federation.round_timeout)
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        try:
            partition = int(reply.content["partition"]["partition-id"])
        except Exception:  # noqa: BLE001 - an error or a malformed answer: the node is left out
            print(f"roll call: node {node} gave no partition; it is never sampled", flush=True)
            continue
        if not 0 <= partition < config.num_clients or partition in owners:
            print(f"roll call: node {node} claims partition {partition}; ignored", flush=True)
            continue
        owners[partition] = node
    missing = sorted(set(range(config.num_clients)) - set(owners))
    if missing:
        print(f"roll call: no node holds partitions {missing}; sampled, they drop", flush=True)
    return owners
