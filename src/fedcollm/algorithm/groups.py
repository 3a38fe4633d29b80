"""Clients of several SLM families: one theta per group, one LLM distilling with them all.

Clients whose profiles (`[[client.profiles]]`, key `slm`) name the same SLM form a group g
with its own theta_g: the server broadcasts theta_g to g's clients only, averages their
updates within g, and keeps one copy of each group's SLM. Step 4 distils the LLM with every
group's SLM at once (`distillation.distil_groups`): each SLM as in Algorithm 1, the LLM
toward the mean of its distances to them, across tokenizers where a group's differs.

On the server, and in everything that carries theta between rounds (Flower's arrays, the
checkpoint, the digests), the groups' adapters travel as one: each key prefixed by its
group's name (`join`, `part`). A client only ever sees its own group's part.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcollm import seeds
from fedcollm.algorithm.client import ClientUpdate
from fedcollm.algorithm.compute import client_profile
from fedcollm.algorithm.distillation import DistillLosses, distil_groups
from fedcollm.algorithm.server import CoTuningServer, ServerRound
from fedcollm.config import Config, ModelConfig, profile_slm
from fedcollm.data import Question
from fedcollm.evaluation import Scores
from fedcollm.models import Adapter, build_llm, save_adapter, set_adapter


@dataclass(frozen=True)
class SlmGroup:
    """The clients (partitions) that hold one SLM."""

    name: str
    slm: ModelConfig
    clients: tuple[int, ...]


def client_slm(config: Config, partition: int) -> ModelConfig:
    """Client `partition`'s SLM: its profile's, else the [slm] table's."""
    profile = client_profile(config, partition)
    return profile_slm(config, profile) if profile else config.slm


def slm_groups(config: Config) -> list[SlmGroup]:
    """The run's groups, in the order of their first client; named by their SLM (with a
    number where two differ in other keys than the name)."""
    members: dict[str, list[int]] = {}
    models: dict[str, ModelConfig] = {}
    for k in range(config.num_clients):
        model = client_slm(config, k)
        key = json.dumps(dataclasses.asdict(model), sort_keys=True)
        members.setdefault(key, []).append(k)
        models[key] = model
    groups, taken = [], set()
    for key, clients in members.items():
        # A hub id's or a directory's last part: the name is a key prefix and a folder name.
        base = Path(models[key].name).name
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        groups.append(SlmGroup(name, models[key], tuple(clients)))
    return groups


def grouped(config: Config) -> bool:
    return len(slm_groups(config)) > 1


def member_config(config: Config, partition: int) -> Config:
    """The config as client `partition` runs it: with its group's SLM as [slm]."""
    return dataclasses.replace(config, slm=client_slm(config, partition))


def server_for(
    config: Config, progress: Callable[[str], None] = lambda _: None
) -> CoTuningServer | GroupedServer:
    """The server of a run: one SLM's, or, with clients of several SLMs, the grouped one."""
    return (GroupedServer if grouped(config) else CoTuningServer).from_config(config, progress)


def join(adapters: dict[str, Adapter]) -> Adapter:
    """The groups' adapters as one, each key prefixed by its group."""
    return {f"{g}/{k}": v for g, adapter in adapters.items() for k, v in adapter.items()}


def part(adapter: Adapter, group: str) -> Adapter:
    """Group `group`'s adapter out of a joined one."""
    prefix = f"{group}/"
    return {k[len(prefix) :]: v for k, v in adapter.items() if k.startswith(prefix)}


# Under secure aggregation every client uploads one vector holding every group's block: its
# own update in its group's block, zeros in the others, and 1 (times its weight, as SecAgg+
# weights everything) under GROUP_SHARE in its own block. The unmasked weighted mean then
# holds, per group, its clients' weighted sum over the federation's total weight and that
# group's share of the weight: their ratio is the group's own weighted mean. The server
# learns each group's mean and nothing of a single client, as with one SecAgg+ per group.
GROUP_SHARE = "group_share"


def upload_layout(templates: dict[str, Adapter]) -> dict[str, list]:
    """Each group's upload keys and shapes, in order (JSON-able: sent to the clients)."""
    return {
        g: [[k, list(v.shape)] for k, v in {**t, GROUP_SHARE: torch.zeros(1)}.items()]
        for g, t in templates.items()
    }


def secure_upload(upload: Adapter, group: str, layout: dict[str, list]) -> Adapter:
    """A client's upload of group `group` placed in the federation's vector (above)."""
    own = [k for k, _ in layout[group] if k != GROUP_SHARE]
    if own != list(upload):
        raise ValueError(f"own upload's keys are not group {group}'s in the server's layout")
    blocks = {
        g: {
            k: upload[k] if g == group and k in upload else torch.zeros(shape)
            for k, shape in entries
        }
        for g, entries in layout.items()
    }
    blocks[group][GROUP_SHARE] = torch.ones(1)
    return join(blocks)


def group_means(mean: Adapter, layout: dict[str, list]) -> dict[str, Adapter | None]:
    """Each group's weighted mean out of the unmasked vector; None for a group none of whose
    clients sent anything."""
    means = {}
    for g in layout:
        block = part(mean, g)
        share = block.pop(GROUP_SHARE).double().item()
        means[g] = {k: (v.double() / share).float() for k, v in block.items()} if share else None
    return means


def role(group: str) -> str:
    """A group's SLM in a metrics row's keys: `slm[<group>]_acc`."""
    return f"slm[{group}]"


