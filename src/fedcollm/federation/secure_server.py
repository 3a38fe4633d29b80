"""The server's half of secure aggregation: client uploads go through Flower's SecAgg+
workflow, so the server obtains only the mean of the client adapters (which distillation
needs), never one of them.

Flower runs SecAgg+ only on its legacy strategy API, hence a second, legacy strategy here.
It shares the round's bookkeeping with `FedCoLLM` (`RoundBookkeeping`) and differs in what it
reads: not single updates, which it never sees and so cannot screen, but their aggregate,
which it checks instead. See docs/SECURITY.md for what SecAgg+ does and does not protect
against; the client's half is `secure_client.py`.
"""

from __future__ import annotations

import json

import torch
from flwr.app import Context
from flwr.common import FitIns
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedcollm.algorithm.aggregation import aggregation_rule
from fedcollm.algorithm.compute import planned_steps
from fedcollm.algorithm.grouped_server import GroupedServer
from fedcollm.algorithm.groups import group_means, join, part, upload_layout
from fedcollm.algorithm.ranks import HOLDERS, heterogeneous, per_slice_mean
from fedcollm.config import Config
from fedcollm.data import DataSplit
from fedcollm.federation.masks import SERVER_MODULE, replace_generator
from fedcollm.federation.rounds import RoundBookkeeping
from fedcollm.federation.screening import check_update
from fedcollm.federation.wire import adapter_from_parameters, parameters_from_adapter
from fedcollm.models import Adapter
from fedcollm.tracking.metrics import headline_scores


def client_row(proxy, res) -> dict:
    """A client's plaintext metrics, named as in the rounds with plain aggregation."""
    metrics = dict(res.metrics)
    row = {"node": int(proxy.cid), "num_examples": metrics.pop("num-examples", None)}
    if "own_predictions" in metrics:
        row["own_predictions"] = json.loads(str(metrics.pop("own_predictions")))
    return {**row, **metrics}


