"""The pure planning helpers behind several ranks: who generates which prompts, who trains which
sequences. Every rank computes the same plan from the same inputs, so these must be exact."""

from __future__ import annotations

import random

import pytest

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
