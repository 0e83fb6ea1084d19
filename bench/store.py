"""The results table on disk: one CSV per device (one row per cell), written atomically.

``results/<device>/cells.csv`` holds the tidy table, ``results/<device>/environment.json`` what
it was measured on. Every write goes to a temporary file in the same folder and is renamed over
the old one, so a sweep killed mid-write leaves the previous complete table, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

TABLE_NAME = "cells.csv"
ENVIRONMENT_NAME = "environment.json"

#: the columns that identify a cell
KEY = ("device", "case", "implementation", "quantity", "batch_size")

#: every column of the table, in order (times in seconds, memory in bytes)
COLUMNS = (
    *KEY,
    "status",  # ok | unsupported | oom | timeout | skipped | error
    "reason",  # why a cell is not ok, in one line
    "time_median_s",  # median seconds per call of the implementation
    "time_iqr_s",  # interquartile range of those seconds
    "plain_median_s",  # median seconds of a plain forward + loss.sum().backward()
    "plain_iqr_s",
    "ratio",  # time_median_s / plain_median_s
    "flags",  # e.g. "noisy" when IQR/median > 10% on either side
    "n_samples",  # number of per-call times behind the median
    "samples_s",  # the per-call times, space-separated (for rank tests)
    "plain_samples_s",
    "memory_peak_bytes",  # peak above the pre-call baseline of one call
    "plain_peak_bytes",  # the same for the plain step
    "memory_ratio",  # memory_peak_bytes / plain_peak_bytes
    "memory_note",  # why memory is missing, if it is
    "correct",  # oracle check of the group: ok | WRONG | unsupported | error | timeout | unchecked
    "check_error",  # max relative error of that check
    "threads",  # torch intra-op threads during the measurement
    "wall_s",  # wall seconds the whole cell took
    "measured_at",  # UTC timestamp
)


#: free-text columns: read back as strings, empty rather than NaN
TEXT_COLUMNS = ("reason", "flags", "memory_note", "samples_s", "plain_samples_s")


def cell_key(row) -> tuple:
    """The identifying tuple of a row (a dict or a pandas Series)."""
    return tuple(int(row[k]) if k == "batch_size" else str(row[k]) for k in KEY)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows (dicts) as a DataFrame with exactly the table's columns, in order."""
    frame = pd.DataFrame(list(rows))
    for column in COLUMNS:
        if column not in frame:
            frame[column] = pd.NA
    return frame[list(COLUMNS)]


def read_table(path: Path) -> pd.DataFrame:
    """A table written by ``ResultStore`` (empty with the right columns if there is none)."""
    path = Path(path)
    if not path.exists():
        return to_frame([])
    frame = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
    for column in TEXT_COLUMNS:
        if column in frame:
            frame[column] = frame[column].fillna("")
    return to_frame(frame.to_dict("records"))


def read_tables(root: Path) -> pd.DataFrame:
    """Every ``<root>/<device>/cells.csv`` concatenated."""
    frames = [read_table(p) for p in sorted(Path(root).glob(f"*/{TABLE_NAME}"))]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else to_frame([])


def samples(text) -> list[float]:
    """Per-call seconds back from a ``samples_s`` cell."""
    if not isinstance(text, str) or not text.strip():
        return []
    return [float(x) for x in text.split()]


class ResultStore:
    """The rows of one device's sweep, saved after every cell.

    ``resume=True`` keeps the rows already on disk (their cells are not measured again);
    otherwise the table starts empty and replaces the old one at the first save.
    """

    def __init__(self, folder: Path, resume: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / TABLE_NAME
        self.rows: dict[tuple, dict] = {}
        if resume:
            for row in read_table(self.path).to_dict("records"):
                self.rows[cell_key(row)] = row

    def __contains__(self, key: tuple) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: tuple) -> dict | None:
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        """Record a measured cell and save the whole table atomically."""
        self.rows[cell_key(row)] = row
        self.save()

    def frame(self) -> pd.DataFrame:
        return to_frame(self.rows.values())

    def save(self) -> None:
        write_atomically(self.path, self.frame().to_csv(index=False))

    def write_environment(self, environment: dict) -> None:
        write_atomically(
            self.folder / ENVIRONMENT_NAME, json.dumps(environment, indent=2, default=str) + "\n"
        )


def read_environment(folder: Path) -> dict:
    path = Path(folder) / ENVIRONMENT_NAME
    return json.loads(path.read_text()) if path.exists() else {}
