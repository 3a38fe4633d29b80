"""One round of FedCoLLM (Fan et al., arXiv 2411.11707, Algorithm 1), with no federation
runtime: the reference that the Flower apps carry out across processes and machines.

    for t in 1..T:
        1. the server broadcasts theta to the round's clients      (sampled_partitions)
        2. every client k tunes theta on D_k into theta_k          (Client.update)
        3. the server aggregates theta_1..theta_K into theta       (CoTuningServer.aggregate)
        4. LLM and SLM distil into each other on D_a               (CoTuningServer.co_tune)
        5. the distilled theta is what round t + 1 broadcasts

Only theta travels, in `federation.adapter_dtype` both ways; the LLM and omega stay on the
server. Flower adds transport, screening, secure aggregation and bookkeeping around steps
1-3, nothing to the arithmetic: a simulated run gives the same theta, bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import replace

from fedcollm import seeds
from fedcollm.algorithm.client import Client
from fedcollm.algorithm.grouped_server import GroupedServer, server_for
from fedcollm.algorithm.groups import slm_groups
from fedcollm.algorithm.server import CoTuningServer, ServerRound
from fedcollm.config import Config
from fedcollm.data import encode_examples, training_split
from fedcollm.models import DTYPES, Adapter, build_slm


def transmitted(adapter: Adapter, dtype: str) -> Adapter:
    """An adapter as the other side reads it: sent in the wire dtype, read back as fp32."""
    return {k: v.to(DTYPES[dtype]).float() for k, v in adapter.items()}


def fedcollm_round(
    server: CoTuningServer | GroupedServer,
    clients: Sequence[Client],
    slm_adapter: Adapter,
    server_round: int,
) -> ServerRound:
    """Steps 1-5 of one round; the result's `slm_adapter` is the theta to broadcast next."""
    wire = server.config.federation.adapter_dtype
    broadcast = transmitted(slm_adapter, wire)  # 1
    updates = [  # 2: each client tunes the theta it receives (its group's, with several SLMs)
        client.update(server.broadcast_to(client.partition, broadcast), server_round)
        for client in clients
    ]
    # A client the round's deadline dropped sends nothing the server aggregates.
    received = [replace(u, adapter=transmitted(u.adapter, wire)) for u in updates if u.contributes]
    return server.server_update(received, broadcast, server_round)  # 3 and 4; theta is 5


def sampled_partitions(config: Config, server_round: int) -> list[int]:
    """The round's clients: all K, or `federation.clients_per_round` of them drawn uniformly
    without replacement, seeded by the round (the sampling the DP accountant assumes)."""
    count, population = config.federation.clients_per_round, config.num_clients
    if not count:
        return list(range(population))
    draw = random.Random(seeds.client_sample(config.seed, server_round))
    return sorted(draw.sample(range(population), count))


def in_process_clients(config: Config) -> list[Client]:
    """The K clients of a config in this process, those of one SLM sharing it."""
    questions, split = training_split(config)
    clients = []
    for group in slm_groups(config):
        group_config = replace(config, slm=group.slm)
        slm, tokenizer = build_slm(group_config)
        for k in group.clients:
            data = encode_examples(questions, split.clients[k], tokenizer, group_config)
            clients.append(Client(k, slm, tokenizer.pad_token_id, data, group_config))
    return sorted(clients, key=lambda c: c.partition)


def reference_rounds(
    config: Config,
    server: CoTuningServer | GroupedServer | None = None,
    clients: Sequence[Client] | None = None,
) -> Iterator[ServerRound]:
    """All T rounds in this process, every sampled client answering: the run without
    Flower (of the config's own server and clients unless given)."""
    server = server or server_for(config)
    clients = clients or in_process_clients(config)
    slm_adapter = server.slm_adapter
    for server_round in range(1, config.rounds + 1):
        partitions = sampled_partitions(config, server_round)
        server.privacy.spend_round(partitions)
        result = fedcollm_round(server, [clients[k] for k in partitions], slm_adapter, server_round)
        slm_adapter = result.slm_adapter
        yield result
