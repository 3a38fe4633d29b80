"""Every plot fedcollm draws starts here: matplotlib without a screen (Agg), the figure laid
out and saved, and closed however its drawing ends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def figure(path: Path, *grid: int, rect=None, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`plt.subplots(*grid, **subplots)` as (figure, axes), saved to `path` once the block
    has drawn (laid out tightly, within `rect` if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **subplots)
    try:
        yield fig, axes
        fig.tight_layout(**({"rect": rect} if rect else {}))
        fig.savefig(path)
    finally:
        plt.close(fig)
