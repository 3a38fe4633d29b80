"""Secure aggregation: client uploads go through Flower's SecAgg+ workflow, so the server
obtains only the mean of the client adapters (which distillation needs), never one of them.

Flower runs SecAgg+ only on its legacy strategy API, hence a second, legacy strategy here.
It does what `FedCoLLM` does, except that it cannot screen single updates (it never sees
one): it checks the aggregate instead. See docs/SECURITY.md for what SecAgg+ does and does
not protect against.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context
from flwr.client.mod import secaggplus_mod
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedcollm.models import Adapter
from fedcollm.rounds import RoundLog
from fedcollm.validation import UpdateRejected, check_update

__all__ = ["RECORD_KEY_CONFIGS", "run_secure_rounds", "secure_when_asked"]


def secure_when_asked(msg, context, call_next):
    """Client mod: SecAgg+ for the rounds the server runs securely, a pass-through otherwise."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def parameters_from_adapter(adapter: Adapter) -> Parameters:
    """The adapter as legacy Parameters: its tensors in key order, fp32 (SecAgg+ quantises
    from float; fp16 would overflow there)."""
    return ndarrays_to_parameters([v.float().numpy() for v in adapter.values()])


def adapter_from_parameters(parameters: Parameters, reference: Adapter) -> Adapter:
    """Legacy Parameters back into an adapter with `reference`'s keys and shapes, in fp32."""
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(reference):
        raise UpdateRejected(f"{len(arrays)} arrays, expected {len(reference)}")
    adapter = {}
    for (key, ref), array in zip(reference.items(), arrays, strict=True):
        if array.size != ref.numel():
            raise UpdateRejected(f"{key}: shape {array.shape}, expected {tuple(ref.shape)}")
        adapter[key] = torch.from_numpy(np.asarray(array, dtype=np.float32)).reshape(ref.shape)
    return adapter


def check_within_clipping(adapter: Adapter, clipping_range: float) -> None:
    """A client's own check before masking: SecAgg+ clips silently and turns NaN into noise."""
    for key, value in adapter.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"own update {key} holds NaN or Inf; not sending it")
        peak = value.abs().max().item()
        if peak > clipping_range:
            raise ValueError(
                f"own update {key} reaches {peak:.3g}, beyond federation."
                f"secagg_clipping_range = {clipping_range:g}; raise it on every party"
            )


def client_row(proxy, res) -> dict:
    """A client's plaintext metrics, named as in the rounds with plain aggregation."""
    metrics = dict(res.metrics)
    row = {"node": int(proxy.cid), "num_examples": metrics.pop("num-examples", None)}
    return {**row, **metrics}


class SecureFedCoLLM(LegacyFedAvg):
    """Steps 1-5 of Algorithm 1 where step 3 is SecAgg+: `aggregate_fit` gets the mean."""

    def __init__(self, log: RoundLog):
        quorum = log.config.federation.min_clients
        self.log, self.server, self.config = log, log.server, log.config
        self.keys = log.server.slm_adapter
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=quorum,
            min_available_clients=quorum,
            initial_parameters=parameters_from_adapter(log.server.slm_adapter),
        )
        self.sent: Adapter = {}

    def configure_fit(self, server_round, parameters, client_manager):
        """Step 1: broadcast theta with the round number (clients seed from it)."""
        server_round = self.log.true_round(server_round)
        self.sent = adapter_from_parameters(parameters, self.keys)
        self.log.begin(self.sent)
        evaluate_own = self.config.eval.clients and server_round == self.config.rounds
        instructions = super().configure_fit(server_round, parameters, client_manager)
        for _, fit in instructions:
            fit.config = {"server-round": server_round, "evaluate-own": evaluate_own}
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        """Steps 3-4: SecAgg+ has already summed the masked updates into their mean."""
        server_round = self.log.true_round(server_round)
        clients_seconds = self.log.clients_seconds()
        # Metrics travel in the clear beside the masked vector (docs/MESSAGES.md).
        clients = sorted(
            self.log.with_traffic([client_row(proxy, res) for proxy, res in results]),
            key=lambda c: c["partition"],
        )
        for client in clients:  # no payload of its own is visible: count whole messages
            client["bytes_sent"] = client["wire_bytes_sent"]
            client["bytes_received"] = client["wire_bytes_received"]
        self.log.row.update(
            clients=clients,
            dropped=[{"error": repr(f)} for f in failures],
            rejected=[],
            secure_aggregation=True,
        )
        quorum = self.config.federation.min_clients
        if len(results) < quorum:
            self.log.skip(f"{len(results)} updates, fewer than federation.min_clients = "
                          f"{quorum}", server_round)  # fmt: skip
            return None, {}
        try:
            # Every result carries the same vector: the mean of the clients' adapters.
            aggregate = adapter_from_parameters(results[0][1].parameters, self.keys)
            check_update(
                aggregate, self.sent, torch.float32, self.config.federation.max_update_norm
            )
        except UpdateRejected as err:
            self.log.skip(f"the securely aggregated adapter is unusable: {err}", server_round)
            return None, {}
        result = self.server.co_tune(aggregate, server_round, self.log.distill_progress)
        self.log.co_tuned(result, clients_seconds, [c.get("train_loss") for c in clients])
        return parameters_from_adapter(result.slm_adapter), {}

    def evaluate(self, server_round, parameters):
        if server_round > 0 and "clients" not in self.log.row:
            # Flower's workflow halted before aggregate_fit (too few clients got through
            # its key exchange); theta stays as it was.
            reason = "SecAgg+ halted before aggregation; see the log"
            self.log.skip(reason, self.log.true_round(server_round))
        row = self.log.evaluate(server_round, adapter_from_parameters(parameters, self.keys))
        if row is None:
            return None
        return 0.0, {"llm_acc": row["llm_acc"], "slm_acc": row["slm_acc"]}


def max_weight(log: RoundLog) -> float:
    """The largest client weight: 1 for a uniform mean, else the largest |D_k|."""
    if log.config.client.aggregation == "examples":
        return float(max(len(part) for part in log.server.split.clients))
    return 1.0


def run_secure_rounds(grid: Grid, context: Context, log: RoundLog) -> None:
    """The remaining rounds with SecAgg+ (Flower's legacy workflow)."""
    federation = log.config.federation
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(
            num_rounds=log.config.rounds - log.first_round,
            round_timeout=federation.round_timeout,
        ),
        strategy=SecureFedCoLLM(log),
    )
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every client shares its secrets with all others (small K)
        reconstruction_threshold=federation.secagg_reconstruction_threshold,
        max_weight=max_weight(log),
        clipping_range=federation.secagg_clipping_range,
        timeout=federation.round_timeout,
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
