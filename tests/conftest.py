"""Shared fixtures: the real QA data, read from the workspace's shared data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

# <workspace>/shared/data/<task>/{train,validation}.jsonl in hub layout (see its README.md).
DATA_DIR = Path(__file__).parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory; tests that need it are skipped where it is missing."""
    if not (DATA_DIR / "arc_easy" / "train.jsonl").is_file():
        pytest.skip(
            f"QA data not found at {DATA_DIR}: expected <task>/train.jsonl there "
            "(the workspace's shared/data directory)"
        )
    return DATA_DIR
