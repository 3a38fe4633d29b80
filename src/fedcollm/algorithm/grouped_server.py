"""The server of a run with clients of several SLMs (groups, `groups.py`): the LLM with
omega, and per group a `CoTuningServer` around that same LLM holding the group's SLM,
theta_g and D_a in the group's tokenization. Step 3 aggregates each group's updates into its
theta_g; step 4 distils the LLM with every group's SLM at once (`distil_groups`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedcollm import seeds
from fedcollm.algorithm.client import ClientUpdate
from fedcollm.algorithm.distillation import DistillLosses, distil_groups
from fedcollm.algorithm.groups import SlmGroup, grouped, join, part, role, slm_groups
from fedcollm.algorithm.server import CoTuningServer, ServerRound
from fedcollm.config import Config
from fedcollm.data import Question
from fedcollm.evaluation import Scores
from fedcollm.models import Adapter, adapter_numel, build_llm, save_adapter, set_adapter


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
        # Each group's DP noise its own draw (seeded noise would repeat one across groups).
        for group, server in zip(groups, servers, strict=True):
            server.noise_label = f"server {group.name}"
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

    def sizes(self, slm_adapter: Adapter) -> dict[str, int]:
        """All groups' together, and each group's (`adapter_params[<group>]` ...)."""
        sizes = {"adapter_params": adapter_numel(slm_adapter), "slm_params": self.slm_params()}
        for name, server in self.servers.items():
            own = server.sizes(part(slm_adapter, name))
            sizes.update({f"{k}[{name}]": v for k, v in own.items()})
        return sizes

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


def server_for(
    config: Config, progress: Callable[[str], None] = lambda _: None
) -> CoTuningServer | GroupedServer:
    """The server of a run: one SLM's, or, with clients of several SLMs, the grouped one."""
    return (GroupedServer if grouped(config) else CoTuningServer).from_config(config, progress)
