"""An experiment with clients of several SLMs (algorithm/groups.py): each group is compared
on its own.

A method's result holds the LLM's scores once and each group's SLM scores under `groups`
(`grouped_result`). `per_group` turns it into one result per group, with the task named
"<task> [<group>]", that group's SLM scores in the places a one-SLM result has them, and its
config's [slm] the group's: every table, test and plot then compares the methods within a
group, pairing each group's clients and global SLM with the same group's alone. The LLM is
shared, so its scores are the same in every group's block.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

from fedcollm.algorithm.groups import role, slm_groups
from fedcollm.config import ConfigError, config_from_dict

SLM_ROLES = ("slm_global", "slm_clients")


def grouped_result(result_of, llm, parts: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """`result_of(llm, slm_global, slm_clients)` once for one group; with several, the LLM's
    at the top and each group's (global, clients) SLM scores under `groups`."""
    if len(parts) == 1:
        ((slm_global, slm_clients),) = parts.values()
        return result_of(llm, slm_global, slm_clients)
    result = result_of(llm, None, None)
    result["groups"] = {g: result_of(None, *scores) for g, scores in parts.items()}
    return result


def _group_row(row: dict[str, Any], group: str) -> dict[str, Any]:
    """A metrics row as a one-SLM run of `group` would have written it: its SLM's keys
    (`slm[<group>]_acc`, `adapter_params[<group>]`...) under the plain names, the other
    groups' left out."""
    own = re.escape(role(group))
    kept = {k: v for k, v in row.items() if not re.search(r"slm\[|\]$", k)}
    for key, value in row.items():
        renamed = re.sub(rf"^(distill_)?{own}_", r"\1slm_", key)
        renamed = renamed.removesuffix(f"[{group}]")
        if renamed != key:
            kept[renamed] = value
    return kept


def per_group(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each result of a grouped config as one result per group (above); others as they are."""
    expanded = []
    for result in results:
        try:
            groups = slm_groups(config_from_dict(result["config"]))
        except (KeyError, ConfigError):  # no config, or one no longer valid: as it is
            groups = []
        if len(groups) < 2:
            expanded.append(result)
            continue
        for group in groups:
            one = copy.deepcopy(result)
            one.pop("groups", None)
            one["task"] = f"{result['task']} [{group.name}]"
            one["config"]["slm"] = dataclasses.asdict(group.slm)
            own = (result.get("groups") or {}).get(group.name, {})
            for key in SLM_ROLES:
                one[key] = own.get(key)
                one.setdefault("predictions", {})[key] = own.get("predictions", {}).get(key)
            if "history" in one:
                one["history"] = [_group_row(row, group.name) for row in one["history"]]
            expanded.append(one)
    return expanded
