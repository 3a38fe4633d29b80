"""The client's half of secure aggregation: Flower's SecAgg+ mod masks what this node sends
(with ChaCha20 masks, `masks.py`), after the node has checked its own update, since the
server can no longer check it.

The server's half is `secure_server.py`; neither imports the other."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from fedcollm.algorithm.aggregation import aggregation_rule
from fedcollm.config import Config
from fedcollm.federation.masks import CLIENT_MODULE, replace_generator
from fedcollm.federation.wire import adapter_from_parameters, parameters_from_adapter
from fedcollm.models import Adapter


def asks_for_secure_aggregation(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_when_asked(msg, context, call_next):
    """Client mod: SecAgg+ for the rounds the server runs securely, a pass-through otherwise."""
    if asks_for_secure_aggregation(msg):
        replace_generator(CLIENT_MODULE)  # ChaCha20 masks, not a 32-bit Mersenne Twister
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def read_secure_broadcast(msg: Message, reference: Adapter) -> tuple[Adapter, dict]:
    """theta and the round's instructions from the legacy FitIns the SecAgg+ workflow sends."""
    fit = recorddict_to_fitins(msg.content, keep_input=True)
    return adapter_from_parameters(fit.parameters, reference), dict(fit.config)


def check_within_clipping(adapter: Adapter, clipping_range: float) -> None:
    """SecAgg+ clips silently and turns NaN into noise: refuse to send what it would spoil."""
    for key, value in adapter.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"own update {key} holds NaN or Inf; not sending it")
        peak = value.abs().max().item()
        if peak > clipping_range:
            raise ValueError(
                f"own update {key} reaches {peak:.3g}, beyond federation."
                f"secagg_clipping_range = {clipping_range:g}; raise it on every party"
            )


def secure_weight(num_examples: int, config: Config, context: Context) -> float:
    """This client's aggregation weight, checked against the bound the server announced in
    SecAgg+'s setup: above it the masked sum would overflow without anyone noticing."""
    weight = aggregation_rule(config.client.aggregation).weight(num_examples)
    state = context.state.config_records.get(RECORD_KEY_STATE, {})
    bound = float(state.get("max_weight", 0) or 0)
    if bound and weight > bound:
        raise ValueError(
            f"own aggregation weight {weight} ({config.client.aggregation} of {num_examples} "
            f"rows) exceeds the SecAgg+ max_weight "
            f"{bound:g} the server announced; set federation.secagg_max_weight to at least "
            "the largest client's number of training rows"
        )
    return weight


def secure_reply(
    msg: Message, adapter: Adapter, metrics: dict, weight: int, clipping_range: float
) -> Message:
    """The tuned adapter as the legacy FitRes the mod masks; metrics travel in the clear."""
    check_within_clipping(adapter, clipping_range)
    fitres = FitRes(Status(Code.OK, ""), parameters_from_adapter(adapter), weight, metrics)
    return Message(content=fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
