"""The regression gate's baseline files: ``results/baseline-<device>-<processor>.json``, one per
processor model (``baseline_for``).

Time ratios to a plain step depend on the processor (the fused LSTM kernel is 1.3-1.6x faster,
against everything else, on one 2-core machine kind than on another), so a run's times are held
to the baseline of its own processor; the counters do not depend on it and are held to any
baseline of the same torch build.

A JSON object: ``format`` (``BASELINE_FORMAT``), ``regenerate_with``, the ``environment`` and
``settings`` of the run that measured it, and ``cells``, one object per gate cell (the fields of
``bench.gate.CellResult``). ``load_baseline`` checks every field it reads and raises
``BaselineError`` with one line naming the file and the first problem; ``write_baseline``
writes atomically.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from bench.gate import CellResult

BASELINE_FORMAT = "pegbench-regress-baseline/2"
UPDATE_COMMAND = "python -m bench regress --update-baseline"


def processor_slug(processor: str) -> str:
    """``"Intel(R) Xeon(R) Processor"`` -> ``"intel-r-xeon-r-processor"``."""
    return re.sub(r"[^a-z0-9]+", "-", processor.lower()).strip("-") or "unknown"


def default_baseline(device: str = "cpu", processor: str | None = None) -> Path:
    """The baseline file of this device type and processor (``--update-baseline`` writes it)."""
    import torch

    from bench.environment import cpu_model

    slug = processor_slug(cpu_model() if processor is None else processor)
    return Path("results") / f"baseline-{torch.device(device).type}-{slug}.json"


def baseline_for(device: str = "cpu", processor: str | None = None) -> Path:
    """The baseline to compare with: this processor's when there is one, else another
    processor's of the same device type (its counters are still compared, its times are not:
    ``bench.regress.times_comparable``); this processor's path when there is none at all."""
    import torch

    own = default_baseline(device, processor)
    if own.exists():
        return own
    others = sorted(Path("results").glob(f"baseline-{torch.device(device).type}-*.json"))
    return others[0] if others else own


@dataclass
class Baseline:
    """The committed reference: cells plus the environment and settings they were measured in."""

    cells: list[CellResult]
    environment: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": BASELINE_FORMAT,
            "regenerate_with": UPDATE_COMMAND,
            "environment": self.environment,
            "settings": self.settings,
            "cells": [cell_to_json(c) for c in self.cells],
        }


class BaselineError(Exception):
    """A baseline file that is missing or unreadable (one line, for the command line)."""


def cell_to_json(cell: CellResult) -> dict:
    data = asdict(cell)
    data["ratio_samples"] = [float(f"{x:.6g}") for x in cell.ratio_samples]
    return data


_TEXT = ("case", "implementation", "quantity", "status", "reason", "counts_note")
_NUMBERS = (
    "ratio",
    "memory_ratio",
    "memory_peak_bytes",
    "plain_peak_bytes",
    "time_median_s",
    "plain_median_s",
    "flops",
    "aten_ops",
    "allocated_bytes",
    "spread",
)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cell_from_json(data) -> CellResult:
    """A ``CellResult`` from its JSON object; ``ValueError`` naming the first bad field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a cell must be an object, not {type(data).__name__}")
    for name in ("case", "implementation", "quantity", "batch_size", "status"):
        if name not in data:
            raise ValueError(f"a cell has no '{name}'")
    for name in _TEXT:
        if name in data and not isinstance(data[name], str):
            raise ValueError(f"'{name}' must be a string, got {data[name]!r}")
    batch_size = data["batch_size"]
    if not (_is_number(batch_size) and batch_size == int(batch_size) and batch_size >= 1):
        raise ValueError(f"'batch_size' must be a whole number >= 1, got {batch_size!r}")
    for name in _NUMBERS:
        value = data.get(name)
        if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"'{name}' must be a number >= 0 or null, got {value!r}")
    if data.get("ratio") == 0:  # the gate divides by it
        raise ValueError("'ratio' must be a number > 0 or null, got 0")
    samples = data.get("ratio_samples", [])
    if not isinstance(samples, list) or not all(
        _is_number(x) and math.isfinite(x) and x >= 0 for x in samples
    ):
        raise ValueError(f"'ratio_samples' must be a list of numbers >= 0, got {samples!r}")
    known = {f.name for f in fields(CellResult)}
    values = {k: v for k, v in data.items() if k in known}
    values["batch_size"] = int(batch_size)
    values["ratio_samples"] = tuple(float(x) for x in samples)
    return CellResult(**values)


def _where(cell) -> str:
    if isinstance(cell, Mapping):
        return " ".join(str(cell.get(k, "?")) for k in ("implementation", "case", "batch_size"))
    return "?"


def load_baseline(path: Path) -> Baseline:
    path = Path(path)
    if not path.exists():
        raise BaselineError(f"no baseline at {path}: create one with {UPDATE_COMMAND}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        if data.get("format") != BASELINE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {BASELINE_FORMAT!r}")
        for name in ("environment", "settings"):
            if not isinstance(data.get(name, {}), dict):
                raise ValueError(f"'{name}' is not an object")
        if not isinstance(data.get("cells"), list):
            raise ValueError("no list of 'cells'")
        cells = []
        for index, cell in enumerate(data["cells"]):
            try:
                cells.append(cell_from_json(cell))
            except ValueError as error:
                raise ValueError(f"cell {index} ({_where(cell)}): {error}") from None
    except (OSError, ValueError) as error:  # JSON and UTF-8 errors are ValueErrors
        raise BaselineError(
            f"baseline {path} is unreadable ({error}): regenerate it with {UPDATE_COMMAND}"
        ) from error
    return Baseline(cells, data.get("environment", {}), data.get("settings", {}))


def write_baseline(path: Path, baseline: Baseline) -> None:
    from bench.store import write_atomically

    write_atomically(Path(path), json.dumps(baseline.to_json(), indent=1, default=str) + "\n")
