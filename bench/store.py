"""The results table on disk: one CSV per device (one row per cell), written atomically.

``results/<device>/cells.csv`` holds the tidy table, ``results/<device>/environment.json`` what
it was measured on. Every write goes to a temporary file in the same folder and is renamed over
the old one, so a sweep killed mid-write leaves the previous complete table, never half a file.

Reading checks what it reads: a CSV that is not such a table (another program's, a damaged one)
or an environment.json that is not a JSON object raises ``ResultsError``, one line naming the
file and the first problem.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

TABLE_NAME = "cells.csv"
ENVIRONMENT_NAME = "environment.json"

#: the columns that identify a cell of a case as built
KEY = ("device", "case", "implementation", "quantity", "batch_size")
#: ... and every cell: KEY and the precision it ran in (``bench.precision.label``), last, so that
#: code reading KEY's positions in an identity reads the same values
IDENTITY = (*KEY, "dtype")

#: the dtype of a row that has none: tables written before the column existed held the bench
#: cases as built, all float32
DEFAULT_DTYPE = "float32"

#: every column of the table, in order (times in seconds, memory in bytes)
COLUMNS = (
    *IDENTITY,
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

#: numeric columns: a number >= 0 or empty (batch_size: a whole number >= 1, never empty)
NUMBER_COLUMNS = (
    "batch_size",
    "time_median_s",
    "time_iqr_s",
    "plain_median_s",
    "plain_iqr_s",
    "ratio",
    "n_samples",
    "memory_peak_bytes",
    "plain_peak_bytes",
    "memory_ratio",
    "check_error",
    "threads",
    "wall_s",
)

#: the largest batch size a table holds (``correctness.cli.MAX_BATCH_SIZE``)
MAX_BATCH_SIZE = 2**31 - 1

#: what a cell's ``status`` can be
STATUSES = ("ok", "unsupported", "oom", "timeout", "skipped", "error")


class ResultsError(ValueError):
    """A results file that is not what pegbench writes: one line naming it and the problem."""


def cell_key(row) -> tuple:
    """The identifying tuple of a row, the values of IDENTITY (a dict or a pandas Series; no
    dtype: DEFAULT_DTYPE)."""
    return (*(int(row[k]) if k == "batch_size" else str(row[k]) for k in KEY), _dtype(row))


def _dtype(row) -> str:
    value = row.get("dtype")
    return DEFAULT_DTYPE if value is None or pd.isna(value) or value == "" else str(value)


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
    frame["dtype"] = frame["dtype"].where(frame["dtype"].notna(), DEFAULT_DTYPE)
    return frame[list(COLUMNS)]


def read_table(path: Path) -> pd.DataFrame:
    """A table written by ``ResultStore`` (empty with the right columns if there is none).

    Raises ``ResultsError`` naming the file and its first problem when it is not such a table:
    unreadable, missing columns, a key left empty, a batch size that is not a whole number
    >= 1, an unknown status, a number column holding anything but a number >= 0, or one cell
    twice.
    """
    path = Path(path)
    if not path.exists():
        return to_frame([])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:  # pandas' parser errors and UTF-8 errors included
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ResultsError(
            f"{path}: not a readable CSV table ({type(error).__name__}: {message})"
        ) from None
    return _checked(raw, path)


def _checked(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The table's columns with their types, or ``ResultsError`` at the first problem."""
    if "dtype" not in raw.columns:  # written before the dtype axis: float32 cases as built
        raw = raw.assign(dtype=DEFAULT_DTYPE)
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ResultsError(
            f"{path}: not a pegbench results table: no column '{missing[0]}'{more}; "
            "a table has the columns of bench.store.COLUMNS"
        )
    frame = raw[list(COLUMNS)].copy()
    problems: list[tuple[int, str]] = []  # (row position, problem)

    def first(mask: pd.Series, describe) -> None:
        bad = mask.to_numpy().nonzero()[0]
        if len(bad):
            problems.append((int(bad[0]), describe(int(bad[0]))))

    for column in IDENTITY:
        values = frame[column]
        first(values.str.strip() == "", lambda i, c=column: f"{c} is empty")
        if column in ("device", "case", "implementation"):  # folder and file names
            unsafe = values.str.contains(r"[/\\]", regex=True) | values.isin([".", ".."])
            first(unsafe, lambda i, c=column: f"{c} {frame[c].iloc[i]!r} is not a plain name")
    first(
        ~frame["status"].isin(STATUSES),
        lambda i: f"status {frame['status'].iloc[i]!r} is not one of {', '.join(STATUSES)}",
    )
    for column in NUMBER_COLUMNS:
        text = frame[column].str.strip()
        values = pd.to_numeric(text.where(text != ""), errors="coerce")
        if column == "batch_size":
            whole = (values == values.round()) & (values >= 1) & (values <= MAX_BATCH_SIZE)
            bad = ~whole
            allowed = f"a whole number from 1 to {MAX_BATCH_SIZE}"
        else:
            bad = (text != "") & ~(values >= 0)
            allowed = "a number >= 0 or empty"
        first(bad, lambda i, c=column, a=allowed: f"{c} {raw[c].iloc[i]!r} is not {a}")
        frame[column] = values
    if problems:
        row, problem = min(problems)
        raise ResultsError(f"{path}: line {row + 2}: {problem}")
    frame["batch_size"] = frame["batch_size"].astype("int64")
    duplicated = frame.duplicated(list(IDENTITY)).to_numpy().nonzero()[0]
    if len(duplicated):
        row = int(duplicated[0])
        cell = " ".join(str(frame[k].iloc[row]) for k in IDENTITY)
        raise ResultsError(f"{path}: line {row + 2}: the cell {cell} appears twice")
    for column in COLUMNS:
        if column not in NUMBER_COLUMNS and column not in TEXT_COLUMNS:
            frame[column] = frame[column].where(frame[column] != "", math.nan)
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
    """The rows of one device's table, saved after every cell.

    ``keep=True`` starts from the rows already on disk: a sweep replaces the rows of the cells
    it measures and keeps every other one (``bench.sweep.Sweep.run`` skips the cells present,
    unless told to measure them again). ``keep=False`` starts an empty table. Nothing is written
    before the first ``add``, so a sweep that fails before its first cell leaves the files as
    they were; ``environment``, when set, is written beside the table at that first save.
    """

    def __init__(self, folder: Path, keep: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / TABLE_NAME
        self.rows: dict[tuple, dict] = {}
        self.environment: dict | None = None
        self._environment_written = False
        if keep:
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
        if self.environment is not None and not self._environment_written:
            self.write_environment(self.environment)
            self._environment_written = True
        write_atomically(self.path, self.frame().to_csv(index=False))

    def write_environment(self, environment: dict) -> None:
        write_atomically(
            self.folder / ENVIRONMENT_NAME, json.dumps(environment, indent=2, default=str) + "\n"
        )


def read_environment(folder: Path) -> dict:
    """``<folder>/environment.json`` ({} when there is none); ``ResultsError`` when it is not
    the JSON object a sweep writes."""
    path = Path(folder) / ENVIRONMENT_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSON and UTF-8 errors are ValueErrors
        raise ResultsError(f"{path}: not readable JSON ({error})") from None
    problem = _environment_problem(data)
    if problem:
        raise ResultsError(f"{path}: {problem}")
    return data


def _environment_problem(data) -> str | None:
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object describing a sweep"
    for name in ("versions", "settings", "gpu"):
        if data.get(name) is not None and not isinstance(data[name], dict):
            return f"'{name}' is not an object"
    previous = data.get("previous", [])
    if not isinstance(previous, list) or not all(isinstance(p, dict) for p in previous):
        return "'previous' is not a list of objects"
    return None
