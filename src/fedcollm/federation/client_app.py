"""Flower ClientApp: step 2 of Algorithm 1 on the client's own partition D_k.

The client receives theta, tunes it with `Client.update` and sends the result back. It
holds the SLM and its data only; nothing of the LLM exists on this side, and nothing of the
server's bookkeeping is imported here.
"""

from __future__ import annotations

import json
import logging
import os
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcollm.algorithm.aggregation import aggregation_rule
from fedcollm.algorithm.client import Client
from fedcollm.algorithm.groups import member_config, secure_upload
from fedcollm.algorithm.ranks import HOLDERS, client_rank, held, heterogeneous
from fedcollm.config import Config
from fedcollm.data import encode_examples, evaluation_questions, load_questions, training_split
from fedcollm.evaluation import score
from fedcollm.federation.secure_client import (
    asks_for_secure_aggregation,
    read_secure_broadcast,
    secure_reply,
    secure_weight,
    secure_when_asked,
)
from fedcollm.federation.wire import (
    adapter_to_record,
    config_from_run_config,
    record_bytes,
    record_to_adapter,
    torch_threads,
)
from fedcollm.models import Adapter, adapter_digest, build_slm, get_adapter
from fedcollm.tracking.metrics import worth_reporting

# One SLM per process, reused by every virtual client the process serves: each round starts
# by overwriting all LoRA weights with the broadcast theta, so no client state leaks across.
_loaded: dict[str, tuple] = {}


def client_state(config: Config, partition: int, own_data: bool = False) -> tuple[Client, object]:
    """Client k (its SLM and encoded D_k) and the tokenizer, loaded once per process.

    D_k is partition k of the run's seeded split of the training file or, with `own_data`
    (a deployed node whose data directory holds only its own rows), all of that file."""
    key = json.dumps([config.to_dict(), own_data], sort_keys=True)
    if key not in _loaded:
        _loaded.clear()
        torch_threads(config)
        slm, tokenizer = build_slm(config)
        if own_data:
            questions = load_questions(config.task, "train", config.data_dir)
            parts = {partition: range(len(questions))}
        else:
            questions, split = training_split(config)
            parts = dict(enumerate(split.clients))
        _loaded[key] = (slm, tokenizer, questions, parts, {})
    slm, tokenizer, questions, parts, clients = _loaded[key]
    if partition not in clients:
        client_data = encode_examples(questions, parts[partition], tokenizer, config)
        clients[partition] = Client(partition, slm, tokenizer.pad_token_id, client_data, config)
    return clients[partition], tokenizer


def uses_own_data(context: Context) -> bool:
    """A node started with `own-data=true` trains on every row in its data directory."""
    return str(context.node_config.get("own-data", "false")).lower() == "true"


def node_client(config: Config, context: Context) -> tuple[Client, object]:
    partition = int(context.node_config["partition-id"])
    if partition >= config.num_clients:
        raise ValueError(
            f"this node has partition-id {partition}, but the config has num_clients = "
            f"{config.num_clients}: start as many SuperNodes as num_clients"
        )
    # Its group's SLM (algorithm/groups.py): with one SLM, the config as it is.
    return client_state(member_config(config, partition), partition, uses_own_data(context))


def tune(
    config: Config, context: Context, slm_adapter: Adapter, instructions
) -> tuple[Adapter, dict, dict]:
    """Step 2 on this node's partition D_k: the tuned adapter, the reply's metrics and its
    receipt (digests of the theta received and of the adapter scored, if any)."""
    start = time.perf_counter()
    receipt = {"received_sha256": adapter_digest(slm_adapter)}
    client, tokenizer = node_client(config, context)
    server_round = int(instructions["server-round"])

    def progress(step: int, total: int, loss: float) -> None:
        if worth_reporting(step, total):
            print(
                f"  client {client.partition} round {server_round}: step {step}/{total} "
                f"loss {loss:.3f}"
            )

    update = client.update(slm_adapter, server_round, on_step=progress)
    receipt["outcome"] = update.outcome  # on time, late, partial or dropped
    own = {}
    if instructions.get("evaluate-own"):
        # The client's own adapter after its last local update, scored where it lives.
        scores = score(client.slm, tokenizer, config, evaluation_questions(config))
        own = {f"own_{k}": v for k, v in scores.summary().items() if k not in ("n", "majority")}
        # Which adapter that score is of: the server can compare it with what arrives.
        receipt["scored_sha256"] = adapter_digest(get_adapter(client.slm))
        # Per question, what it answered (public evaluation questions, no training data).
        receipt["own_predictions"] = json.dumps(scores.predictions())
    metrics = {
        **own,
        "num-examples": update.num_examples,
        "train_loss": update.train_loss,
        "steps": update.steps,
        "clock_seconds": update.seconds,  # on the round's clock (client.clock)
        "partition": client.partition,
        "seconds": time.perf_counter() - start,
    }
    return update.adapter, metrics, receipt


