"""The client side without Flower's runtime: which data a node trains on."""

from __future__ import annotations

from pathlib import Path

from fedcollm.config import load_config
from fedcollm.federation.client_app import client_state

TINY = Path(__file__).parents[1] / "configs" / "tiny.toml"


def test_a_node_with_its_own_data_trains_on_all_of_it(tmp_path, data_dir):
    rows = (data_dir / "arc_easy" / "train.jsonl").read_text().splitlines()[:7]
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "train.jsonl").write_text("\n".join(rows) + "\n")
    config = load_config(TINY, data_dir=str(tmp_path), overrides=["data.train_limit=0"])
    own, _ = client_state(config, partition=1, own_data=True)
    assert len(own.client_data) == 7
    # Without own-data the node takes its share of the seeded split: 7 rows, 3 clients + D_a.
    share, _ = client_state(config, partition=1)
    assert 0 < len(share.client_data) < 7
