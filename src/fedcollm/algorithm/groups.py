"""Clients of several SLM families: one theta per group, one LLM distilling with them all.

Clients whose profiles (`[[client.profiles]]`, key `slm`) name the same SLM form a group g
with its own theta_g: the server broadcasts theta_g to g's clients only, averages their
updates within g, and keeps one copy of each group's SLM (`grouped_server.py`). Step 4
distils the LLM with every group's SLM at once (`distillation.distil_groups`): each SLM as
in Algorithm 1, the LLM toward the mean of its distances to them, across tokenizers where a
group's differs. This module is what both sides need: who is in which group, and how the
groups' adapters are laid out; it loads nothing of the server's.

On the server, and in everything that carries theta between rounds (Flower's arrays, the
checkpoint, the digests), the groups' adapters travel as one: each key prefixed by its
group's name (`join`, `part`). A client only ever sees its own group's part.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from fedcollm.config import Config, ModelConfig, client_slm, slm_members
from fedcollm.models import Adapter


@dataclass(frozen=True)
class SlmGroup:
    """The clients (partitions) that hold one SLM."""

    name: str
    slm: ModelConfig
    clients: tuple[int, ...]


def slm_groups(config: Config) -> list[SlmGroup]:
    """The run's groups, in the order of their first client; named by their SLM (a hub id's
    or a directory's last part: the name is a key prefix and a folder name), with a number
    where two differ in other keys than the name."""
    groups, taken = [], set()
    for model, clients in slm_members(config):
        base = Path(model.name).name
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        groups.append(SlmGroup(name, model, tuple(clients)))
    return groups


def grouped(config: Config) -> bool:
    return len(slm_groups(config)) > 1


def member_config(config: Config, partition: int) -> Config:
    """The config as client `partition` runs it: with its group's SLM as [slm]."""
    return dataclasses.replace(config, slm=client_slm(config, partition))


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