def sent_metrics(metrics: dict, config: Config) -> dict:
    """What the reply says of this round: with `privacy.withhold_metrics` nothing shaped by
    D_k (outside DP's guarantee), only the partition and the bytes received."""
    if config.privacy.withhold_metrics:
        return {k: v for k, v in metrics.items() if k in ("partition", "bytes_received")}
    return metrics


def train(config: Config, msg: Message, context: Context) -> Message:
    """A round with plain aggregation: theta in, the tuned adapter and metrics out."""
    if asks_for_secure_aggregation(msg):
        return secure_train(config, msg, context)
    received = msg.content["arrays"]
    slm_adapter = record_to_adapter(received)
    adapter, metrics, receipt = tune(config, context, slm_adapter, msg.content["config"])
    metrics["bytes_received"] = record_bytes(received)
    content = RecordDict(
        {
            "arrays": adapter_to_record(adapter, config.federation.adapter_dtype),
            "metrics": MetricRecord(sent_metrics(metrics, config)),
            "receipt": ConfigRecord(receipt),
        }
    )
    return Message(content=content, reply_to=msg)


def secure_train(config: Config, msg: Message, context: Context) -> Message:
    """A round under SecAgg+: the same tuning, answered as the legacy FitRes the mod masks."""
    client, _ = node_client(config, context)
    slm_adapter, instructions = read_secure_broadcast(msg, get_adapter(client.slm))
    adapter, metrics, receipt = tune(config, context, slm_adapter, instructions)
    weight = secure_weight(metrics["num-examples"], config, context)
    rule = aggregation_rule(config.client.aggregation)
    scale = float(instructions.get("upload-scale", 1.0))
    adapter = rule.upload(adapter, slm_adapter, metrics["steps"], scale)
    if heterogeneous(config):  # the slices it holds, counted under the masks too
        adapter = {**adapter, HOLDERS: held(client_rank(config, client.partition), config.lora.r)}
    if "group-layout" in instructions:  # clients of several SLMs: every group's block
        layout = json.loads(str(instructions["group-layout"]))
        adapter = secure_upload(adapter, str(instructions["group"]), layout)
    clipping = config.federation.secagg_clipping_range
    return secure_reply(
        msg, adapter, {**sent_metrics(metrics, config), **receipt}, weight, clipping
    )


# Set by a quiet simulation: its worker processes then log Flower's errors only.
QUIET_WORKERS = "FEDCOLLM_QUIET_WORKERS"
if os.environ.get(QUIET_WORKERS) == "1":
    logging.getLogger("flwr").setLevel(logging.ERROR)


def make_client_app(config: Config | None = None) -> ClientApp:
    """A ClientApp for `config`, or for the config named in Flower's run config."""
    # SecAgg+ intercepts the rounds that the server runs securely and passes others through.
    app = ClientApp(mods=[secure_when_asked])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        if config is None:  # deployed: the run config names it; the node says where its data is
            node_data = context.node_config.get("data-dir")
            return train(config_from_run_config(context.run_config, node_data), msg, context)
        return train(config, msg, context)

    @app.query()
    def _roll_call(msg: Message, context: Context) -> Message:
        """The server's roll call (client sampling): which partition this node holds."""
        partition = int(context.node_config["partition-id"])
        content = RecordDict({"partition": MetricRecord({"partition-id": partition})})
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
