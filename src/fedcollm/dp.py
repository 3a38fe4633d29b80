"""What client-level DP spends: epsilon after some rounds of the Gaussian mechanism on the
clipped sum, by Google's RDP accountant (`dp-accounting`). Below every layer, so that the
config can refuse a budget the first round already breaks and the server can count rounds
(`algorithm/privacy.py`) with one formula."""

from __future__ import annotations

import math


def epsilon(
    noise_multiplier: float, delta: float, population: int, sampled: int, rounds: int
) -> float:
    """Epsilon at `delta` after `rounds` rounds, each sampling `sampled` of `population`
    clients without replacement (amplification when fewer than all); inf without noise."""
    if rounds == 0:
        return 0.0
    if not noise_multiplier:
        return math.inf
    from dp_accounting import dp_event  # a second's import: DP runs only
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    # Replace-one neighbours: the clipped sum moves by up to 2C, so sigma C of noise is a
    # noise multiplier of sigma / 2 against that sensitivity.
    event = dp_event.GaussianDpEvent(noise_multiplier / 2)
    if sampled < population:
        event = dp_event.SampledWithoutReplacementDpEvent(population, sampled, event)
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))
