"""The helpers behind several ranks: who generates which prompts, who trains which sequences
(every rank computes the same plan from the same inputs, so these must be exact), and how many
CPU threads each rank uses."""

from __future__ import annotations

import random

import pytest
import torch

from lensrl.train import distributed as dist
from lensrl.train.distributed import balanced_assignment, share


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_each_rank_holds_an_equal_slice_of_every_mini_batch(num_ranks):
    shares = [share(16, num_ranks, r, block_size=4) for r in range(num_ranks)]
    assert sorted(i for s in shares for i in s) == list(range(16))  # nothing lost or doubled
    for block in range(4):
        counts = [sum(block * 4 <= i < block * 4 + 4 for i in s) for s in shares]
        assert counts == [4 // num_ranks] * num_ranks


def test_a_block_that_does_not_divide_over_the_ranks_falls_back_to_contiguous_shares():
    assert share(12, 2, 0, block_size=3) == list(range(6))
    assert share(12, 2, 1, block_size=5) == list(range(6, 12))
    assert share(8, 2, 1) == [4, 5, 6, 7]


def test_balanced_ranks_move_nothing():
    lengths = [300] * 8
    owners = [0, 0, 0, 0, 1, 1, 1, 1]
    assert balanced_assignment(lengths, 2, owners) == owners


@pytest.mark.parametrize("seed", range(5))
def test_uneven_ranks_are_evened_out_with_few_moves(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(50, 600) for _ in range(64)]
    owners = [0] * 40 + [1] * 24
    owner = balanced_assignment(lengths, 2, owners)
    assert owner == balanced_assignment(lengths, 2, owners)  # deterministic
    load = [sum(n for n, o in zip(lengths, owner) if o == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(lengths)
    moved = sum(a != b for a, b in zip(owner, owners))
    assert moved <= 16  # about the share that had to change rank, not a re-deal of everything


def test_without_owners_everything_is_dealt():
    owner = balanced_assignment([5, 1, 1, 1, 1, 1], 3)
    load = [sum(n for n, o in zip([5, 1, 1, 1, 1, 1], owner) if o == r) for r in range(3)]
    assert max(load) == 5 and sorted(owner) != [0] * 6


def _weighted_worker(rank: int, port: int, out) -> None:
    import torch.distributed as torch_dist

    from lensrl.train.distributed import weighted_mean_metrics

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:  # rank 0: 30 tokens with mean 1.0; rank 1: 10 tokens with mean 5.0
        metrics = weighted_mean_metrics({"rollout/train_kl": 1.0 if rank == 0 else 5.0}, 30.0 if rank == 0 else 10.0)
        out.put((rank, metrics["rollout/train_kl"]))
    finally:
        torch_dist.destroy_process_group()


def test_per_token_means_over_ranks_weigh_each_rank_by_its_tokens():
    """Two gloo ranks: (30 x 1.0 + 10 x 5.0) / 40 = 2.0 on both, not the ranks' plain mean 3.0."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_weighted_worker, args=(rank, port, out)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: pytest.approx(2.0), 1: pytest.approx(2.0)}


def test_cpu_threads_are_shared_among_the_ranks_torchrun_started(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 for several ranks: auto shares the cores among them instead;
    a user's own OMP_NUM_THREADS, a single rank and an explicit count are left as given."""
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert dist.set_cpu_threads(0) == 8 and torch.get_num_threads() == 8
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
        assert dist.set_cpu_threads(0) == 1
        assert dist.set_cpu_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
        assert dist.set_cpu_threads(0) == 3  # the user's setting (here torch's current count) stays
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert dist.set_cpu_threads(0) == 3
    finally:
        torch.set_num_threads(before)


def test_host_floats_turns_every_tensor_metric_into_its_float_and_keeps_the_rest():
    metrics = {"actor/pg_loss": torch.tensor(0.25), "actor/ppo_kl": torch.tensor([1.5]).sum() * 2,
               "actor/entropy": torch.tensor(0.5, dtype=torch.float64), "router/aux": 0.125, "count": 3}
    out = dist.host_floats(metrics)
    assert out == {"actor/pg_loss": 0.25, "actor/ppo_kl": 3.0, "actor/entropy": 0.5, "router/aux": 0.125, "count": 3.0}
    assert all(type(v) is float for v in out.values())
    assert dist.host_floats({}) == {}
