"""Distributed calls (``impls.distributed``): 2 gloo processes on CPU, DDP and FSDP2.

Every check runs inside one spawn of two processes (``impls.processes``: a free port, a timeout
on the group's init, on every collective and on the whole run, so a hang fails the tests in
seconds); each rank records what it saw and the tests below read those records. A second spawn
checks a group of one process. The references are the float64 oracle on the concatenated batch
with the unwrapped model: this rank's rows of it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import pytest
import torch
import torch.distributed as dist

import impls
from impls import processes

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")

#: seconds each collective may wait inside the workers, and the whole spawn
COLLECTIVE_S, SPAWN_S = 20.0, 240.0
TOLERANCE = 1e-10
BATCH, OTHER = 5, 4  # global sizes: ranks hold 3 + 2 and 2 + 2 examples (ghost refuses a
# single example through nn.MultiheadAttention, with or without ranks)

#: the zoo's cases ghost must answer exactly under DDP and FSDP2
GHOST_CASES = [
    "mlp", "cnn", "embedding", "layer_group_rms_norm", "attention", "tied_embedding",
    "transformer", "hf_gpt2",
]  # fmt: skip
WRAPPERS = ["ddp", "fsdp2"]
#: every other implementation on these: exact or refused, never wrong, never a crash
OTHERS = ["naive", "vmap", "hooks", "function", "opacus", "opacus_ghost", "backpack"]
OTHER_CASES = ["mlp", "transformer"]


# -- what the workers do ---------------------------------------------------------------------------


def _take(value, rows: slice):
    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, Mapping):
        return type(value)({k: _take(v, rows) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_take(v, rows) for v in value)
    return value


def _shard(size: int, rank: int, world: int) -> slice:
    per = -(-size // world)
    return slice(min(size, rank * per), min(size, (rank + 1) * per))


def _double(batch):
    from correctness.cases import _to

    return _to(batch[0], "cpu", torch.float64), _to(batch[1], "cpu", torch.float64)


def _wrap(model, wrapper: str, per_block: bool = False):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if wrapper == "ddp":
        return DistributedDataParallel(model)
    if per_block:  # nested FSDP units: every block of its own, then the root
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            blocks = model.transformer.h
        for block in blocks:
            fully_shard(block)
    return fully_shard(model)


def _error(value, reference) -> float:
    from correctness.harness import relative_error

    if isinstance(reference, dict):
        if not isinstance(value, dict) or set(value) != set(reference):
            return float("inf")
        return max(relative_error(value[n], reference[n]) for n in reference)
    return relative_error(value, reference)


def _outcome(call, *args, **kwargs) -> dict:
    """{"value": call(*args, **kwargs)} or {"raised": type name, "message": str}."""
    try:
        return {"value": call(*args, **kwargs)}
    except Exception as error:  # noqa: BLE001 - recorded for the tests
        return {"raised": type(error).__name__, "message": str(error)}


class _Problem:
    """A zoo case in float64: the model, this rank's shards and the oracle's rows."""

    def __init__(self, case_name: str, rank: int, world: int):
        from correctness import oracle
        from correctness.cases import get_case
        from correctness.harness import perturbed

        case = get_case(case_name)
        self.loss_fn = case.loss_fn
        self.model = case.make_model().double()
        self.other_model = perturbed(self.model)
        batch, other = _double(case.make_batch(BATCH)), _double(case.make_batch(OTHER, seed=1))
        here = oracle.per_example_gradients(self.model, case.loss_fn, batch)
        there = oracle.per_example_gradients(self.model, case.loss_fn, other)
        there_other = oracle.per_example_gradients(self.model_at(self.other_model), case.loss_fn,
                                                   other)  # fmt: skip
        rows, other_rows = _shard(BATCH, rank, world), _shard(OTHER, rank, world)
        self.batch, self.other = _take(batch, rows), _take(other, other_rows)
        self.references = {
            "norms": oracle.norms(here)[rows],
            "per_param": {n: v[rows] for n, v in oracle.per_param_norms(here).items()},
            "gram": oracle.inner(here, here)[rows],
            "cross_batch": oracle.inner(here, there)[rows],
            "cross_checkpoint": oracle.inner(here, there_other)[rows],
        }

    @staticmethod
    def model_at(model):
        return model

    def compute(self, impl, model, quantity: str, other_model=None):
        if quantity == "norms":
            return impl.norms(model, self.loss_fn, self.batch)
        if quantity == "per_param":
            return impl.norms(model, self.loss_fn, self.batch, per_param=True)
        if quantity == "gram":
            return impl.inner(model, self.loss_fn, self.batch)
        if quantity == "cross_batch":
            return impl.inner(model, self.loss_fn, self.batch, self.other)
        return impl.inner(model, self.loss_fn, self.batch, self.other, other_model=other_model)


def _agreement(rank: int, world: int) -> dict:
    """(case, wrapper, implementation, quantity) -> outcome, the value replaced by its error."""
    out = {}
    for case_name in sorted(set(GHOST_CASES) | set(OTHER_CASES)):
        problem = _Problem(case_name, rank, world)
        for wrapper in WRAPPERS:
            model = _wrap(copy.deepcopy(problem.model), wrapper)
            other_model = _wrap(copy.deepcopy(problem.other_model), wrapper)
            names = (["ghost"] if case_name in GHOST_CASES else []) + (
                OTHERS if case_name in OTHER_CASES else []
            )
            for name in names:
                quantities = ["norms", "gram", "cross_batch"]
                if name == "ghost":
                    quantities += ["per_param", "cross_checkpoint"]
                for quantity in quantities:
                    outcome = _outcome(
                        problem.compute, impls.get(name), model, quantity, other_model=other_model
                    )
                    if "value" in outcome:
                        reference = problem.references[quantity]
                        if quantity == "per_param" and wrapper == "ddp":
                            reference = {f"module.{n}": v for n, v in reference.items()}
                        outcome = {"error": _error(outcome["value"], reference)}
                    out[(case_name, wrapper, name, quantity)] = outcome
    return out


def _nested_fsdp(rank: int, world: int) -> dict:
    """FSDP2 with every block a unit of its own (the transformer and GPT-2)."""
    out = {}
    for case_name in ("transformer", "hf_gpt2"):
        problem = _Problem(case_name, rank, world)
        model = _wrap(copy.deepcopy(problem.model), "fsdp2", per_block=True)
        for quantity in ("norms", "gram", "cross_batch"):
            outcome = _outcome(problem.compute, impls.get("ghost"), model, quantity)
            if "value" in outcome:
                outcome = {"error": _error(outcome["value"], problem.references[quantity])}
            out[(case_name, quantity)] = outcome
    return out


def _small_rounds(rank: int, world: int) -> dict:
    """The factors sent over many all-gather rounds (a round smaller than most groups)."""
    from impls import distributed

    out = {}
    problem = _Problem("hf_gpt2", rank, world)
    rounds = distributed.ROUND_BYTES
    distributed.ROUND_BYTES = 2048
    try:
        for wrapper in WRAPPERS:
            model = _wrap(copy.deepcopy(problem.model), wrapper)
            for quantity in ("gram", "cross_batch"):
                outcome = _outcome(problem.compute, impls.get("ghost"), model, quantity)
                if "value" in outcome:
                    outcome = {
                        "error": _error(outcome["value"], problem.references[quantity]),
                        "collectives": distributed.last_traffic().collectives,
                    }
                out[(wrapper, quantity)] = outcome
    finally:
        distributed.ROUND_BYTES = rounds
    return out


def _training_step(model, loss_fn, batch) -> dict[str, torch.Tensor]:
    """A plain distributed step's gradients (full tensors), then zeroed."""
    from torch.distributed.tensor import DTensor

    model.zero_grad(set_to_none=True)
    inputs, targets = batch
    loss_fn(model(inputs), targets).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    model.zero_grad(set_to_none=True)
    return grads


