"""Flower ClientApp: step 2 of Algorithm 1 on the client's own partition D_k.

The client receives theta, tunes it with `client_update` and sends the result back. It
holds the SLM and its data only; nothing of the LLM exists on this side.
"""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcollm.config import Config
from fedcollm.cotuning import (
    build_slm,
    client_update,
    encode,
    evaluation_questions,
    score,
    training_split,
)
from fedcollm.metrics import worth_reporting
from fedcollm.wire import (
    adapter_digest,
    adapter_to_record,
    config_from_run_config,
    record_bytes,
    record_to_adapter,
    torch_threads,
)

# One SLM per process, reused by every virtual client the process serves: each round starts
# by overwriting all LoRA weights with the broadcast theta, so no client state leaks across.
_loaded: dict[str, tuple] = {}


def client_state(config: Config, partition: int):
    """The SLM, its tokenizer and this client's encoded D_k (loaded once per process)."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _loaded:
        _loaded.clear()
        torch_threads(config)
        slm, tokenizer = build_slm(config)
        questions, split = training_split(config)
        _loaded[key] = (slm, tokenizer, questions, split, {})
    slm, tokenizer, questions, split, encoded = _loaded[key]
    if partition not in encoded:
        encoded[partition] = encode(questions, split.clients[partition], tokenizer, config)
    return slm, tokenizer, encoded[partition]


def train(config: Config, msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    partition = int(context.node_config["partition-id"])
    if partition >= config.num_clients:
        raise ValueError(
            f"this node has partition-id {partition}, but the config has num_clients = "
            f"{config.num_clients}: start as many SuperNodes as num_clients"
        )
    slm, tokenizer, client_data = client_state(config, partition)
    received = msg.content["arrays"]
    slm_adapter = record_to_adapter(received)
    server_round = int(msg.content["config"]["server-round"])
    seed = (config.seed * 1_000 + server_round) * 1_000 + partition

    def progress(step: int, total: int, loss: float) -> None:
        if worth_reporting(step, total):
            print(f"  client {partition} round {server_round}: step {step}/{total} loss {loss:.3f}")

    update = client_update(
        slm, slm_adapter, client_data, config, tokenizer.pad_token_id, seed, on_step=progress
    )
    arrays = adapter_to_record(update.adapter, config.federation.adapter_dtype)
    own = {}
    if msg.content["config"].get("evaluate-own"):
        # The client's own adapter after its last local update, scored where it lives.
        accuracy = score(slm, tokenizer, config, evaluation_questions(config))
        own = {"own_acc": accuracy.acc, "own_acc_norm": accuracy.acc_norm}
    metrics = MetricRecord(
        {
            **own,
            "num-examples": update.num_examples,
            "train_loss": update.train_loss,
            "steps": update.steps,
            "partition": partition,
            "bytes_received": record_bytes(received),
            "seconds": time.perf_counter() - start,
        }
    )
    receipt = ConfigRecord({"received_sha256": adapter_digest(slm_adapter)})
    content = RecordDict({"arrays": arrays, "metrics": metrics, "receipt": receipt})
    return Message(content=content, reply_to=msg)


def make_client_app(config: Config | None = None) -> ClientApp:
    """A ClientApp for `config`, or for the config named in Flower's run config."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(config or config_from_run_config(context.run_config), msg, context)

    return app


app = make_client_app()