class SecureFedCoLLM(LegacyFedAvg):
    """Steps 1-5 of Algorithm 1 where step 3 is SecAgg+: `aggregate_fit` gets the mean."""

    def __init__(self, rounds: RoundBookkeeping, owners: dict[int, int] | None = None):
        quorum = rounds.config.federation.min_clients
        self.rounds, self.server, self.config = rounds, rounds.server, rounds.config
        self.owners = owners or {}  # partition -> node, from the roll call (sampling, groups)
        self.keys = rounds.server.slm_adapter
        # Clients of several SLMs: each uploads every group's block (algorithm/groups.py).
        self.layout = None
        if isinstance(self.server, GroupedServer):
            held = {HOLDERS: torch.zeros(self.config.lora.r)} if heterogeneous(self.config) else {}
            groups = {g: {**part(self.keys, g), **held} for g in self.server.servers}
            self.layout = upload_layout(groups)
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=quorum,
            min_available_clients=quorum,
            initial_parameters=parameters_from_adapter(self.keys),
        )
        self.sent: Adapter = {}
        self.rule = aggregation_rule(self.config.client.aggregation)
        self.scale = 1.0  # what the clients scale their uploads by (FedNova), per round

    def configure_fit(self, server_round, parameters, client_manager):
        """Step 1: broadcast theta with the round number (clients seed from it)."""
        self.sent = adapter_from_parameters(parameters, self.keys)
        server_round = self.rounds.begin(server_round, self.sent)
        evaluate_own = self.config.eval.clients and self.rounds.is_last(server_round)
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if self.config.federation.clients_per_round or self.layout:
            chosen = {self.owners.get(p) for p in self.rounds.sampled}
            instructions = [(p, fit) for p, fit in instructions if int(p.cid) in chosen]
        self.scale = self.rule.upload_scale(
            [planned_steps(self.config, self.server.split, p) for p in self.rounds.sampled]
        )
        config = {"server-round": server_round, "evaluate-own": evaluate_own}
        config["upload-scale"] = self.scale
        if not self.layout:
            for _, fit in instructions:
                fit.config = config
            return instructions
        # Each node its own group's theta and the layout of the vector it uploads.
        partitions = {node: p for p, node in self.owners.items()}
        config["group-layout"] = json.dumps(self.layout)
        grouped = []
        for proxy, _ in instructions:
            group = self.server.group_of(partitions[int(proxy.cid)])
            theta = parameters_from_adapter(part(self.sent, group))
            grouped.append((proxy, FitIns(theta, {**config, "group": group})))
        return grouped

    def _aggregate(self, results) -> Adapter:
        """Every result carries the same vector, the weighted mean of the uploads; checked
        like an update, then turned into theta by the rule. With clients of several SLMs,
        each group's mean out of its block, turned into its theta alike (a group none of
        whose clients sent keeps its theta)."""
        if not self.layout:
            uploads = self.keys
            if heterogeneous(self.config):  # each slice's holders' share came masked beside it
                uploads = {**self.keys, HOLDERS: torch.zeros(self.config.lora.r)}
            mean = adapter_from_parameters(results[0][1].parameters, uploads)
            return self._theta(mean, self.sent, results)
        uploads = join({g: {k: torch.zeros(s) for k, s in e} for g, e in self.layout.items()})
        means = group_means(adapter_from_parameters(results[0][1].parameters, uploads), self.layout)
        return join(
            {
                g: part(self.sent, g)
                if mean is None
                else self._theta(mean, part(self.sent, g), results)
                for g, mean in means.items()
            }
        )

    def _theta(self, mean: Adapter, sent: Adapter, results) -> Adapter:
        """theta from a (group's) mean upload, from the steps and sizes the clients report in
        the clear (the identity for a plain mean)."""
        share = mean.pop(HOLDERS, None)
        check_update(mean, sent, torch.float32, self.config.federation.max_update_norm)
        # Steps and sizes as reported (a client withholding them leaves the uniform mean).
        steps = [int(res.metrics.get("steps", 1)) for _, res in results]
        weights = self.rule.weights([int(res.metrics.get("num-examples", 1)) for _, res in results])
        theta = self.rule.from_mean(mean, sent, steps, weights, self.scale)
        return theta if share is None else per_slice_mean(theta, sent, share.double())

    def aggregate_fit(self, server_round, results, failures):
        """Steps 3-4: SecAgg+ has already summed the masked updates into their mean."""
        server_round = self.rounds.true_round(server_round)
        # Metrics travel in the clear beside the masked vector (docs/MESSAGES.md).
        clients = sorted(
            self.rounds.with_traffic([client_row(proxy, res) for proxy, res in results]),
            key=lambda c: c["partition"],
        )
        for client in clients:  # no payload of its own is visible: count whole messages
            client["bytes_sent"] = client["wire_bytes_sent"]
            client["bytes_received"] = client["wire_bytes_received"]
        theta = self.rounds.finish(
            server_round,
            clients,
            len(results),
            lambda progress: self.server.co_tune(self._aggregate(results), server_round, progress),
            dropped=[{"error": repr(f)} for f in failures],
            rejected=[],
            secure_aggregation=True,
        )
        return (None, {}) if theta is None else (parameters_from_adapter(theta), {})

    def evaluate(self, server_round, parameters):
        if server_round > 0 and "clients" not in self.rounds.row:
            # Flower's workflow halted before aggregate_fit (too few clients got through
            # its key exchange); theta stays as it was.
            reason = "SecAgg+ halted before aggregation; see the log"
            self.rounds.skip(reason, self.rounds.true_round(server_round))
        row = self.rounds.evaluate(server_round, adapter_from_parameters(parameters, self.keys))
        if row is None:
            return None
        return 0.0, headline_scores(row)


def max_weight(config: Config, split: DataSplit) -> float:
    """The bound SecAgg+ scales client weights by: 1 when every weight is 1 (a uniform
    mean), else `federation.secagg_max_weight` or the largest weight of the server's split."""
    rule = aggregation_rule(config.client.aggregation)
    largest = max(rule.weight(len(p)) for p in split.clients)
    if largest == 1:
        return 1.0
    return float(config.federation.secagg_max_weight or largest)


def run_secure_rounds(
    grid: Grid, context: Context, rounds: RoundBookkeeping, owners: dict[int, int]
) -> None:
    """The remaining rounds with SecAgg+ (Flower's legacy workflow); `owners` (partition ->
    node) says whom to ask when clients are sampled."""
    config, federation = rounds.config, rounds.config.federation
    replace_generator(SERVER_MODULE)  # unmasking must draw the masks the clients drew
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(
            num_rounds=rounds.last_round - rounds.first_round,
            round_timeout=federation.round_timeout,
        ),
        strategy=SecureFedCoLLM(rounds, owners),
    )
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every client shares its secrets with all others (small K)
        reconstruction_threshold=federation.secagg_reconstruction_threshold,
        max_weight=max_weight(config, rounds.server.split),
        clipping_range=federation.secagg_clipping_range,
        timeout=federation.round_timeout,
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
