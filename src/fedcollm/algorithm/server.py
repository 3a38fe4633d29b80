"""The server's side of Algorithm 1: the LLM with omega, its copy of the SLM with theta, D_a.

| paper                                   | code                        |
| --------------------------------------- | --------------------------- |
| f_psi (server LLM), omega (its LoRA)    | `llm`, `llm_adapter`        |
| g_phi (SLM), theta (global SLM LoRA)    | `slm`, `slm_adapter`        |
| theta_k (client k's LoRA)               | `ClientUpdate.adapter`      |
| D_k, D_a                                | `client_data`, `aux_data`   |
| lambda, temperature                     | `kd_weight`, `kd_temperature` |
| T rounds, E local epochs, R KD steps    | `rounds`, `local_epochs`, `kd_steps` |
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedcollm import seeds
from fedcollm.algorithm.aggregation import aggregation_rule
from fedcollm.algorithm.client import ClientUpdate
from fedcollm.algorithm.distillation import MutualDistillation
from fedcollm.algorithm.privacy import (
    PrivacyAccountant,
    add,
    clip_update,
    gaussian_noise,
    noise_key,
    noise_std,
)
from fedcollm.algorithm.ranks import flexlora, holder_share, per_slice_mean, product_error
from fedcollm.config import Config
from fedcollm.data import DataSplit, Example, Question, encode_examples, training_split
from fedcollm.data.alignment import AlignedExample, encode_aligned
from fedcollm.evaluation import Scores, score
from fedcollm.evaluation.generation import example_losses
from fedcollm.models import (
    Adapter,
    adapter_numel,
    build_llm,
    build_slm,
    get_adapter,
    save_adapter,
    set_adapter,
)
from fedcollm.models.vocabulary import (
    VocabularyMap,
    byte_lengths,
    check_cross_family,
    logits_width,
    same_vocabulary,
    vocabulary_map,
)


@dataclass
class ServerRound:
    """What steps 3-4 produced: theta before and after distillation, losses, timings."""

    aggregate: Adapter
    slm_adapter: Adapter
    losses: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    # What else the round measured (plain LoRA's aggregation error), for the metrics row.
    measured: dict[str, float] = field(default_factory=dict)


class CoTuningServer:
    """The LLM and omega are only ever read here; nothing in this class hands them out.

    `tokenizer` is the SLM's (the clients'), `llm_tokenizer` the LLM's; when they differ, D_a
    holds both tokenizations, aligned, and `vocabulary` maps one vocabulary to the other."""

    def __init__(
        self,
        config: Config,
        llm,
        slm,
        tokenizer,
        aux_data: Sequence[Example] | Sequence[AlignedExample],
        split: DataSplit,
        llm_tokenizer=None,
        vocabulary: VocabularyMap | None = None,
    ):
        self.config, self.llm, self.slm, self.tokenizer = config, llm, slm, tokenizer
        self.llm_tokenizer = llm_tokenizer or tokenizer
        self.aux_data, self.split = list(aux_data), split
        self.distillation = MutualDistillation(llm, slm, config.distill, config.optim, vocabulary)
        self.rule = aggregation_rule(config.client.aggregation)
        self.privacy = PrivacyAccountant(config)
        self.noise_label = "server"  # what DP's noise key is drawn for (a group: its own)

    @classmethod
    def from_config(
        cls,
        config: Config,
        progress: Callable[[str], None] = lambda _: None,
        llm: tuple | None = None,
    ) -> CoTuningServer:
        """The server of `config`; `llm`: an (LLM, tokenizer) already built (a grouped server
        shares one among its groups)."""
        llm, llm_tokenizer = llm or build_llm(config)
        slm, tokenizer = build_slm(config)
        questions, split = training_split(config)
        if same_vocabulary(llm_tokenizer, tokenizer):
            aux_data = encode_examples(questions, split.aux, tokenizer, config)
            return cls(config, llm, slm, tokenizer, aux_data, split)
        check_cross_family(config.distill)
        widths = [logits_width(m) for m in (llm, slm)]
        vocabulary = vocabulary_map(llm_tokenizer, tokenizer, *widths, progress=progress)
        aux_data = encode_aligned(
            questions,
            split.aux,
            tokenizer,
            llm_tokenizer,
            config,
            byte_lengths(tokenizer, widths[1]),
            byte_lengths(llm_tokenizer, widths[0]),
        )
        aligned = sum(len(e.slm_rows) for e in aux_data)
        answer = sum(sum(e.slm.answer_mask[1:]) for e in aux_data)
        progress(
            f"the tokenizers differ: distilling at the {aligned} of the SLM's {answer} answer "
            f"positions in D_a ({aligned / max(answer, 1):.0%}) where both start a token, "
            f"distance {config.distill.cross_tokenizer!r}"
        )
        return cls(config, llm, slm, tokenizer, aux_data, split, llm_tokenizer, vocabulary)

    @property
    def pad_id(self) -> int | tuple[int, int]:
        """The SLM's pad token; (the SLM's, the LLM's) when the tokenizers differ."""
        if self.llm_tokenizer is self.tokenizer:
            return self.tokenizer.pad_token_id
        return self.tokenizer.pad_token_id, self.llm_tokenizer.pad_token_id

    @property
    def slm_adapter(self) -> Adapter:
        return get_adapter(self.slm)

    def _weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        return self.rule.weights([u.num_examples for u in updates])

    def aggregate(
        self, updates: Sequence[ClientUpdate], broadcast: Adapter, server_round: int
    ) -> Adapter:
        """Step 3: the clients' adapters combined into one theta. Under DP without secure
        aggregation each update is clipped again (a client that did not clip gains nothing)
        and the noise is added to the sum: theta + (sum of clipped updates + N(0, (sigma
        C)^2)) / m."""
        privacy = self.config.privacy
        # Under secure aggregation (here: the in-process reference of it) the clients have
        # clipped and added their noise shares; clipping again would cut the noise.
        server_noise = privacy.enabled and not self.config.federation.secure_aggregation
        if server_noise:
            updates = [
                replace(u, adapter=clip_update(u.adapter, broadcast, privacy.clip_norm)[0])
                for u in updates
            ]
        aggregate = self.combine(updates, broadcast)
        if server_noise and privacy.noise_multiplier:
            key = noise_key(privacy, self.config.seed, server_round, self.noise_label)
            noise = gaussian_noise(aggregate, noise_std(self.config), key)
            aggregate = add(aggregate, noise, 1 / len(updates))
        return aggregate

    def combine(self, updates: Sequence[ClientUpdate], broadcast: Adapter) -> Adapter:
        """The rule's aggregate; with clients of several LoRA ranks each slice averaged over
        its holders, or FlexLoRA's refactorised mean product (algorithm/ranks.py)."""
        ranks = self._ranks(updates)
        if self.config.lora.rank_aggregation == "flexlora":
            adapters = [u.adapter for u in updates]
            return flexlora(adapters, self._weights(updates), ranks, self.config.lora.r)
        aggregate = self.rule.aggregate(updates, broadcast)
        if min(ranks) < self.config.lora.r:
            share = holder_share(ranks, self._weights(updates), self.config.lora.r)
            aggregate = per_slice_mean(aggregate, broadcast, share)
        return aggregate

    def _ranks(self, updates: Sequence[ClientUpdate]) -> list[int]:
        return [u.rank or self.config.lora.r for u in updates]

    def server_update(
        self,
        updates: Sequence[ClientUpdate],
        broadcast: Adapter,
        server_round: int,
        on_step: Callable | None = None,
    ) -> ServerRound:
        """Steps 3-4 on the updates of the theta `broadcast`; the returned `slm_adapter`
        (theta after distillation) is step 5's."""
        start = time.perf_counter()
        aggregate, measured = self.aggregate_round(updates, broadcast, server_round)
        result = self.co_tune(aggregate, server_round, on_step, time.perf_counter() - start)
        result.measured.update(measured)
        return result

    def aggregate_round(
        self, updates: Sequence[ClientUpdate], broadcast: Adapter, server_round: int
    ) -> tuple[Adapter, dict[str, float]]:
        """Step 3, and what it measured: plain LoRA's aggregation error, on what was sent
        (before DP's clipping)."""
        aggregate = self.aggregate(updates, broadcast, server_round)
        if self.config.lora.variant != "lora":
            return aggregate, {}
        clean = aggregate if not self.config.privacy.enabled else self.combine(updates, broadcast)
        error = product_error(
            [u.adapter for u in updates], self._weights(updates), self._ranks(updates), clean
        )
        return aggregate, {"lora_aggregation_error": error}

    def broadcast_to(self, partition: int, slm_adapter: Adapter) -> Adapter:
        """What client `partition` receives: theta (a grouped server sends a part)."""
        return slm_adapter

    def slm_params(self) -> int:
        """The SLM's base parameters (LoRA's excluded)."""
        return sum(p.numel() for name, p in self.slm.named_parameters() if "lora_" not in name)

    def sizes(self, slm_adapter: Adapter) -> dict[str, int]:
        """theta's parameters and the SLM's, for the metrics row (communication's share)."""
        return {"adapter_params": adapter_numel(slm_adapter), "slm_params": self.slm_params()}

    def co_tune(
        self,
        aggregate: Adapter,
        server_round: int,
        on_step: Callable | None = None,
        aggregation_seconds: float = 0.0,
    ) -> ServerRound:
        """Step 4 from an aggregate theta (secure aggregation hands over only that)."""
        start = time.perf_counter()
        set_adapter(self.slm, aggregate)
        seconds = {"aggregation": aggregation_seconds + time.perf_counter() - start}
        start = time.perf_counter()
        losses: dict[str, float] = {}
        if self.config.distill.enabled:
            seed = seeds.distillation_round(self.config.seed, server_round)
            losses = self.distillation.run(self.aux_data, self.pad_id, seed, on_step).means()
        seconds["distillation"] = time.perf_counter() - start
        return ServerRound(aggregate, self.slm_adapter, losses, seconds)

    def evaluate(
        self, questions: Sequence[Question], roles: Sequence[str] = ("llm", "slm")
    ) -> dict[str, Scores]:
        """The task's metrics of the LLM (with omega) and/or of the global SLM (with theta)."""
        models = {"llm": (self.llm, self.llm_tokenizer), "slm": (self.slm, self.tokenizer)}
        return {role: score(*models[role], self.config, questions) for role in roles}

    def aux_losses(self, roles: Sequence[str] = ("llm", "slm")) -> dict[str, float]:
        """Each model's mean answer loss on D_a (the per-example mean token loss, as
        `target_loss`): which of the two knows D_a's answers better, the premise of
        distilling the LLM into the SLM."""
        batch_size = self.config.eval.batch_size
        if not self.aux_data:
            return {}
        if self.llm_tokenizer is self.tokenizer:
            slm_data = llm_data = self.aux_data
        else:
            slm_data, llm_data = [e.slm for e in self.aux_data], [e.llm for e in self.aux_data]
        losses = {}
        for role, model, data, tokenizer in (
            ("llm", self.llm, llm_data, self.llm_tokenizer),
            ("slm", self.slm, slm_data, self.tokenizer),
        ):
            if role not in roles:
                continue
            per_example = example_losses(model, data, tokenizer.pad_token_id, batch_size)
            losses[f"{role}_aux_loss"] = statistics.fmean(per_example)
        return losses

    def state_dict(self) -> dict[str, Any]:
        """What the next round needs of the server: theta, omega and the LLM's optimiser (the
        SLM's is made anew each round)."""
        return {
            "slm_adapter": get_adapter(self.slm),
            "llm_adapter": get_adapter(self.llm),
            "llm_optimizer": self.distillation.llm_optimizer.state_dict(),
            "privacy": self.privacy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_adapter(self.slm, state["slm_adapter"])
        set_adapter(self.llm, state["llm_adapter"])
        self.distillation.llm_optimizer.load_state_dict(state["llm_optimizer"])
        # A checkpoint from before DP existed spent no privacy.
        self.privacy.load_state_dict(state.get("privacy", {"rounds": 0}))

    def save_adapters(self, out_dir: Path) -> None:
        save_adapter(self.slm, out_dir / "adapters" / "slm")
        save_adapter(self.llm, out_dir / "adapters" / "llm")