def _state(rank: int, world: int) -> dict:
    """The caller's model, gradients and DDP / FSDP state come back as they were: a training step
    after the calls gives the gradients a step before them gave."""
    from torch.distributed.tensor import DTensor

    out = {}
    problem = _Problem("transformer", rank, world)
    for wrapper in WRAPPERS:
        model = _wrap(copy.deepcopy(problem.model), wrapper)
        before_step = _training_step(model, problem.loss_fn, problem.batch)
        kinds = {n: type(p).__name__ for n, p in model.named_parameters()}
        values = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()
        }
        marker = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = marker[n]
        for name in ("ghost", "naive"):
            impl = impls.get(name)
            impl.norms(model, problem.loss_fn, problem.batch)
            impl.inner(model, problem.loss_fn, problem.batch)
            impl.inner(model, problem.loss_fn, problem.batch, problem.other)
        out[(wrapper, "grads kept")] = all(p.grad is marker[n] for n, p in model.named_parameters())
        out[(wrapper, "parameter kinds")] = kinds == {
            n: type(p).__name__ for n, p in model.named_parameters()
        }
        out[(wrapper, "values")] = all(
            torch.equal((p.full_tensor() if isinstance(p, DTensor) else p).detach(), values[n])
            for n, p in model.named_parameters()
        )
        after_step = _training_step(model, problem.loss_fn, problem.batch)
        out[(wrapper, "training step")] = max(
            _error(after_step[n], before_step[n]) for n in before_step
        )
    return out


