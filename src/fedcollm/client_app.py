"""Flower ClientApp: step 2 of Algorithm 1 on the client's own partition D_k.

The client receives theta, tunes it with `client_update` and sends the result back. It
holds the SLM and its data only; nothing of the LLM exists on this side.
"""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

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
from fedcollm.models import Adapter, adapter_digest, get_adapter
from fedcollm.secure import (
    RECORD_KEY_CONFIGS,
    adapter_from_parameters,
    check_within_clipping,
    parameters_from_adapter,
    secure_when_asked,
)
from fedcollm.tasks import load_questions
from fedcollm.wire import (
    adapter_to_record,
    config_from_run_config,
    record_bytes,
    record_to_adapter,
    torch_threads,
)

# One SLM per process, reused by every virtual client the process serves: each round starts
# by overwriting all LoRA weights with the broadcast theta, so no client state leaks across.
_loaded: dict[str, tuple] = {}


def client_state(config: Config, partition: int, own_data: bool = False):
    """The SLM, its tokenizer and this client's encoded D_k (loaded once per process).

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
    slm, tokenizer, questions, parts, encoded = _loaded[key]
    if partition not in encoded:
        encoded[partition] = encode(questions, parts[partition], tokenizer, config)
    return slm, tokenizer, encoded[partition]


def uses_own_data(context: Context) -> bool:
    """A node started with `own-data=true` trains on every row in its data directory."""
    return str(context.node_config.get("own-data", "false")).lower() == "true"


def tune(
    config: Config, context: Context, slm_adapter: Adapter, instructions
) -> tuple[Adapter, dict]:
    """Step 2 on this node's partition D_k: the tuned adapter and the reply's metrics."""
    start = time.perf_counter()
    partition = int(context.node_config["partition-id"])
    if partition >= config.num_clients:
        raise ValueError(
            f"this node has partition-id {partition}, but the config has num_clients = "
            f"{config.num_clients}: start as many SuperNodes as num_clients"
        )
    slm, tokenizer, client_data = client_state(config, partition, uses_own_data(context))
    server_round = int(instructions["server-round"])
    seed = (config.seed * 1_000 + server_round) * 1_000 + partition

    def progress(step: int, total: int, loss: float) -> None:
        if worth_reporting(step, total):
            print(f"  client {partition} round {server_round}: step {step}/{total} loss {loss:.3f}")

    update = client_update(
        slm, slm_adapter, client_data, config, tokenizer.pad_token_id, seed, on_step=progress
    )
    own = {}
    if instructions.get("evaluate-own"):
        # The client's own adapter after its last local update, scored where it lives.
        accuracy = score(slm, tokenizer, config, evaluation_questions(config))
        own = {"own_acc": accuracy.acc, "own_acc_norm": accuracy.acc_norm}
    metrics = {
        **own,
        "num-examples": update.num_examples,
        "train_loss": update.train_loss,
        "steps": update.steps,
        "partition": partition,
        "seconds": time.perf_counter() - start,
    }
    return update.adapter, metrics


def train(config: Config, msg: Message, context: Context) -> Message:
    """A round with plain aggregation: theta in, the tuned adapter and metrics out."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secure_train(config, msg, context)
    received = msg.content["arrays"]
    slm_adapter = record_to_adapter(received)
    adapter, metrics = tune(config, context, slm_adapter, msg.content["config"])
    metrics["bytes_received"] = record_bytes(received)
    content = RecordDict(
        {
            "arrays": adapter_to_record(adapter, config.federation.adapter_dtype),
            "metrics": MetricRecord(metrics),
            "receipt": ConfigRecord({"received_sha256": adapter_digest(slm_adapter)}),
        }
    )
    return Message(content=content, reply_to=msg)


def secure_train(config: Config, msg: Message, context: Context) -> Message:
    """A round under SecAgg+: the same tuning, answered as the legacy FitRes the mod masks.

    The client checks its own update first: SecAgg+ would silently clip values outside its
    range, and the server can no longer check any single update."""
    fit = recorddict_to_fitins(msg.content, keep_input=True)
    partition = int(context.node_config["partition-id"])
    slm, _, _ = client_state(config, partition, uses_own_data(context))
    slm_adapter = adapter_from_parameters(fit.parameters, get_adapter(slm))
    adapter, metrics = tune(config, context, slm_adapter, fit.config)
    check_within_clipping(adapter, config.federation.secagg_clipping_range)
    # The mod weights each client by num_examples / max_weight: 1 makes a uniform mean.
    weight = metrics["num-examples"] if config.client.aggregation == "examples" else 1
    fitres = FitRes(Status(Code.OK, ""), parameters_from_adapter(adapter), weight, metrics)
    return Message(content=fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


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

    return app


app = make_client_app()
