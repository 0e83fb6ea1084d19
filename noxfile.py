"""Sessions: ``nox -s tests`` (the test suite), ``nox -s bench`` (the main job: the sweep and
the report), ``nox -s regress`` (the CI performance gate), ``nox -s compare -- FILE`` (compare
every implementation on your own model), ``nox -s lint``.

Every session installs into a fresh virtualenv. torch is pinned to the CPU wheel that lies on
the project's machines; BackPACK is installed without its dependencies because it requires
torchvision, whose PyPI wheel would replace that torch (and fails to import beside it).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
# BackPACK's own requirements other than torch and torchvision
BACKPACK_DEPENDENCIES = ["einops>=0.3,<1", "unfoldNd>=0.2,<1"]


def _project_requirements(*extras: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return [r for r in requirements if not r.startswith(("torch", "backpack-for-pytorch"))]


def install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    session.install("--no-deps", "backpack-for-pytorch>=1.7")
    session.install(*BACKPACK_DEPENDENCIES, *_project_requirements(*extras))
    session.install("--no-deps", "-e", ".")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite: agreement matrix, interface contract, per-layer sweeps, bench harness."""
    install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """The main job: time and memory sweep on CPU (and CUDA when present), then REPORT.md."""
    install(session, "test")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session(python="3.11")
def regress(session: nox.Session) -> None:
    """Performance-regression gate against results/baseline-cpu-<processor>.json."""
    install(session, "test")
    session.run("python", "-m", "bench", "regress", *session.posargs)


@nox.session(python="3.11")
def compare(session: nox.Session) -> None:
    """Compare every implementation on your own model: nox -s compare -- path/to/model.py"""
    install(session, "test")
    session.run("python", "-m", "bench", "compare", *session.posargs)


@nox.session(python="3.11")
def correctness(session: nox.Session) -> None:
    """The agreement matrix alone (python -m correctness)."""
    install(session)
    session.run("python", "-m", "correctness", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
