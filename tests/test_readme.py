"""The README's "Your own data" section does what it says: its files written as shown, its
commands run as shown, in an empty directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def files_and_commands(text: str) -> tuple[dict[str, str], list[str]]:
    """Each "`path`:" paragraph's fenced block is a file; each sh block holds commands."""
    files = dict(re.findall(r"^`([^`\n]+)`:\n\n```\w+\n(.*?)```", text, flags=re.S | re.M))
    commands = [
        line
        for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    return files, commands


def test_the_section_has_files_and_commands():
    files, commands = files_and_commands(section("Your own data"))
    assert set(files) == {
        "my_data/train.jsonl",
        "my_data/validation.jsonl",
        "my_task.yaml",
        "my_run.toml",
    }
    assert [c.split()[1] for c in commands] == ["tasks", "evaluate", "run"]


@pytest.mark.slow
def test_your_own_data_from_a_jsonl_file_to_a_co_tuning_run(tmp_path, monkeypatch, capsys):
    """Each command as `fedcollm` runs it (`cli.main`, in this process: the entry point's
    own process is test_cli's)."""
    from fedcollm import cli

    files, commands = files_and_commands(section("Your own data"))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    outputs = []
    for command in commands:
        program, *argv = command.split()
        assert program == ".venv/bin/fedcollm", command
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"{command}\n{err[-2000:]}"
        outputs.append(out)
    assert "my_task" in outputs[0] and "multiple_choice" in outputs[0]
    assert "acc_stderr" in outputs[1] and "majority" in outputs[1]
    run = tmp_path / "runs" / "my_run"
    partition = json.loads((run / "partition.json").read_text())
    assert set(partition["assignment"]) == {"north", "south"}
    assert sorted(partition["assignment"].values()) == [0, 1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[-1]["eval_questions"] == 2
    assert (run / "adapters" / "slm" / "adapter_config.json").is_file()
