"""The client side without Flower's runtime: which data a node trains on."""

from __future__ import annotations

import json
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


def test_a_node_with_its_own_data_reads_a_task_files_rows_from_its_own_directory(tmp_path):
    """A task file's relative data files are read under the node's data directory."""
    task = tmp_path / "task.yaml"
    task.write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        "    train: rows/train.jsonl\n    validation: rows/validation.jsonl\n"
        "output_type: multiple_choice\ntraining_split: train\nvalidation_split: validation\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{opts}}'\ndoc_to_target: ans\n"
    )
    node = tmp_path / "node"
    (node / "rows").mkdir(parents=True)
    rows = [{"q": f"Question {i}?", "opts": ["yes", "no"], "ans": i % 2} for i in range(5)]
    (node / "rows" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (node / "rows" / "validation.jsonl").write_text(json.dumps(rows[0]) + "\n")
    config = load_config(
        TINY, data_dir=str(node), overrides=[f'task="{task}"', "data.train_limit=0"]
    )
    own, _ = client_state(config, partition=0, own_data=True)
    assert len(own.client_data) == 5