class GroupedServer:
    """The server of a run with several SLM groups: the LLM with omega, and per group its
    own `CoTuningServer` (its SLM, theta_g and D_a in its tokenization) around that LLM."""

    def __init__(self, config: Config, groups: list[SlmGroup], servers: list[CoTuningServer]):
        self.config, self.groups = config, groups
        self.servers = dict(zip((g.name for g in groups), servers, strict=True))
        self.lead = servers[0]
        self.llm, self.split, self.privacy = self.lead.llm, self.lead.split, self.lead.privacy
        # One omega, one optimiser: every group's distillation steps the same LLM.
        for server in servers[1:]:
            server.distillation.llm_optimizer = self.lead.distillation.llm_optimizer
        self._group_of = {k: g.name for g in groups for k in g.clients}

    @classmethod
    def from_config(
        cls, config: Config, progress: Callable[[str], None] = lambda _: None
    ) -> GroupedServer:
        llm = build_llm(config)
        groups = slm_groups(config)
        servers = []
        for group in groups:
            progress(f"group {group.name}: clients {', '.join(map(str, group.clients))}")
            group_config = dataclasses.replace(config, slm=group.slm)
            servers.append(CoTuningServer.from_config(group_config, progress, llm))
        return cls(config, groups, servers)

    @property
    def slm_adapter(self) -> Adapter:
        return join({g: s.slm_adapter for g, s in self.servers.items()})

    def slm_params(self) -> int:
        return sum(s.slm_params() for s in self.servers.values())

    def broadcast_to(self, partition: int, slm_adapter: Adapter) -> Adapter:
        """What client `partition` receives: its group's theta only."""
        return part(slm_adapter, self._group_of[partition])

    def group_of(self, partition: int) -> str:
        return self._group_of[partition]

    def server_update(
        self,
        updates: Sequence[ClientUpdate],
        broadcast: Adapter,
        server_round: int,
        on_step: Callable | None = None,
    ) -> ServerRound:
        """Steps 3-4: each group's updates aggregated into its theta_g (a group none of whose
        clients contributed keeps the broadcast one), then the grouped distillation."""
        start = time.perf_counter()
        aggregates, measured = {}, {}
        for name, server in self.servers.items():
            sent = part(broadcast, name)
            own = [u for u in updates if self._group_of.get(u.partition) == name]
            if not own:
                aggregates[name] = sent
                continue
            aggregates[name], own_measured = server.aggregate_round(own, sent, server_round)
            measured.update({f"{k}[{name}]": v for k, v in own_measured.items()})
        return self.co_tune(
            join(aggregates), server_round, on_step, time.perf_counter() - start, measured
        )

    def co_tune(
        self,
        aggregate: Adapter,
        server_round: int,
        on_step: Callable | None = None,
        aggregation_seconds: float = 0.0,
        measured: dict[str, float] | None = None,
    ) -> ServerRound:
        """Step 4 from the joined aggregate: every group's SLM and the LLM distil at once."""
        for name, server in self.servers.items():
            set_adapter(server.slm, part(aggregate, name))
        start = time.perf_counter()
        losses: dict[str, float] = {}
        if self.config.distill.enabled:
            seed = seeds.distillation_round(self.config.seed, server_round)
            servers = list(self.servers.values())
            records = distil_groups(
                [s.distillation for s in servers],
                [s.aux_data for s in servers],
                [s.pad_id for s in servers],
                seed,
                on_step,
            )
            losses = self._losses(records)
        seconds = {"aggregation": aggregation_seconds, "distillation": time.perf_counter() - start}
        return ServerRound(aggregate, self.slm_adapter, losses, seconds, measured or {})

    def _losses(self, records: list[DistillLosses]) -> dict[str, float]:
        """The metrics row's distillation losses: the LLM's once, each group's SLM's under
        its group's name (distill_slm[<group>]_ce ...)."""
        losses = {k: v for k, v in records[0].means().items() if "_llm_" in k}
        for name, record in zip(self.servers, records, strict=True):
            for key, value in record.means().items():
                if "_slm_" in key:
                    losses[key.replace("_slm_", f"_{role(name)}_")] = value
        return losses

    def evaluate(
        self, questions: Sequence[Question], roles: Sequence[str] = ("llm", "slm")
    ) -> dict[str, Scores]:
        """The LLM's scores and each group's SLM's (`slm[<group>]`)."""
        scores = self.lead.evaluate(questions, [r for r in roles if r == "llm"])
        if "slm" in roles:
            for name, server in self.servers.items():
                scores[role(name)] = server.evaluate(questions, ["slm"])["slm"]
        return scores

    def aux_losses(self) -> dict[str, float]:
        """The LLM's answer loss on D_a (once) and each group's SLM's (`slm[<group>]_aux_loss`)."""
        losses = self.lead.aux_losses(["llm"])
        for name, server in self.servers.items():
            losses[f"{role(name)}_aux_loss"] = server.aux_losses(["slm"])["slm_aux_loss"]
        return losses

    def state_dict(self) -> dict[str, Any]:
        return {**self.lead.state_dict(), "slm_adapter": self.slm_adapter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, server in self.servers.items():  # omega and its optimiser are shared
            server.load_state_dict({**state, "slm_adapter": part(state["slm_adapter"], name)})

    def save_adapters(self, out_dir: Path) -> None:
        """omega in adapters/llm, each group's theta_g in adapters/slm/<group>."""
        save_adapter(self.llm, out_dir / "adapters" / "llm")
        for name, server in self.servers.items():
            save_adapter(server.slm, out_dir / "adapters" / "slm" / name)
