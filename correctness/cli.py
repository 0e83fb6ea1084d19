"""What every command line of pegbench shares (``python -m bench ...``, ``python -m correctness``).

- ``Parser``: an ``argparse.ArgumentParser`` whose errors are one line, ``COMMAND: message``
  (no usage block), raised as ``UsageError``; ``fail`` prints one and returns exit code 2;
  ``usage(COMMAND)`` turns the ``ValueError`` of a command's own checks into one;
- argument types that check a number's range and say what is allowed (``whole``, ``number``);
  the same checks for keyword arguments (``check_whole``, ``check_number``);
- ``add_impls_argument`` and ``check_known`` (the ``--impls`` option and its name check),
  ``add_threads_argument``;
- ``check_device``; ``check_output_folder`` / ``check_output_file``: where a command writes;
- ``text_table``: plain aligned columns for terminal output.

Deliberately light (the standard library; torch only inside ``check_device`` and
``add_threads_argument``). It lives in
``correctness`` because both ``python -m correctness`` and ``bench`` use it and the packages'
layering is bench -> correctness -> impls: nothing below imports from above.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

#: the largest batch size any command accepts (an int32: what every table and tensor can hold)
MAX_BATCH_SIZE = 2**31 - 1
#: the most torch intra-op threads a command accepts (torch crashes far above the cores)
MAX_THREADS = 1024
#: the most seconds a time option accepts (a cell budget, a round): beyond, SIGALRM overflows
MAX_SECONDS = 1e6


class UsageError(Exception):
    """Bad input to a command: the message is one line for stderr, the exit code 2."""


def one_line(text: str) -> str:
    """``text`` with line breaks shown as ``\\n``: an error message stays on one line."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def fail(error: UsageError) -> int:
    """Print a usage error (one line) on stderr; return the exit code, 2."""
    print(one_line(str(error)), file=sys.stderr)
    return 2


@contextlib.contextmanager
def usage(command: str) -> Iterator[None]:
    """Turn a ``ValueError`` raised by a command's checks into ``UsageError("COMMAND: ...")``."""
    try:
        yield
    except ValueError as error:
        raise UsageError(f"{command}: {error}") from None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ``UsageError("COMMAND: message")``, COMMAND being
    the last word of ``prog`` ("python -m bench compare" -> "compare"). Subparsers made with
    ``add_subparsers`` are of the same class."""

    def error(self, message: str):  # argparse's hook: it must not return
        raise UsageError(f"{self.prog.split()[-1]}: {message}")


# -- numbers -------------------------------------------------------------------------------------


def _allowed(least=None, above=None, most=None, whole_number=False) -> str:
    """``a whole number from 1 to 1024``, ``a number > 0 and <= 1e+06``, ``a number >= 0``."""

    def show(bound) -> str:
        return f"{bound:g}" if isinstance(bound, float) else str(bound)

    kind = "a whole number" if whole_number else "a number"
    if least is not None and most is not None:
        return f"{kind} from {show(least)} to {show(most)}"
    signs = ((">=", least), (">", above), ("<=", most))
    bounds = [f"{sign} {show(bound)}" for sign, bound in signs if bound is not None]
    return f"{kind} {' and '.join(bounds)}".strip()


def check_whole(name: str, value, least: int | None = 1, most: int | None = None) -> int:
    """``value`` as an int in [least, most]; ``ValueError("NAME must be ...; got ...")``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and (least is None or value >= least) and (most is None or value <= most)
    if not ok:
        allowed = _allowed(least=least, most=most, whole_number=True)
        raise ValueError(f"{name} must be {allowed}; got {value!r}".lstrip())
    return int(value)


def check_number(
    name: str,
    value,
    least: float | None = None,
    above: float | None = None,
    most: float | None = None,
) -> float:
    """``value`` as a finite float within the bounds; ``ValueError`` naming ``name`` if not."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (least is None or value >= least) and (above is None or value > above)
    ok = ok and (most is None or value <= most)
    if not ok:
        allowed = _allowed(least=least, above=above, most=most)
        raise ValueError(f"{name} must be {allowed}; got {value!r}".lstrip())
    return float(value)


def whole(least: int | None = 1, most: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in [least, most], or an error saying so."""

    def parse(text: str) -> int:
        try:
            return check_whole("", int(text), least, most)
        except ValueError:
            allowed = _allowed(least=least, most=most, whole_number=True)
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}") from None

    parse.__name__ = "whole number"
    return parse


def number(
    least: float | None = None, above: float | None = None, most: float | None = None
) -> Callable[[str], float]:
    """An argparse ``type``: a finite number within the bounds, or an error saying so."""

    def parse(text: str) -> float:
        try:
            return check_number("", float(text), least, above, most)
        except ValueError:
            allowed = _allowed(least=least, above=above, most=most)
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}") from None

    parse.__name__ = "number"
    return parse


#: the argparse types of the options every command shares
BATCH_SIZE = whole(1, MAX_BATCH_SIZE)
THREADS = whole(1, MAX_THREADS)
ROUNDS = whole(1)
SECONDS = number(above=0, most=MAX_SECONDS)


# -- names ---------------------------------------------------------------------------------------


def add_impls_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--impls`` / ``--implementations`` NAME ... (dest ``impls``, default None)."""
    parser.add_argument(
        "--impls", "--implementations", dest="impls", nargs="+", default=None, help=help
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (torch intra-op threads; default None: torch's current setting)."""
    import torch

    parser.add_argument(
        "--threads",
        type=THREADS,
        default=None,
        help=f"torch intra-op threads (default {torch.get_num_threads()})",
    )


def check_known(kind: str, names: Iterable[str] | None, known: Sequence[str]) -> None:
    """``ValueError("unknown KIND 'NAME'; known: ...")`` for the first name not in ``known``."""
    for name in names or ():
        if name not in known:
            raise ValueError(f"unknown {kind} '{name}'; known: {', '.join(known)}")


def check_device(device: str, option: str) -> None:
    """``ValueError`` unless ``device`` is cpu, or cuda[:N] with CUDA present."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"argument {option}: '{device}' is not a device; allowed: cpu, cuda, cuda:N"
        ) from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"argument {option}: '{device}': only cpu and cuda are measured")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}' asked for, but CUDA is not available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device '{device}' asked for, but there are {torch.cuda.device_count()} GPUs"
            )


# -- paths ---------------------------------------------------------------------------------------


def _creatable(path: Path) -> str | None:
    """Why ``path`` (not there yet) could not be created, or None."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable"
            return None
    return None


def check_output_folder(path: Path, option: str) -> None:
    """``ValueError`` unless ``path`` is a writable folder or can be made one."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"argument {option}: {path} is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"argument {option}: the folder {path} is not writable")
        return
    why = _creatable(path)
    if why:
        raise ValueError(f"argument {option}: cannot create {path}: {why}")


def check_output_file(path: Path, option: str) -> None:
    """``ValueError`` unless a file can be written at ``path`` (replacing a file there)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"argument {option}: {path} is not a file")
    if path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"argument {option}: the folder of {path} is not writable")
    why = None if path.exists() else _creatable(path)
    if why:
        raise ValueError(f"argument {option}: cannot write {path}: {why}")


# -- output --------------------------------------------------------------------------------------


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Plain aligned columns, the last one left ragged, a rule of dashes under the header."""
    everything = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in everything) for i in range(len(header) - 1)]
    lines = []
    for r in everything:
        padded = [t.ljust(w) for t, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*padded, r[-1]]).rstrip())
    lines.insert(1, "  ".join("-" * w for w in [*widths, len(header[-1])]))
    return "\n".join(lines)
