"""The agreement matrix as tests: every registered implementation x every zoo case.

Each test checks every quantity (norms, per-parameter norms, Gram, cross-batch and
cross-checkpoint inner products, double backward) against the float64 oracle, reports every
mismatch at once, and compares each status (ok / unsupported) with the committed snapshot
``correctness/status.json``: a new refusal, or an answer where a refusal was recorded, fails until
the snapshot is updated on purpose (``python -m correctness --update-status``).
"""

from __future__ import annotations

import pytest

import impls
from correctness import status
from correctness.cases import CASES
from correctness.harness import QUANTITIES, check, problem

# Implementations that must answer (not refuse) wherever per-example gradients are defined,
# and those that must also differentiate their answers (create_graph=True) there. vmap must
# answer the zoo's own models; on real models torch.func may lack what they need
# (data-dependent control flow in Hugging Face's padding masks): the snapshot pins those.
MUST_ANSWER = {"naive", "vmap", "hooks", "ghost"}
MUST_DIFFERENTIATE = {"naive", "ghost"}
SNAPSHOT = status.load()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("implementation", impls.names())
def test_agrees_with_oracle(implementation, case):
    outcomes = [check(implementation, case.name, q) for q in QUANTITIES]
    failures = [f"{o.quantity}: {o.status} {o.detail}" for o in outcomes if o.failed]
    assert not failures, "\n".join(failures)
    changed = status.differences(outcomes, SNAPSHOT)
    assert not changed, "\n".join(changed)
    must_answer = implementation in MUST_ANSWER and "trap" not in case.tags
    if implementation == "vmap" and "hf" in case.tags:
        must_answer = False
    if must_answer and problem(case.name).references is not None:
        refused = [
            f"{o.quantity}: {o.detail}"
            for o in outcomes
            if o.status == "unsupported"
            and (o.quantity != "double_backward" or implementation in MUST_DIFFERENTIATE)
        ]
        assert not refused, "\n".join(refused)
    for o in outcomes:
        if o.status == "unsupported":
            assert o.detail and "\n" not in o.detail, f"refusal needs a one-line reason: {o}"


@pytest.mark.parametrize("implementation", impls.names())
def test_undefined_gradients_are_refused(implementation):
    """BatchNorm in train mode: Unsupported is the only right answer, for every quantity."""
    outcomes = [check(implementation, "batchnorm_train", q) for q in QUANTITIES]
    assert all(o.status == "unsupported" for o in outcomes), outcomes
