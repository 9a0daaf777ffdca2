"""The engine's scheduler, on its own (pure Python): prefix sharing, block accounting,
continuous batching, no deadlock under a small KV pool."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch

from lensrl.rollout.engine.kv_cache import BlockAllocator
from lensrl.rollout.engine.scheduler import Group, Scheduler, blocks_needed

EOS = 0


def group(index: int, prompt_len: int, n: int, max_new: int, first_seq_id: int | None = None) -> Group:
    prompt = SimpleNamespace(input_ids=torch.zeros(prompt_len, dtype=torch.long), rope_delta=0)
    return Group(index, prompt, n, max_new, first_seq_id=index * n if first_seq_id is None else first_seq_id)


def simulate(scheduler: Scheduler, lengths: dict[int, int], log: list | None = None) -> None:
    """Drive the scheduler like the engine does: each sample emits EOS at lengths[seq_id]."""
    while scheduler.has_work():
        planned = scheduler.plan_prefill()
        for g in planned:  # the "prefill": first tokens
            g.first_tokens = [EOS if lengths[g.first_seq_id + i] == 1 else 1 for i in range(g.n)]
        placed = scheduler.place()
        if log is not None:
            log.append(([g.index for g in planned], [s.seq_id for s in placed], len(scheduler.running)))
        if not scheduler.running:
            assert planned or not scheduler.has_work(), "no progress"
            continue
        tokens = [
            EOS if count + 1 >= lengths[s.seq_id] else 1
            for s, count in zip(scheduler.running, scheduler.row_tokens)
        ]
        scheduler.step_done(np.array(tokens))


def test_a_group_is_prefilled_once_and_its_samples_share_the_prompt_blocks():
    allocator = BlockAllocator(200)
    groups = [group(0, prompt_len=37, n=4, max_new=10)]
    scheduler = Scheduler(
        groups, allocator, block_size=8, max_num_seqs=8, eos_token_ids={EOS}, ignore_eos=True
    )
    planned = scheduler.plan_prefill()
    assert planned == groups and len(groups[0].prompt_blocks) == 5  # ceil(37 / 8)
    groups[0].first_tokens = [1, 1, 1, 1]
    seqs = scheduler.place()
    assert len(seqs) == 4
    full = groups[0].prompt_blocks[:4]  # 4 full blocks shared; the partial 5th is copied per sample
    for seq in seqs:
        assert seq.blocks[:4] == full
        assert len(seq.own_blocks) == blocks_needed(groups[0], 8)[1] == 2  # tokens 32..45 -> 2 blocks
    owned = [b for s in seqs for b in s.own_blocks]
    assert len(set(owned)) == len(owned) and not set(owned) & set(groups[0].prompt_blocks)


def test_rows_are_refilled_as_sequences_finish_and_every_block_comes_back():
    rng = random.Random(0)
    groups, seq_id = [], 0
    for i in range(25):
        groups.append(
            group(i, rng.randint(5, 40), rng.choice([1, 2, 3]), rng.randint(2, 30), first_seq_id=seq_id)
        )
        seq_id += groups[-1].n
    lengths = {g.first_seq_id + j: rng.randint(1, g.max_new_tokens) for g in groups for j in range(g.n)}
    allocator = BlockAllocator(60)  # small: groups must wait for blocks, not only for rows
    scheduler = Scheduler(
        groups, allocator, block_size=4, max_num_seqs=5, eos_token_ids={EOS}, ignore_eos=False
    )
    log: list = []
    simulate(scheduler, lengths, log)
    assert allocator.num_free == 59
    assert sorted(s.seq_id for s in scheduler.finished) == sorted(lengths)
    for seq in scheduler.finished:
        assert seq.num_tokens == lengths[seq.seq_id]
        assert seq.finish_reason == "stop"
    assert max(running for _, _, running in log) <= 5
    assert sum(len(planned) for planned, _, _ in log) == len(groups)  # each prompt prefilled exactly once


def test_length_limit_and_ignore_eos():
    groups = [group(0, 10, 2, max_new=6)]
    scheduler = Scheduler(groups, BlockAllocator(50), 4, 4, {EOS}, ignore_eos=True)
    simulate(scheduler, {0: 2, 1: 3})  # EOS emitted early, but ignored
    assert [(s.num_tokens, s.finish_reason) for s in scheduler.finished] == [(6, "length"), (6, "length")]


def test_a_finished_row_is_taken_by_a_waiting_prompt_without_waiting_for_the_batch():
    groups = [group(i, 8, 1, max_new=20) for i in range(3)]
    scheduler = Scheduler(
        groups, BlockAllocator(100), 4, max_num_seqs=2, eos_token_ids={EOS}, ignore_eos=False
    )
    log: list = []
    simulate(scheduler, {0: 3, 1: 15, 2: 5}, log)
    # sample 2 gets a row as soon as sample 0 finishes (step 2), while sample 1 is still running
    step = next(i for i, (_, placed, _) in enumerate(log) if placed == [2])
    assert step == 2 and log[step][2] == 2


def test_prompts_are_prefilled_ahead_so_freed_rows_refill_without_a_model_call():
    groups = [group(i, 8, 2, max_new=30) for i in range(10)]
    scheduler = Scheduler(
        groups,
        BlockAllocator(400),
        4,
        max_num_seqs=4,
        eos_token_ids={EOS},
        ignore_eos=False,
        prefill_min_rows=2,
        lookahead=4,
    )
    planned = scheduler.plan_prefill()
    assert len(planned) == 4  # 4 free rows + 4 samples of lookahead = 4 groups of 2
    for g in planned:
        g.first_tokens = [1, 1]
    assert len(scheduler.place()) == 4 and scheduler._unplaced() == 4
    assert scheduler.plan_prefill() == []  # enough samples are waiting prefilled
