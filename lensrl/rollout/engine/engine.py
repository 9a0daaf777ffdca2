"""The `engine` rollout backend: lensrl's own generation engine, in the trainer's process.

    rollout = EngineRollout(policy, processor, cfg.rollout)
    groups = rollout.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=512))
    ...                                   # train: the KV memory is free while the trainer runs
    rollout.sync_weights(policy)          # after each update: references or one on-GPU copy

`generate` is one loop (nano-vllm's shape), each turn:

    plan prefills -> prefill (transformers forward, once per prompt) -> sample n first tokens
    place samples in free rows -> decode step (all rows) -> sample -> finish / free rows

Per-token log-probabilities are log_softmax(logits / temperature) of the sampled token over the
full vocabulary (suppressed ids masked), the trainer's own quantity. Timings of the last call
are in `stats`.

A LoRA policy is served through its plain copy with the adapters merged
(`lensrl.train.fsdp.RolloutCopy`): decode reads weights, so peft's layers would go unseen.

A mixture-of-experts policy needs nothing else: prefill runs the model's own sparse blocks and
decode runs the router and the experts from the model's stacked tensors (moe.py). With
`capture_routing` the engine also keeps the experts each decode step chose
(`routed_experts`), to compare with the trainer's routing (`moe.router_mismatch`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lensrl.rollout.base import Completion, SamplingParams
from lensrl.rollout.engine.kv_cache import BlockAllocator, KVLayout, kv_budget_bytes
from lensrl.rollout.engine.model_runner import ModelRunner
from lensrl.rollout.engine.sampler import Sampler
from lensrl.rollout.engine.scheduler import Group, Scheduler, blocks_needed
from lensrl.rollout.engine.weights import DecodeWeights, text_shape


@dataclass(frozen=True)
class EngineOptions:
    """Engine knobs that are not part of the run config (tests and benchmarks set them)."""

    max_num_seqs: int | None = None  # rows decoded together; None: 512 on CUDA, 256 on CPU
    block_size: int | None = None  # tokens per KV block; None: 64 on CUDA, 16 on CPU
    num_kv_blocks: int | None = None  # fixed KV pool size (blocks); None: from gpu_memory_utilization
    prefill_tokens: int | None = None  # padded tokens per prefill forward; None: 16384 CUDA, 4096 CPU
    use_cuda_graphs: bool = True
    use_triton: bool | None = None  # None: on CUDA when the kernels pass their self-check
    use_grouped_mm: bool | None = None  # MoE experts; None: on CUDA when grouped_mm passes its self-check
    capture_routing: bool = False  # MoE: keep the experts chosen at each decode step (routed_experts)
    copy_weights: bool = False  # own a copy of every weight (isolated from in-place updates until sync)
    release_kv: bool = True  # free the KV pool after each generate (colocated training)
    # samples kept prefilled beyond the free rows, and the fewest wanted before a prefill call
    # interrupts decoding (scheduler.py); None: max_num_seqs and max_num_seqs // 2. Few large
    # prefill rounds: on the H100 long-tail benchmark 13 rounds took 3.3 s where 46 rounds of
    # the same prompts (lookahead max_num_seqs // 4) took 7.8 s (benchmarks/RESULTS.md)
    lookahead: int | None = None
    prefill_min_rows: int | None = None


class EngineRollout:
    """A `RolloutBackend` that generates with the policy's own weights (see module doc).
    `on_progress`, when set: called with the number of sequences that finished at each step."""

    on_progress: Callable[[int], None] | None = None

    def __init__(
        self, model: torch.nn.Module, processor, cfg, options: EngineOptions | None = None, **overrides
    ):
        _check_plain(model)
        self.model = model
        self.processor = processor
        self.cfg = cfg
        options = options or EngineOptions()
        if overrides:
            options = EngineOptions(**{**options.__dict__, **overrides})
        self.options = options
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.max_num_seqs = options.max_num_seqs or (512 if cuda else 256)
        self.block_size = options.block_size or (64 if cuda else 16)
        self.prefill_tokens = options.prefill_tokens or (16384 if cuda else 4096)
        self.lookahead = options.lookahead if options.lookahead is not None else self.max_num_seqs
        self.prefill_min_rows = options.prefill_min_rows or max(1, self.max_num_seqs // 2)
        self.shape = text_shape(model)
        _varlen_vision(model)
        self.runner = ModelRunner(
            self.shape,
            self.device,
            self.max_num_seqs,
            options.use_cuda_graphs,
            options.use_triton,
            options.use_grouped_mm,
            options.capture_routing,
        )
        self.weights: DecodeWeights | None = None
        # with capture_routing on an MoE policy, after generate: routed_experts[prompt][sample] is
        # the (R - 1, num_moe_layers, K) int16 array of the experts decode chose for response tokens
        # 0..R-2 (each one's input step; the last token is never fed back, and the prompt is
        # routed by the model's own forward in prefill). Compare: moe.trainer_routing.
        self.routed_experts: list[list[np.ndarray]] | None = None
        self.eos_token_ids = set(processor.eos_token_ids)
        suppress = list(getattr(processor, "suppress_token_ids", []) or [])
        self.suppress = torch.tensor(suppress, dtype=torch.long, device=self.device) if suppress else None
        self.stats: dict[str, Any] = {}  # timings and counts of the last calls (see generate)

    # ------------------------------------------------------------------ colocation

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Point the engine at `model`'s current weights (references, or one on-device copy into the
        engine's buffers where dtypes differ). Time in stats['sync_s']."""
        start = time.perf_counter()
        if model is not self.model:
            _check_plain(model)
            _varlen_vision(model)
        self.model = model
        if self.weights is not None and self.weights.sync(model):
            self.runner.invalidate_graphs()  # some parameter moved: the graphs hold old addresses
        self._synchronize()
        self.stats["sync_s"] = time.perf_counter() - start

    def sleep(self, free_all: bool = False) -> None:
        """Free the KV pool (the next generate allocates it again). free_all: also the captured
        graphs and the static decode buffers (a logits buffer of max_num_seqs rows)."""
        start = time.perf_counter()
        self.runner.sleep(free_all)
        self._synchronize()
        self.stats["sleep_s"] = time.perf_counter() - start

    def _kv_layout(self) -> KVLayout:
        """The KV pool's shape: every layer's keys and values in blocks of `block_size` tokens."""
        return KVLayout(self.shape.num_layers, self.shape.num_kv_heads, self.shape.head_dim, self.block_size,
                        self.weights.matmul_dtype)

    def wake(self, num_blocks: int, max_blocks_per_seq: int, max_position: int) -> None:
        """Take the KV pool (num_blocks) back; generate calls this with the sizes it needs."""
        start = time.perf_counter()
        layout = self._kv_layout()
        self.runner.wake(layout, num_blocks, max_blocks_per_seq, max_position)
        self._synchronize()
        self.stats["wake_s"] = time.perf_counter() - start

    # ------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(
        self,
        prompts: list,
        params: SamplingParams,
        max_new_tokens: list[int] | None = None,
        positions: list[int] | None = None,
    ) -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order.

        max_new_tokens: one length limit per prompt, overriding params.max_new_tokens.
        positions: each prompt's position in the global batch (default 0, 1, ...). Sample j of the
        prompt at position p draws token t with the random stream of (seed, p * n + j, t), so
        with a seed what is sampled does not depend on the rank, the call or the engine's rows.
        """
        start = time.perf_counter()
        limits = max_new_tokens or [params.max_new_tokens] * len(prompts)
        if len(limits) != len(prompts) or min(limits, default=1) < 1 or params.n < 1:
            raise ValueError("need n >= 1 and max_new_tokens >= 1 for every prompt")
        if not prompts:
            return []
        self._prepare_weights()
        groups = [Group(i, p, params.n, limits[i], i * params.n) for i, p in enumerate(prompts)]
        num_blocks = self._num_blocks(groups)
        max_blocks = max(blocks_needed(g, self.block_size)[2] for g in groups)
        max_position = max(g.prompt_len + g.rope_delta + g.max_new_tokens for g in groups) + 1
        self.wake(num_blocks, max_blocks, max_position)
        was_training = self.model.training
        self.model.eval()  # transformers drops the KV cache in training mode with gradient checkpointing
        capture_before = self.runner.capture_s, self.runner.num_captures
        prefill_autocast = _caller_autocast(self.device)
        try:
            with torch.autocast(self.device.type, enabled=False):  # decode sets its dtypes itself
                completions = self._run(groups, params, prefill_autocast, positions)
        finally:
            self.model.train(was_training)
            if self.options.release_kv:
                self.sleep()
        self.stats.update(
            generate_s=time.perf_counter() - start,
            capture_s=self.runner.capture_s - capture_before[0],
            num_captures=self.runner.num_captures - capture_before[1],
            kv_blocks=num_blocks,
            kv_bytes=num_blocks * self.runner.layout.bytes_per_block,
        )
        return completions

    def _run(self, groups: list[Group], params: SamplingParams, prefill_autocast, positions) -> list[list[Completion]]:
        runner = self.runner
        scheduler = Scheduler(
            groups,
            BlockAllocator(runner.kv.num_blocks),
            self.block_size,
            self.max_num_seqs,
            self.eos_token_ids,
            params.ignore_eos,
            prefill_min_rows=self.prefill_min_rows,
            lookahead=self.lookahead,
        )
        sample = Sampler(params, self.device, self.suppress, runner.sample_kernel, positions)
        # per step: (tokens, logprobs on device, seq ids); completions are assembled at the end
        records: list[tuple[np.ndarray, torch.Tensor, np.ndarray]] = []
        routing: list[tuple[np.ndarray, np.ndarray]] | None = [] if runner.capture_routing else None
        prefill_s = decode_s = 0.0
        steps = decode_tokens = prefill_tokens = kv_token_reads = prefill_calls = reported = 0
        while scheduler.has_work():
            planned = scheduler.plan_prefill()
            if planned:
                t0 = time.perf_counter()
                with prefill_autocast:
                    logits = runner.prefill(self.model, planned, self.prefill_tokens)  # (G, V)
                ids = np.concatenate([np.arange(g.first_seq_id, g.first_seq_id + g.n) for g in planned])
                tokens, logp = sample(logits.repeat_interleave(params.n, dim=0), ids, np.zeros_like(ids))
                first = tokens.cpu().numpy()
                for i, group in enumerate(planned):
                    group.first_tokens = first[i * params.n : (i + 1) * params.n].tolist()
                records.append((first, logp, ids))
                prefill_tokens += sum(g.prompt_len for g in planned)
                prefill_calls += 1
                prefill_s += time.perf_counter() - t0
            placed = scheduler.place()
            if placed:
                runner.add_rows(placed)
            if not scheduler.running:
                if not planned and scheduler.has_work():
                    raise RuntimeError("rollout engine scheduler made no progress (KV pool too small?)")
                continue
            t0 = time.perf_counter()
            kv_token_reads += scheduler.cached_tokens()
            capture_before = runner.capture_s
            logits = runner.decode()  # (B, V)
            t0 += runner.capture_s - capture_before  # a first-time graph capture is not decode time
            tokens, logp = sample(logits, scheduler.row_seq_ids, scheduler.row_tokens)
            runner.set_next_tokens(tokens)
            tokens_np = tokens.cpu().numpy()
            records.append((tokens_np, logp, scheduler.row_seq_ids))
            if routing is not None:  # after the tokens' sync; a copy: the buffer is reused
                routed = runner.routed_rows(len(tokens_np)).to("cpu", copy=True)  # (B, L, K) int16
                routing.append((routed.numpy(), scheduler.row_seq_ids))
            keep = scheduler.step_done(tokens_np)
            if self.on_progress is not None and len(scheduler.finished) > reported:
                self.on_progress(len(scheduler.finished) - reported)
                reported = len(scheduler.finished)
            if keep is not None:
                runner.keep_rows(keep.tolist())
            steps += 1
            decode_tokens += len(tokens_np)
            decode_s += time.perf_counter() - t0
        self.stats.update(
            prefill_s=prefill_s,
            decode_s=decode_s,
            decode_steps=steps,
            decode_tokens=decode_tokens,
            prefill_tokens=prefill_tokens,
            prefill_rounds=prefill_calls,
            kv_token_reads=kv_token_reads,
            kernels=runner.kernels,
            cuda_graphs=runner.use_cuda_graphs,
        )
        if self.shape.num_moe_layers:
            self.stats["experts_kernel"] = runner.experts_kernel
        completions = self._completions(groups, scheduler.finished, records)
        self.routed_experts = None if routing is None else self._routing(groups, scheduler.finished, routing)
        for group, routed in zip(completions, self.routed_experts or []):
            for completion, experts in zip(group, routed):
                completion.routed_experts = experts
        return completions

    def _routing(self, groups, finished, routing) -> list[list[np.ndarray]]:
        """Each sequence's per-step expert choices (R - 1, L, K), gathered from the step records."""
        s = self.shape
        total = sum(g.n for g in groups)
        empty = np.zeros((0, s.num_moe_layers, s.num_experts_per_tok), dtype=np.int16)
        experts = np.concatenate([r[0] for r in routing]) if routing else empty
        ids = np.concatenate([r[1] for r in routing]) if routing else np.zeros(0, dtype=np.int64)
        order = np.argsort(ids, kind="stable")  # chronological within each sequence
        offsets = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=total))])
        experts = experts[order]
        steps = {seq.seq_id: seq.num_tokens - 1 for seq in finished}
        out = []
        for group in groups:
            rows = []
            for seq_id in range(group.first_seq_id, group.first_seq_id + group.n):
                start, end = offsets[seq_id], offsets[seq_id + 1]
                assert end - start == steps[seq_id], (seq_id, end - start, steps[seq_id])
                rows.append(experts[start:end])
            out.append(rows)
        return out

    def _completions(self, groups, finished, records) -> list[list[Completion]]:
        """Each sequence's tokens and logprobs, gathered from the per-step records."""
        tokens = np.concatenate([r[0] for r in records])
        logp = torch.cat([r[1] for r in records]).float().cpu().numpy()
        ids = np.concatenate([r[2] for r in records])
        order = np.argsort(ids, kind="stable")  # chronological within each sequence
        offsets = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=sum(g.n for g in groups)))])
        tokens, logp = tokens[order], logp[order]
        by_id = {seq.seq_id: seq for seq in finished}
        results: list[list[Completion]] = []
        for group in groups:
            out = []
            for seq_id in range(group.first_seq_id, group.first_seq_id + group.n):
                seq = by_id[seq_id]
                start = offsets[seq_id]
                seq_tokens = tokens[start : start + seq.num_tokens].tolist()
                assert offsets[seq_id + 1] - start == seq.num_tokens, (seq_id, offsets[seq_id + 1] - start)
                out.append(
                    Completion(
                        group.index,
                        seq_tokens,
                        logp[start : start + seq.num_tokens].tolist(),
                        seq.finish_reason,
                        self.processor.decode(seq_tokens),
                    )
                )
            results.append(out)
        return results

    # ------------------------------------------------------------------ internals

    def _prepare_weights(self) -> None:
        """Decode runs matmuls in the caller's autocast dtype if autocast is on, else in the
        parameters' dtype; (re)build the weight view when that changes."""
        dtype = _matmul_dtype(self.model, self.device)
        if self.weights is None or self.weights.matmul_dtype != dtype:
            self.weights = DecodeWeights(self.model, dtype, copy_all=self.options.copy_weights)
            self.runner.set_weights(self.weights)

    def _num_blocks(self, groups: list[Group]) -> int:
        """KV pool size: what this call could use at most, capped by the memory budget. A pool
        still allocated (release_kv=False) is reused when it is large enough, graphs and all."""
        sizes = [blocks_needed(g, self.block_size) for g in groups]
        everything = 1 + sum(prompt + g.n * own for g, (prompt, own, _) in zip(groups, sizes))
        # at most max_num_seqs + lookahead samples (and as many prompts) hold blocks at once
        live = self.max_num_seqs + self.lookahead
        at_once = (
            1 + live * max(own for _, own, _ in sizes) + min(len(groups), live) * max(p for p, _, _ in sizes)
        )
        need = min(everything, at_once)
        layout = self._kv_layout()
        kv = self.runner.kv
        if (
            kv is not None
            and kv.layout == layout
            and kv.num_blocks >= min(need, self.options.num_kv_blocks or need)
        ):
            return kv.num_blocks
        if self.options.num_kv_blocks is not None:
            budget = self.options.num_kv_blocks
        else:
            if kv is not None:  # its memory counts as free
                self.runner.sleep()
            budget = kv_budget_bytes(self.device, self.cfg.gpu_memory_utilization) // layout.bytes_per_block
        num_blocks = min(_round_up_blocks(need), budget)
        worst = max(prompt + own for prompt, own, _ in sizes) + 1
        if num_blocks < worst:
            raise ValueError(
                f"the KV cache budget ({budget} blocks of {self.block_size} tokens) cannot hold one prompt "
                f"and one completion ({worst} blocks): raise rollout.gpu_memory_utilization or lower "
                "rollout.max_new_tokens / data.max_prompt_length"
            )
        return num_blocks

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _check_plain(model: torch.nn.Module) -> None:
    """Decode reads weights, not layers: a model with LoRA adapters would decode from its base
    while prefill applied them. Such a policy is served by its merged copy (RolloutCopy)."""
    from lensrl.train.lora import has_lora

    if has_lora(model):
        raise ValueError("the engine decodes from plain weights and would sample a LoRA model's base: give it the "
                         "policy's merged copy (lensrl.train.fsdp.RolloutCopy), as setup_policy does")


def _varlen_vision(model: torch.nn.Module) -> None:
    """Prefill on lensrl's packed attention (lensrl.train.attention): the prompts of a prefill
    call run back to back in one row with no padding, and the vision tower runs each image window
    as one varlen call (transformers' sdpa path loops over windows: it made prefill 6x slower
    than decode). On CUDA varlen FlashAttention; on the CPU a block-diagonal mask. Attention
    calls that carry no packing stay transformers' own sdpa, so the trainer is unaffected."""
    from lensrl.train.attention import enable_packed_attention

    enable_packed_attention(model)


def _round_up_blocks(need: int) -> int:
    """Pool sizes in steps of a quarter octave, so that calls of similar size ask the allocator for
    the same size (and usually get the same segment back: the CUDA graphs stay valid)."""
    step = 1 << max(0, need.bit_length() - 3)
    return -(-need // step) * step


def _matmul_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.lm_head.weight.dtype


def _caller_autocast(device: torch.device):
    """The caller's autocast state, re-entered for the prefill (the decode path sets its dtypes
    explicitly and runs with autocast off)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type))
    return contextlib.nullcontext()