def _failures(rank: int, world: int) -> dict:
    """One rank refuses or gets bad input: every rank raises the same; the ranks stay in step."""
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from impls import distributed
    from impls.ghost import Ghost

    out = {}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    y = torch.tensor([0, 1, 2, 1])

    def loss_fn(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none")

    ghost = impls.get("ghost")
    for wrapper in WRAPPERS:
        wrapped = _wrap(copy.deepcopy(model), wrapper)

        def refuse(*args, **kwargs):
            raise impls.Unsupported("a refusal on this rank only")

        for quantity, method in (("norms", "_squared_norms"), ("gram", "_factor_groups")):
            original = getattr(Ghost, method)
            if rank == 1:
                setattr(Ghost, method, refuse)
            try:
                call = ghost.norms if quantity == "norms" else ghost.inner
                out[(wrapper, "refusal", quantity)] = _outcome(call, wrapped, loss_fn, (x, y))
            finally:
                setattr(Ghost, method, original)
        bad_targets = y if rank == 0 else y[:2]
        out[(wrapper, "mismatched batch", "norms")] = _outcome(
            ghost.norms, wrapped, loss_fn, (x, bad_targets)
        )
        out[(wrapper, "mismatched batch", "gram")] = _outcome(
            ghost.inner, wrapped, loss_fn, (x, bad_targets)
        )
        bad_inputs = x if rank == 0 else x[:, :3]
        out[(wrapper, "bad features", "gram")] = _outcome(
            ghost.inner, wrapped, loss_fn, (bad_inputs, y)
        )
        out[(wrapper, "different calls", "-")] = _outcome(
            ghost.norms if rank == 0 else ghost.inner, wrapped, loss_fn, (x, y)
        )
        out[(wrapper, "create_graph", "gram")] = _outcome(
            ghost.inner, wrapped, loss_fn, (x, y), create_graph=True
        )
        still = _outcome(ghost.norms, wrapped, loss_fn, (x, y))
        out[(wrapper, "still in step", "norms")] = (
            {"value": still["value"].shape} if "value" in still else still
        )
    # a rank without examples: rows of none, columns of the others'
    for wrapper in WRAPPERS:
        wrapped = _wrap(copy.deepcopy(model), wrapper)
        mine = (x, y) if rank == 0 else (x[:0], y[:0])
        norms = _outcome(ghost.norms, wrapped, loss_fn, mine)
        gram = _outcome(ghost.inner, wrapped, loss_fn, mine)
        local = (ghost.norms(model, loss_fn, (x, y)), ghost.inner(model, loss_fn, (x, y)))
        out[(wrapper, "empty shard", "-")] = (norms, gram, local if rank == 0 else None)
    replica = copy.deepcopy(model)
    if rank == 1:
        with torch.no_grad():
            replica[0].weight[0, 0] += 1e-12
    ddp = DistributedDataParallel(replica, init_sync=False)
    out[("ddp", "replicas out of sync", "norms")] = _outcome(ghost.norms, ddp, loss_fn, (x, y))
    # last: rank 1 makes no call; rank 0's first collective must give up (the group is out of
    # step afterwards, so nothing follows it)
    distributed.set_collective_timeout(2.0)
    wrapped = _wrap(copy.deepcopy(model), "ddp")
    if rank == 0:
        out[("ddp", "no partner", "norms")] = _outcome(ghost.norms, wrapped, loss_fn, (x, y))
    return out


def _two_ranks(rank: int, world: int) -> dict:
    from impls import distributed

    distributed.set_collective_timeout(COLLECTIVE_S)
    results = {}
    parts = (("agreement", _agreement), ("nested", _nested_fsdp), ("rounds", _small_rounds),
             ("state", _state), ("failures", _failures))  # fmt: skip
    for name, part in parts:
        results[name] = part(rank, world)
    return results


def _one_rank(rank: int, world: int) -> dict:
    """A group of one: the same numbers as the oracle on the whole batch."""
    from impls import distributed

    distributed.set_collective_timeout(COLLECTIVE_S)
    out = {}
    for case_name in ("mlp", "transformer"):
        problem = _Problem(case_name, rank, world)
        for wrapper in WRAPPERS:
            model = _wrap(copy.deepcopy(problem.model), wrapper)
            for quantity in ("norms", "gram", "cross_batch"):
                outcome = _outcome(problem.compute, impls.get("ghost"), model, quantity)
                if "value" in outcome:
                    outcome = {"error": _error(outcome["value"], problem.references[quantity])}
                out[(case_name, wrapper, quantity)] = outcome
    return out


# -- the tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks():
    return processes.run(_two_ranks, 2, timeout_s=SPAWN_S, init_timeout_s=60,
                         env={"HF_HUB_OFFLINE": "1"})  # fmt: skip


@pytest.fixture(scope="module")
def one_rank():
    return processes.run(_one_rank, 1, timeout_s=SPAWN_S, init_timeout_s=60)


def _exact(outcome) -> bool:
    return "error" in outcome and outcome["error"] <= TOLERANCE


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("case_name", GHOST_CASES)
def test_ghost_is_exact(two_ranks, case_name, wrapper):
    """Norms, per-parameter norms, Gram rows, cross-batch and cross-checkpoint columns."""
    for rank, results in enumerate(two_ranks):
        for (case, wrap, name, quantity), outcome in results["agreement"].items():
            if (case, wrap, name) == (case_name, wrapper, "ghost"):
                assert _exact(outcome), f"rank {rank} {quantity}: {outcome}"


@pytest.mark.parametrize("case_name", ["transformer", "hf_gpt2"])
def test_ghost_exact_with_nested_fsdp_units(two_ranks, case_name):
    for rank, results in enumerate(two_ranks):
        for (case, quantity), outcome in results["nested"].items():
            if case == case_name:
                assert _exact(outcome), f"rank {rank} {quantity}: {outcome}"


@pytest.mark.parametrize("name", OTHERS)
def test_other_implementations_exact_or_refused(two_ranks, name):
    """Never a wrong number, never a crash: exact, or Unsupported on every rank alike."""
    seen = {}
    for rank, results in enumerate(two_ranks):
        for (case, wrapper, impl, quantity), outcome in results["agreement"].items():
            if impl != name:
                continue
            key = (case, wrapper, quantity)
            if "raised" in outcome:
                assert outcome["raised"] == "Unsupported", f"rank {rank} {key}: {outcome}"
                assert outcome["message"].startswith("rank "), outcome
            else:
                assert _exact(outcome), f"rank {rank} {key}: {outcome}"
            seen.setdefault(key, []).append(outcome.get("message"))
    assert seen and all(len(set(messages)) == 1 for messages in seen.values()), seen


def test_naive_on_the_fsdp2_transformer_is_exact(two_ranks):
    """Issue 11: naive crashed there (mixed torch.Tensor and DTensor)."""
    for results in two_ranks:
        for quantity in ("norms", "gram", "cross_batch"):
            assert _exact(results["agreement"][("transformer", "fsdp2", "naive", quantity)])


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_factors_sent_over_many_rounds(two_ranks, wrapper):
    for results in two_ranks:
        for quantity in ("gram", "cross_batch"):
            outcome = results["rounds"][(wrapper, quantity)]
            assert _exact(outcome), outcome
            assert outcome["collectives"] > 10  # header, statuses and several rounds


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_model_gradients_and_state_come_back(two_ranks, wrapper):
    for results in two_ranks:
        state = results["state"]
        assert state[(wrapper, "grads kept")]
        assert state[(wrapper, "parameter kinds")]
        assert state[(wrapper, "values")]
        assert state[(wrapper, "training step")] <= TOLERANCE


def _same_everywhere(two_ranks, key) -> dict:
    outcomes = [results["failures"][key] for results in two_ranks]
    assert all("raised" in o for o in outcomes), outcomes
    assert len({(o["raised"], o["message"]) for o in outcomes}) == 1, outcomes
    return outcomes[0]


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("quantity", ["norms", "gram"])
def test_a_refusal_on_one_rank_is_raised_on_every_rank(two_ranks, wrapper, quantity):
    outcome = _same_everywhere(two_ranks, (wrapper, "refusal", quantity))
    assert outcome["raised"] == "Unsupported"
    assert outcome["message"] == "rank 1: a refusal on this rank only"


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("quantity", ["norms", "gram"])
def test_a_mismatched_batch_on_one_rank_is_raised_on_every_rank(two_ranks, wrapper, quantity):
    outcome = _same_everywhere(two_ranks, (wrapper, "mismatched batch", quantity))
    assert outcome["raised"] == "ValueError"
    assert outcome["message"].startswith("rank 1: targets have batch size 2")


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_failing_forward_on_one_rank_is_raised_on_every_rank(two_ranks, wrapper):
    outcome = _same_everywhere(two_ranks, (wrapper, "bad features", "gram"))
    assert outcome["raised"] == "RuntimeError"
    assert outcome["message"].startswith("rank 1: RuntimeError: ")


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_different_calls_and_create_graph_are_refused_together(two_ranks, wrapper):
    outcome = _same_everywhere(two_ranks, (wrapper, "different calls", "-"))
    assert outcome["raised"] == "ValueError" and "different calls" in outcome["message"]
    outcome = _same_everywhere(two_ranks, (wrapper, "create_graph", "gram"))
    assert outcome["raised"] == "Unsupported" and "create_graph" in outcome["message"]


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_the_ranks_stay_in_step_after_failures(two_ranks, wrapper):
    shapes = [results["failures"][(wrapper, "still in step", "norms")] for results in two_ranks]
    assert shapes == [{"value": torch.Size([4])}] * 2


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_rank_without_examples(two_ranks, wrapper):
    (norms, gram, (local_norms, local_gram)), (empty_norms, empty_gram, _) = (
        results["failures"][(wrapper, "empty shard", "-")] for results in two_ranks
    )
    assert _error(norms["value"], local_norms) <= TOLERANCE
    assert _error(gram["value"], local_gram) <= TOLERANCE
    assert empty_norms["value"].shape == (0,) and empty_gram["value"].shape == (0, 4)


def test_replicas_out_of_sync_are_refused(two_ranks):
    outcome = _same_everywhere(two_ranks, ("ddp", "replicas out of sync", "norms"))
    assert outcome["raised"] == "ValueError"
    assert "parameter 'module.0.weight' differs between rank 0 and rank 1" in outcome["message"]


def test_a_missing_partner_times_out(two_ranks):
    outcome = two_ranks[0]["failures"][("ddp", "no partner", "norms")]
    assert outcome["raised"] == "CollectiveTimeout", outcome


def test_world_size_one(one_rank):
    (results,) = one_rank
    assert results and all(_exact(o) for o in results.values()), results


def test_a_plain_model_without_a_group_is_a_local_call():
    """No process group: the distributed plumbing is not involved at all."""
    from impls import distributed

    model = torch.nn.Linear(3, 2)
    assert not distributed.involved(model)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    norms = impls.get("ghost").norms(
        model, lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none"), (x, y)
    )
    assert norms.shape == (4,)
