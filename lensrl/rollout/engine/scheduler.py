"""Which sequences run: prompt groups waiting for prefill, samples waiting for a row, running rows.

No tensors (numpy for the per-row arrays), so its policy is testable on its own:

    waiting  groups not yet prefilled                     --plan_prefill-->  pending
    pending  prefilled groups with samples not yet placed --place-------->  running
    running  one decode row each, in row order            --step_done---->  finished (blocks freed)

A group (one prompt, n samples) is prefilled once; its prompt blocks are shared by its samples
and freed when the last one finishes. Every placed sample reserves the blocks for its longest
possible completion up front, so a running sequence never runs out of cache (no preemption, no
recomputation). Finished samples free their row at once and the next waiting one takes it
(continuous batching). Prompts are prefilled ahead of need: up to `lookahead` samples beyond the
free rows wait prefilled, so a freed row is refilled at once (placing a sample costs no model
call), and a prefill call is made only when at least `prefill_min_rows` samples are wanted, so one
call serves many rows instead of stalling decode for one.

Per decode step the scheduler only counts tokens and checks stops, vectorised over rows; the
token ids themselves are recorded by the engine, which assembles the completions at the end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lensrl.rollout.engine.kv_cache import BlockAllocator


@dataclass
class Group:
    """One prompt and its `n` samples."""

    index: int  # position in the caller's prompt list
    prompt: Any  # ProcessedSample
    n: int
    max_new_tokens: int
    first_seq_id: int  # samples are seq ids first_seq_id .. first_seq_id + n - 1
    prompt_blocks: list[int] = field(default_factory=list)
    first_tokens: list[int] | None = None  # set by the prefill: one first token per sample
    num_placed: int = 0
    num_finished: int = 0
    prompt_len: int = field(init=False)
    rope_delta: int = field(init=False)

    def __post_init__(self):
        self.prompt_len = int(self.prompt.input_ids.shape[0])
        self.rope_delta = int(self.prompt.rope_delta)


@dataclass
class Seq:
    """One sample being generated."""

    seq_id: int
    group: Group
    sample: int
    blocks: list[int]  # block table: the prompt's full blocks, then its own
    own_blocks: list[int]
    first_token: int
    num_tokens: int = 1  # generated so far (the first comes from the prefill)
    finish_reason: str | None = None

    @property
    def num_cached(self) -> int:
        """Tokens in the cache; the last generated token is the next input."""
        return self.group.prompt_len + self.num_tokens - 1

    @property
    def next_position(self) -> int:
        """Rope position of the next input token (the last generated one): T + rope_delta + j."""
        return self.num_cached + self.group.rope_delta


def prompt_blocks_needed(group: Group, block_size: int) -> int:
    return -(-group.prompt_len // block_size)


def own_blocks_needed(group: Group, block_size: int) -> int:
    """A sample's own blocks: from the prompt's partial block to its last cached token (the final
    generated token is never fed back, so it needs no cache)."""
    last = group.prompt_len + group.max_new_tokens - 1  # tokens ever in the cache
    return -(-last // block_size) - group.prompt_len // block_size


def blocks_needed(group: Group, block_size: int) -> tuple[int, int, int]:
    """(prompt blocks, own blocks per sample, block table length) of a group."""
    own = own_blocks_needed(group, block_size)
    return prompt_blocks_needed(group, block_size), own, group.prompt_len // block_size + own


class Scheduler:
    def __init__(
        self,
        groups: list[Group],
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        eos_token_ids: set[int],
        ignore_eos: bool,
        prefill_min_rows: int = 1,
        lookahead: int = 0,
    ):
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = eos_token_ids
        self.ignore_eos = ignore_eos
        self.prefill_min_rows = max(1, prefill_min_rows)
        self.lookahead = lookahead
        self.waiting: deque[Group] = deque(groups)
        self.pending: deque[Group] = deque()
        self.running: list[Seq] = []
        self.finished: list[Seq] = []
        self._waiting_samples = sum(g.n for g in groups)
        self._eos = np.array(sorted(eos_token_ids), dtype=np.int64)
        # per running row, in row order
        self.row_tokens = np.zeros(0, dtype=np.int64)  # tokens generated
        self.row_limits = np.zeros(0, dtype=np.int64)  # max_new_tokens
        self.row_prompt_lens = np.zeros(0, dtype=np.int64)
        self.row_seq_ids = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ state

    def has_work(self) -> bool:
        return bool(self.waiting or self.pending or self.running)

    @property
    def free_rows(self) -> int:
        return self.max_num_seqs - len(self.running)

    def _unplaced(self) -> int:
        return sum(g.n - g.num_placed for g in self.pending)

    # ------------------------------------------------------------------ policy

    def plan_prefill(self) -> list[Group]:
        """Groups to prefill now; their prompt blocks are allocated here."""
        rows = self.free_rows + self.lookahead - self._unplaced()  # samples wanted ready
        if not self.waiting or rows <= 0:
            return []
        if self.running and rows < min(self.prefill_min_rows, self._waiting_samples):
            return []  # too few samples wanted to be worth stalling the running batch for a prefill
        planned: list[Group] = []
        reserved = 0  # blocks the samples of groups planned this round will take
        while self.waiting and rows > 0:
            group = self.waiting[0]
            prompt, own, _ = blocks_needed(group, self.block_size)
            if self.allocator.num_free - reserved < prompt + own:
                break
            group.prompt_blocks = self.allocator.allocate(prompt)
            fits = (self.allocator.num_free - reserved) // max(own, 1)
            reserved += own * min(group.n, rows, fits)
            rows -= group.n
            self._waiting_samples -= group.n
            self.waiting.popleft()
            self.pending.append(group)
            planned.append(group)
        return planned

    def place(self) -> list[Seq]:
        """Give free rows to prefilled samples, oldest group first. Samples already finished by
        their first token (EOS, or max_new_tokens 1) go straight to `finished`."""
        placed: list[Seq] = []
        while self.pending and len(self.running) + len(placed) < self.max_num_seqs:
            group = self.pending[0]
            assert group.first_tokens is not None, "place() before the group's prefill"
            sample = group.num_placed
            seq = Seq(group.first_seq_id + sample, group, sample, [], [], group.first_tokens[sample])
            reason = self._finish_reason(seq.first_token, 1, group.max_new_tokens)
            if reason is None:
                own = own_blocks_needed(group, self.block_size)
                if self.allocator.num_free < own:
                    break
                seq.own_blocks = self.allocator.allocate(own)
                seq.blocks = group.prompt_blocks[: group.prompt_len // self.block_size] + seq.own_blocks
            group.num_placed += 1
            if group.num_placed == group.n:
                self.pending.popleft()
            if reason is None:
                placed.append(seq)
            else:
                self._finish(seq, reason)
        if placed:
            self.running += placed
            self.row_tokens = np.concatenate([self.row_tokens, np.ones(len(placed), dtype=np.int64)])
            self.row_limits = np.concatenate([self.row_limits, [s.group.max_new_tokens for s in placed]])
            self.row_prompt_lens = np.concatenate(
                [self.row_prompt_lens, [s.group.prompt_len for s in placed]]
            )
            self.row_seq_ids = np.concatenate([self.row_seq_ids, [s.seq_id for s in placed]])
        return placed

    def step_done(self, tokens: np.ndarray) -> np.ndarray | None:
        """One new token for each running row (row order): count it, finish the rows that are done.
        Returns the indices of the rows that keep running, or None when all of them do."""
        assert len(tokens) == len(self.running)
        self.row_tokens += 1
        done = self.row_tokens >= self.row_limits
        if not self.ignore_eos:
            done |= np.isin(tokens, self._eos)
        if not done.any():
            return None
        for row in np.flatnonzero(done).tolist():
            seq = self.running[row]
            seq.num_tokens = int(self.row_tokens[row])
            eos = not self.ignore_eos and int(tokens[row]) in self.eos_token_ids
            self._finish(seq, "stop" if eos else "length")
        keep = np.flatnonzero(~done)
        self.running = [self.running[i] for i in keep.tolist()]
        self.row_tokens, self.row_limits = self.row_tokens[keep], self.row_limits[keep]
        self.row_prompt_lens, self.row_seq_ids = self.row_prompt_lens[keep], self.row_seq_ids[keep]
        return keep

    def cached_tokens(self) -> int:
        """Tokens the running rows attend to in the coming decode step (cache + the new one)."""
        return int(self.row_prompt_lens.sum() + self.row_tokens.sum())

    # ------------------------------------------------------------------ internals

    def _finish_reason(self, token: int, num_tokens: int, limit: int) -> str | None:
        if not self.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if num_tokens >= limit:
            return "length"
        return None

    def _finish(self, seq: Seq, reason: str) -> None:
        seq.finish_reason = reason
        self.allocator.release(seq.own_blocks)
        seq.own_blocks = []
        group = seq.group
        group.num_finished += 1
        if group.num_finished == group.n:
            self.allocator.release(group.prompt_blocks)
            group.prompt_blocks = []
        self.finished.append(seq)
