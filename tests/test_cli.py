"""The `fedcollm evaluate` command on a tiny model (once as its own process)."""

from __future__ import annotations

import json
import subprocess
import sys

from fedcollm import cli


def fedcollm(*args):
    return subprocess.run(
        [sys.executable, "-m", "fedcollm.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_evaluate_prints_one_json_object(data_dir):
    result = fedcollm(
        "evaluate",
        "--model",
        "tiny",
        "--task",
        "openbookqa",
        "--data-dir",
        str(data_dir),
        "--limit",
        "5",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["n"] == 5 and summary["task"] == "openbookqa"
    assert 0 <= summary["acc"] <= 1 and 0 <= summary["acc_norm"] <= 1


def test_evaluate_rejects_an_unknown_task_and_a_missing_adapter(data_dir, tmp_path, capsys):
    assert cli.main(["evaluate", "--model", "tiny", "--task", "piqa"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --task: unknown task 'piqa'; choose one of arc_challenge, arc_easy, "
        "code_alpaca, commonsense_qa, medmcqa, mmlu, mmlu_humanities, mmlu_social_sciences, "
        "mmlu_stem, openbookqa, self_instruct, tfns, vell_fruits, or give the path of a task "
        "file (.yaml)"
    ]
    args = ["--task", "arc_easy", "--data-dir", str(data_dir), "--adapter", str(tmp_path)]
    assert cli.main(["evaluate", "--model", "tiny", *args, "--limit", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "adapter_config.json" in line
