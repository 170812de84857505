"""Records from a local file, each with where it came from (``path:line`` or ``path: row N``) for error messages.

    for where, record in read_records("pairs.jsonl"):     # JSONL (.jsonl, .jsonl.gz, .json) or Parquet
        ...

Used by post-training (chat and preference data) and evaluation (task files).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from llamaherd.errors import HerdError


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every row of a JSONL (``.jsonl``, ``.jsonl.gz``) or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise HerdError(f"{path}: file not found")
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise HerdError(f"{path}: reading Parquet needs pyarrow (pip install 'llamaherd[data]')") from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {i}", row
        return
    if not name.endswith((".jsonl", ".jsonl.gz", ".json")):
        raise HerdError(f"{path}: expected a .jsonl, .jsonl.gz or .parquet file")
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise HerdError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise HerdError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
