"""The rows of a task's data files: JSON Lines, JSON, CSV or Parquet on local disk.

JSON and JSON Lines are read here, line by line, so that a bad row is named by its file and
line and no copy of private data lands in a cache; CSV and Parquet go through `datasets`
(its types, as lm-eval sees them) with the cache kept in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcollm.errors import DataError  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Row:
    doc: dict[str, Any]
    where: str  # "file:line", for error messages


def _utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None


def _json_rows(path: Path) -> list[Row]:
    text = _utf8(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            docs = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        rows = [Row(doc, f"{path}[{i}]") for i, doc in enumerate(docs)]
    else:
        rows = []
        # Split on newlines only: JSON strings may hold other line separators (U+2028).
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(Row(json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not a JSON object ({err.msg}); a .jsonl file holds one "
                    "JSON object per line"
                ) from None
    for row in rows:
        if not isinstance(row.doc, dict):
            raise DataError(f"{row.where}: not a JSON object but {type(row.doc).__name__}")
    return rows


def _table_rows(path: Path, kind: str) -> list[Row]:
    import datasets  # imported here: only CSV and Parquet files pay for it

    if kind == "csv":
        _utf8(path)
    datasets.disable_progress_bars()
    reader = datasets.Dataset.from_csv if kind == "csv" else datasets.Dataset.from_parquet
    try:
        table = reader(str(path), keep_in_memory=True)
    except Exception as err:  # noqa: BLE001 - whatever pandas or arrow say, the file is bad
        raise DataError(f"{path}: not a readable {kind.upper()} file ({err})") from None
    # A CSV's first line is its header: row i is on line i + 2.
    offset = 2 if kind == "csv" else 0
    return [Row(dict(doc), f"{path}:{i + offset}") for i, doc in enumerate(table)]


FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_rows(path: Path, builder: str = "") -> list[Row]:
    """Every row of one data file; its format from `builder` (a task's `dataset_path`:
    json, csv, parquet) or else from its suffix."""
    kind = builder if builder in ("json", "csv", "parquet") else FORMATS.get(path.suffix)
    if kind is None:
        raise DataError(
            f"{path}: not a JSON, JSON Lines, CSV or Parquet file; convert it, or name it "
            "with one of the suffixes .jsonl .json .csv .parquet"
        )
    if not path.is_file():
        raise DataError(f"{path} does not exist; check the task's data_files and --data-dir")
    rows = _json_rows(path) if kind == "json" else _table_rows(path, kind)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows
