"""GRPO and its relatives: rollout -> reward -> advantage -> logprobs -> loss -> step -> sync.

`GRPOTrainer.train_step` reads top to bottom; the details live in named functions in
`lensrl.algorithms` (advantages, losses) and `lensrl.train` (sequences, logprobs, checkpoints).
"""

from __future__ import annotations

import contextlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lensrl.algorithms.advantages import compute_advantages, group_stats, zero_variance_groups
from lensrl.algorithms.losses import (
    agg_loss,
    kl_penalty,
    policy_loss,
    rollout_train_gap,
    truncated_is_weights,
)
from lensrl.config import GRPOConfig, check
from lensrl.data.datasets import BatchSampler, process_rows
from lensrl.logging import console, progress_bar
from lensrl.models.compile import compile_enabled, compile_seconds
from lensrl.models.load import update_flops_per_token
from lensrl.rewards.function import reward_sample
from lensrl.rewards.pool import RewardPool
from lensrl.rollout.base import SamplingParams
from lensrl.train import distributed as dist
from lensrl.train import heartbeat
from lensrl.train.fsdp import forward_with_anchor, prepare_micro_batch
from lensrl.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from lensrl.train.router import RouterRecorder
from lensrl.train.runlock import release_run_lock
from lensrl.train.sequences import Sequence, forward_response_logprobs, make_sequence, to_device
from lensrl.trainers.common import (
    StopFlag,
    autocast,
    build_rollout,
    check_data,
    cpu_memory_gb,
    finish_step,
    headline,
    load_split,
    make_logger,
    micro_batches,
    prepare_run_dir,
    resume,
    save_final_hf,
    setup_policy,
    spread,
    step_scope,
    sync_rollout,
    validate,
)
from lensrl.trainers.evaluate import report_reward_failures

H100_BF16_FLOPS = 989e12  # dense bf16 peak used for perf/mfu/actor (the H200 has the same)


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig):
        check(cfg)  # the cross-key rules, before anything loads (load_config checked them too)
        check_data(cfg.data)
        self.cfg = cfg
        t, actor = cfg.trainer, cfg.actor
        self.startup: dict[str, float] = {}  # where the time to the first step goes: timing_s/startup/* at step 1
        with _timer(self.startup, "policy"):  # load, compile wrappers, FSDP, the rollout's full-weight copy
            # the frozen reference exists only when a KL term needs it
            setup_policy(self, cfg, with_ref=cfg.algorithm.use_kl_loss)
        self.compiled = compile_enabled(cfg.model.compile, self.device)  # compiles happen at first call
        self.compile_s = compile_seconds() if self.compiled else 0.0
        self.router = RouterRecorder(self.policy, cfg.model.router_aux_loss_coef)  # MoE: aux loss, expert load
        self._overlong_warned = False
        self.flops_per_token = update_flops_per_token(self.policy)  # perf/mfu/actor; what trains is fixed from here
        with _timer(self.startup, "data"):
            self.train_data = load_split(cfg.data.train_files, cfg.data, "train", self.processor)
            self.val_data = load_split(cfg.data.val_files, cfg.data, "test", self.processor)
        self.sampler = BatchSampler.from_dataset(self.train_data, t.rollout_batch_size, cfg.data.seed,
                                                 cfg.data.shuffle)
        with _timer(self.startup, "rollout"):  # the engine: KV cache, weights, CUDA graphs
            self.rollout = build_rollout(cfg.rollout, self.rollout_model, self.processor, self.device)
        self.pool = RewardPool(cfg.reward)
        self.updates_per_step = actor.ppo_epochs * (t.rollout_batch_size // actor.mini_batch_size)
        self.optimizer = build_optimizer(self.policy.parameters(), actor.optim)
        self.scheduler = build_scheduler(self.optimizer, t.total_steps * self.updates_per_step, actor.optim)
        self.run_dir = prepare_run_dir(t.output_dir, t.run_name, cfg)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.total_steps = t.total_steps
        self.step = 0
        self.bad_steps_in_row = 0
        self.reward_error_shown = False
        resume(self)
        self.logger = make_logger(self.run_dir, t, cfg, t.total_steps, start_step=self.step)

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        t = self.cfg.trainer
        stop = StopFlag()
        stop.install()
        metrics: dict[str, float] = {}
        try:
            if t.val_before_train and self.step == 0 and self.val_data is not None:
                metrics = validate(self, 0)
                self.logger.log(metrics, 0)
                self.logger.info(f"before training: {headline(metrics)}")
            while self.step < self.total_steps:
                self.step += 1
                with step_scope(self, self.step):
                    metrics = self.train_step(self.step)
                if finish_step(self, metrics, stop):
                    return metrics
            save_final_hf(self)
            return metrics
        finally:
            self.pool.close()
            self.logger.close()
            release_run_lock(self.run_dir)

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        n = cfg.rollout.n
        timing: dict[str, float] = {}
        step_start = time.time()

        # 1-2. Rollout and reward: this rank's share of each mini-batch's prompts, n completions
        #      each, seeded by global position; with filtering, more rounds until enough groups
        #      have reward variance (DAPO dynamic sampling).
        rollouts = self.collect(step, timing)
        everyone = rollouts.everyone  # every rank's rows of the groups trained on, by global id

        # 3. Advantages over the global batch (group statistics, and REINFORCE++'s whitening).
        with _timer(timing, "adv"):
            rewards = torch.tensor([row["reward"] for row in everyone], dtype=torch.float32)
            valid = torch.tensor([row["valid"] for row in everyone])
            adv_mask = (torch.arange(max(int(valid.max()) if len(valid) else 0, 1)) < valid[:, None]).float()  # (B, T)
            advantages = compute_advantages(rewards, n, adv_mask, cfg.algorithm.adv_estimator,
                                            cfg.algorithm.norm_adv_by_std)

        # 4. Spread the sequences over ranks by tokens, mini-batch by mini-batch.
        with _timer(timing, "spread"):
            items = {}
            for gid, prompt, c, row in rollouts.local:
                items[gid] = {"seq": make_sequence(prompt, c.token_ids), "rollout_logp": c.logprobs,
                              "valid": row["valid"], "adv": float(advantages[gid, 0]) if row["valid"] else 0.0,
                              "routed": c.routed_experts}
            num_tokens = {gid: item["seq"].num_tokens for gid, item in items.items()}
            minibatches = self.minibatch_plan(len(everyone))
            held = spread(items, num_tokens, minibatches)
            order = sorted(held)
            seqs = [held[g]["seq"] for g in order]
            width = max((s.response_length for s in seqs), default=1)
            mask = _pad([[1.0] * held[g]["valid"] for g in order], width).bool()
            generated = _pad([[1.0] * s.response_length for s in seqs], width).bool()
            rollout_logp = _pad([held[g]["rollout_logp"] for g in order], width)
            adv = torch.tensor([held[g]["adv"] for g in order]).reshape(-1, 1) * mask.float()
            local = {g: k for k, g in enumerate(order)}

        # 5. Old and reference log-probabilities (at the rollout temperature). The policy's weights
        #    are the rollout's now: under FSDP its full-weight copy computes them without collectives.
        #    Exactly on-policy (one epoch, one mini-batch), the update's own serve instead (verl).
        old_logp = None
        if not self.on_policy(minibatches):
            with _timer(timing, "old_log_prob"):
                old_logp = self.logprobs(self.logprob_model, seqs, width)
        routing = self.routing_gap(seqs, [held[g]["routed"] for g in order], timing)  # MoE + engine
        ref_logp = None
        if self.ref is not None:
            with _timer(timing, "ref"):
                ref_logp = self.logprobs(self.ref, seqs, width, base=self.lora)  # LoRA: adapters off
        is_weights, is_metrics = self.is_weights(old_logp, rollout_logp, mask)

        # 6. Policy update over ppo_epochs x mini-batches.
        data = {"old_logp": old_logp, "ref_logp": ref_logp, "adv": adv, "mask": mask, "is_weights": is_weights,
                "rollout_logp": rollout_logp, "current_logp": torch.zeros(len(seqs), width) if old_logp is None else None}
        local_minibatches = [[local[g] for g in mb if g in local] for mb in minibatches]
        with _timer(timing, "update_actor"):
            update_metrics = self.update(seqs, data, local_minibatches, width)
        if old_logp is None:  # on-policy: the update's first forward was the old policy's
            old_logp = data["current_logp"]
            is_metrics = self.is_weights(old_logp, rollout_logp, mask)[1]
        while self.scheduler.last_epoch < step * self.updates_per_step:  # a short step keeps the schedule on time
            self.scheduler.step()

        # 7. Weights into the rollout backend.
        with _timer(timing, "update_weights"):
            sync_rollout(self)
        timing["step"] = time.time() - step_start

        metrics = self._step_metrics(rollouts.generated, seqs, timing)
        # means over every rank's tokens (a rank's mean weighted by its token count)
        metrics.update(dist.weighted_mean_metrics(rollout_train_gap(old_logp, rollout_logp, generated),
                                                  float(generated.sum())))
        metrics.update(dist.weighted_mean_metrics(*routing))
        metrics.update(update_metrics)
        metrics.update(self.router.take_metrics())  # MoE: tokens per expert over the update's forwards
        metrics.update(dist.weighted_mean_metrics({f"rollout/{k}" if not k.startswith("rollout/") else k: v
                                                   for k, v in is_metrics.items()}, float(mask.sum())))
        metrics.update(_group_stats(rollouts.generated, n, cfg.reward))
        metrics.update(_advantage_stats(advantages, adv_mask))
        metrics["advantage/filtered_groups"] = float(rollouts.num_filtered)
        metrics["batch/num_gen_batches"] = float(rollouts.num_rounds)
        if cfg.data.skip_bad_rows:  # rows skipped as bad so far, at load or in a step (earlier runs included)
            metrics["data/skipped_rows"] = float(self.sampler.num_skipped)
        if not everyone and dist.is_main():
            console.print(f"[yellow]step {step}: no group had reward variance in {rollouts.num_rounds} round(s) of "
                          "generation; no update[/yellow]")
        self._log_samples(step, *rollouts.first)
        return metrics

    def collect(self, step: int, timing: dict[str, float]) -> Rollouts:
        """Rollout and reward of the step's prompt batch. With `algorithm.filter_zero_variance_groups`
        (DAPO dynamic sampling, verl's filter_groups), groups whose rewards are all equal are
        dropped and further prompt batches are generated until `trainer.rollout_batch_size` groups
        with signal are gathered (the first ones, in generation order), for at most
        `algorithm.max_num_gen_batches` rounds; then it trains on what it has (the metrics
        batch/num_gen_batches and advantage/filtered_groups say so). The kept groups are
        renumbered 0 .. K-1 (global ids 0 .. K*n - 1)."""
        cfg, actor, n = self.cfg, self.cfg.actor, self.cfg.rollout.n
        size, filtering = cfg.trainer.rollout_batch_size, cfg.algorithm.filter_zero_variance_groups
        kept_local, kept_rows, generated, first = [], [], [], None
        num_rounds = num_filtered = 0
        while True:
            offset = num_rounds * size  # later rounds' prompts follow the first's: their own random streams
            num_rounds += 1
            with _timer(timing, "data"):
                batch = self.sampler.next_batch()
                positions = dist.shard(list(range(len(batch))), block_size=actor.mini_batch_size)
                samples, prompts = process_rows(self.train_data, self.sampler, batch, positions, self.processor,
                                                cfg.data.skip_bad_rows)
            with _timer(timing, "gen"), torch.no_grad(), autocast(self.device, self.amp_dtype), \
                    rollout_progress(self.rollout, len(prompts) * cfg.rollout.n, dist.is_main()):
                groups = self.rollout.generate(prompts, self.sampling_params(step),
                                               positions=[offset + p for p in positions])
            flat = [(i, c) for i, group in enumerate(groups) for c in group]
            with _timer(timing, "reward"):
                results = self.shape_overlong(self.score(samples, flat), flat)
            first = first or (samples, flat, results)
            local = []
            for k, ((i, c), r) in enumerate(zip(flat, results)):
                valid = 0 if actor.mask_truncated_completions and c.finish_reason == "length" else len(c.token_ids)
                row = {"gid": (offset + positions[i]) * n + k % n, "reward": r.score, "valid": valid,
                       "parts": r.parts, "status": r.status, "length": len(c.token_ids),
                       "truncated": c.finish_reason == "length", "prompt_length": int(prompts[i].input_ids.shape[0])}
                if r.status == "error":  # what the reward function raised, and where
                    row["error"] = (samples[i].where(), r.detail)
                local.append((row["gid"], prompts[i], c, row))
            with _timer(timing, "adv"):
                rows = sorted((row for part in dist.all_gather_objects([x[3] for x in local]) for row in part),
                              key=lambda row: row["gid"])
            generated += rows
            self.reward_error_shown = report_reward_failures(rows, f"step {step}", cfg.reward.timeout_s,
                                                             self.reward_error_shown)
            no_signal = zero_variance_groups(torch.tensor([row["reward"] for row in rows]), n).tolist()
            keep = {rows[g * n]["gid"] // n for g, flat_group in enumerate(no_signal) if not (filtering and flat_group)}
            num_filtered += len(no_signal) - len(keep)
            kept_rows += [row for row in rows if row["gid"] // n in keep]
            kept_local += [x for x in local if x[0] // n in keep]
            if not filtering or len(kept_rows) >= size * n or num_rounds >= cfg.algorithm.max_num_gen_batches:
                break
        chosen = {g: k for k, g in enumerate(sorted({row["gid"] // n for row in kept_rows})[:size])}

        def renumber(gid: int) -> int:
            return chosen[gid // n] * n + gid % n

        everyone = [{**row, "gid": renumber(row["gid"])} for row in kept_rows if row["gid"] // n in chosen]
        local = [(renumber(g), prompt, c, {**row, "gid": renumber(g)}) for g, prompt, c, row in kept_local
                 if g // n in chosen]
        return Rollouts(local, everyone, generated, num_rounds, num_filtered, first)

    def on_policy(self, minibatches: list[list[int]]) -> bool:
        """Whether the step's one optimizer step starts from the weights that generated it: one
        epoch over one mini-batch (verl's `on_policy`), and actor.reuse_on_policy_logprob."""
        actor = self.cfg.actor
        return actor.reuse_on_policy_logprob and actor.ppo_epochs == 1 and len(minibatches) == 1

    def is_weights(self, old_logp, rollout_logp, mask) -> tuple[torch.Tensor | None, dict]:
        """TIS weights and metrics (truncated_is_weights) when actor.importance_sampling_fix, else
        (None, {}); (None, {}) too when old_logp is None (on-policy: computed in the update)."""
        actor = self.cfg.actor
        if not actor.importance_sampling_fix or old_logp is None:
            return None, {}
        return truncated_is_weights(old_logp, rollout_logp, mask, actor.importance_sampling_clip,
                                    actor.importance_sampling_level)

    def minibatch_plan(self, num_rows: int) -> list[list[int]]:
        """Global ids 0 .. num_rows - 1 in mini-batches of actor.mini_batch_size groups (the last
        one smaller only when filtering ran out of rounds)."""
        per = self.cfg.actor.mini_batch_size * self.cfg.rollout.n
        return [list(range(i, min(i + per, num_rows))) for i in range(0, num_rows, per)]

    # ------------------------------------------------------------------------------------------
    def score(self, samples, flat) -> list:
        """Reward of each completion for its sample (the reward function in worker processes, with
        timeouts; lensrl.rewards.function)."""
        prefix = self.processor.assistant_prefix
        return self.pool.score_batch([(c.text, reward_sample(samples[i], prefix)) for i, c in flat])

    def shape_overlong(self, results: list, flat) -> list:
        """With `reward.overlong_buffer_len`: each completion's score plus DAPO's overlong penalty
        (`lensrl.rewards.overlong_penalty`, <= 0), which also becomes its `overlong_penalty` part
        (logged as reward/overlong_penalty). Unchanged when off."""
        from lensrl.rewards import RewardResult, overlong_penalty

        r = self.cfg.reward
        if r.overlong_buffer_len <= 0:
            return results
        shaped, ended, hit = [], 0, 0
        for (_, c), res in zip(flat, results):
            penalty = overlong_penalty(len(c.token_ids), self.cfg.rollout.max_new_tokens, r.overlong_buffer_len,
                                       r.overlong_penalty_factor)
            shaped.append(RewardResult(res.score + penalty, {**res.parts, "overlong_penalty": penalty}, res.status,
                                       res.detail))
            if c.finish_reason != "length":
                ended, hit = ended + 1, hit + (penalty < 0)
        # The buffer is meant for runaway completions. When it reaches most of those that ended on their
        # own, the penalty teaches the policy to answer shorter than the answers are (GPU, 2026-12-01:
        # 5-token answers, 8 new tokens, buffer 4 -> every completion lost 0.25, accuracy 53% -> 20%)
        if hit > ended / 2 and not self._overlong_warned and dist.is_main():
            self._overlong_warned = True
            first = self.cfg.rollout.max_new_tokens - r.overlong_buffer_len + 1
            console.print(f"[yellow]reward.overlong_buffer_len={r.overlong_buffer_len}: {hit} of the {ended} completions "
                          f"that ended on their own were penalised (the penalty starts at token {first} of "
                          f"rollout.max_new_tokens={self.cfg.rollout.max_new_tokens}); it is meant for overlong "
                          "completions, and here it pushes the policy to shorten its answers: raise "
                          "rollout.max_new_tokens or lower the buffer[/yellow]")
        return shaped

    def sampling_params(self, step: int) -> SamplingParams:
        """The step's sampling. With `rollout.seed`, seeded by (seed, step) and, in the backend, by
        each prompt's global position: any number of ranks and any rollout.batch_size draw the
        same completions, with either backend. Without, each rank draws from its
        own RNG stream (seeded by trainer.seed + rank, restored on resume)."""
        r = self.cfg.rollout
        seed = None if r.seed is None else r.seed * 1_000_003 + step
        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, seed=seed)

    def logprobs(self, model: torch.nn.Module, seqs: list[Sequence], width: int, base: bool = False) -> torch.Tensor:
        """Response log-probabilities under `model`, no gradient, in micro-batches: (B, width).
        `base`: with its LoRA adapters off (the reference of a LoRA policy)."""
        from lensrl.train.lora import adapters_disabled

        out = torch.zeros(len(seqs), width)
        with torch.no_grad(), autocast(self.device, self.amp_dtype), \
                (adapters_disabled(model) if base else contextlib.nullcontext()):
            for micro in self.micro_batches(list(range(len(seqs))), seqs):
                logp, _, _ = self.forward(model, [seqs[i] for i in micro], width)
                out[micro] = logp.cpu()
        return out

    def routing_gap(self, seqs: list[Sequence], routed: list, timing: dict[str, float]) -> tuple[dict[str, float], float]:
        """({"rollout/router_mismatch": fraction of (token, MoE layer) top-k expert sets where the
        engine's decode differs from the model's own packed forward}, decisions compared), over up to
        `rollout.router_mismatch_seqs` of this rank's sequences, under the training autocast. The
        forward runs on the rollout's weights: the bf16 copy under FSDP, else the policy. ({}, 0)
        for a dense model, with the hf backend or when off (the same answer on every rank); the time
        it takes goes to timing["router_mismatch"] when it runs."""
        from lensrl.rollout.engine import EngineRollout
        from lensrl.rollout.engine.moe import router_mismatch, trainer_routing

        if not (self.router.enabled and self.cfg.rollout.router_mismatch_seqs > 0 and isinstance(self.rollout, EngineRollout)):
            return {}, 0.0

        pairs = [(s, r) for s, r in zip(seqs, routed) if r is not None and len(r)][: self.cfg.rollout.router_mismatch_seqs]
        if not pairs:
            return {"rollout/router_mismatch": 0.0}, 0.0
        with _timer(timing, "router_mismatch"), torch.no_grad(), autocast(self.device, self.amp_dtype):
            trainer = trainer_routing(self.rollout_model, [s for s, _ in pairs])
        engine = [r for _, r in pairs]
        return {"rollout/router_mismatch": router_mismatch(engine, trainer)}, float(sum(r.shape[0] * r.shape[1] for r in engine))

    def forward(self, model, seqs: list[Sequence], width: int, with_entropy: bool = False):
        actor = self.cfg.actor
        return forward_with_anchor(seqs, self.anchor, lambda run: forward_response_logprobs(
            model, run, self.processor.pad_token_id, self.temperature, actor.logprob_chunk_size, with_entropy,
            width, self.processor.suppress_token_ids, packed=actor.use_dynamic_bsz,
            entropy_grad=actor.entropy_coeff != 0))  # a metric only when it is not in the loss

    def micro_batches(self, rows: list[int], seqs: list[Sequence]) -> list[list[int]]:
        a = self.cfg.actor
        return micro_batches(rows, seqs, a.use_dynamic_bsz, a.max_tokens_per_mbs, a.micro_batch_size,
                             same_count_on_all_ranks=self.anchor is not None)

    @property
    def temperature(self) -> float:
        t = self.cfg.rollout.temperature
        return t if t > 0 else 1.0

    def update(self, seqs: list[Sequence], batch: dict, minibatches: list[list[int]], width: int) -> dict[str, float]:
        """ppo_epochs passes over `minibatches` (this rank's rows of each global mini-batch; every
        rank has the same number, some possibly empty): one optimizer step per mini-batch."""
        actor = self.cfg.actor
        totals: dict[str, float] = {}
        num_updates = skipped = 0
        lrs: list[float] = []  # the learning rate each optimizer step of this update used
        if not minibatches:
            return {"actor/lr": self.optimizer.param_groups[0]["lr"], "actor/skipped_updates": 0.0,
                    "actor/num_updates": 0.0}
        step_bad = False
        for _ in range(actor.ppo_epochs):
            for mb in minibatches:
                mb_mask = batch["mask"][mb]
                # Normalise by the whole mini-batch's counts (all micro-batches, all ranks), so the
                # summed micro-batch losses equal the mini-batch loss whatever the split.
                counts = dist.all_reduce_sum(torch.tensor(
                    [float(mb_mask.sum()), float((mb_mask.sum(-1) > 0).sum())], device=self.device))
                num_tokens, num_seqs = max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)
                self.optimizer.zero_grad(set_to_none=True)
                mb_metrics: dict[str, float] = {}
                micros = self.micro_batches(mb, seqs)
                for i, micro in enumerate(micros):
                    prepare_micro_batch(self.policy, self.cfg.trainer.fsdp, last=i == len(micros) - 1)
                    loss, micro_metrics = self._micro_loss(seqs, batch, micro, width, num_tokens, num_seqs)
                    loss.backward()
                    for k, v in micro_metrics.items():
                        mb_metrics[k] = mb_metrics.get(k, 0.0) + v
                for micro, logp in batch.pop("current_logp_on_device", []):  # the on-policy old log-probs
                    batch["current_logp"][micro] = logp.cpu()
                grad_norm = clip_grad_norm(self.policy.parameters(), actor.optim.grad_clip)  # queued before the sync below
                mb_metrics = dist.sum_metrics(dist.host_floats(mb_metrics))  # each rank's part of the mini-batch's values
                finite = math.isfinite(float(grad_norm)) and math.isfinite(mb_metrics.get("actor/loss", 0.0))
                if finite:
                    lrs.append(self.optimizer.param_groups[0]["lr"])
                    self.optimizer.step()
                    num_updates += 1
                else:  # skip, count, keep the weights as they were
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    step_bad = True
                self.scheduler.step()
                mb_metrics["actor/grad_norm"] = float(grad_norm)
                for k, v in mb_metrics.items():
                    totals[k] = totals.get(k, 0.0) + v
        self.bad_steps_in_row = self.bad_steps_in_row + 1 if step_bad else 0
        count = max(num_updates + skipped, 1)
        metrics = {k: v / count for k, v in totals.items()}
        metrics["actor/lr"] = sum(lrs) / len(lrs) if lrs else self.optimizer.param_groups[0]["lr"]  # as used
        metrics["actor/skipped_updates"] = float(skipped)
        metrics["actor/num_updates"] = float(num_updates)
        return metrics

    def _micro_loss(self, seqs, batch, micro, width, num_tokens, num_seqs):
        cfg, actor = self.cfg, self.cfg.actor
        # No host sync until the backward is queued: inputs go through pinned memory (to_device), the
        # metrics stay tensors until the mini-batch ends (update), so the GPU's queue never drains.
        share = float(batch["mask"][micro].sum()) / num_tokens  # this micro-batch's share of the tokens
        mask = to_device(batch["mask"][micro], self.device)  # (b, width); b may be 0 (FSDP: an empty micro-batch)
        agg = dict(num_tokens=num_tokens, num_seqs=num_seqs, horizon=cfg.rollout.max_new_tokens)
        with autocast(self.device, self.amp_dtype), self.router.capture() as routed:
            logp, entropy, _ = self.forward(self.policy, [seqs[i] for i in micro], width, with_entropy=True)
        if batch["old_logp"] is None:  # on-policy: the old log-probabilities are these, detached
            old = logp.detach()
            batch.setdefault("current_logp_on_device", []).append((micro, old.float()))  # to the host in update
            is_w = self.is_weights(old, to_device(batch["rollout_logp"][micro], self.device), mask)[0]
        else:
            old = to_device(batch["old_logp"][micro], self.device)
            is_w = to_device(batch["is_weights"][micro], self.device) if batch["is_weights"] is not None else None
        pg_loss, pg = policy_loss(
            logp, old, to_device(batch["adv"][micro], self.device), mask,
            actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c, actor.loss_agg_mode,
            level="sequence" if actor.policy_loss == "gspo" else "token", is_weights=is_w, **agg)
        entropy_term = agg_loss(entropy, mask, actor.loss_agg_mode, **agg)
        loss = pg_loss - actor.entropy_coeff * entropy_term if actor.entropy_coeff else pg_loss
        router_term, router_metrics = self.router.loss_term(routed, share, "actor")  # MoE load balancing
        loss = loss + router_term
        metrics = {"actor/pg_loss": pg_loss.detach(), "actor/entropy": entropy_term.detach(), **router_metrics}
        for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
            metrics[f"actor/{key}"] = pg[key].detach() * share if share > 0 else 0.0
        if self.ref is not None:
            kl = kl_penalty(logp, to_device(batch["ref_logp"][micro], self.device), cfg.algorithm.kl_loss_type)
            kl_loss = agg_loss(kl, mask, actor.loss_agg_mode, **agg)
            loss = loss + cfg.algorithm.kl_loss_coef * kl_loss
            metrics["actor/kl_loss"] = kl_loss.detach()
        metrics["actor/loss"] = loss.detach()
        return loss, metrics

    # ------------------------------------------------------------------------------------------

    def _step_metrics(self, everyone: list[dict], seqs: list[Sequence], timing: dict[str, float]) -> dict[str, float]:
        """Rewards and lengths over everything the step generated (`everyone`: one dict per
        sequence, all ranks, filtered groups included), timings of this rank, throughput of all
        ranks together."""
        rewards = torch.tensor([r["reward"] for r in everyone])
        lengths = torch.tensor([float(r["length"]) for r in everyone])
        prompt_lengths = torch.tensor([float(r["prompt_length"]) for r in everyone])
        truncated = torch.tensor([float(r["truncated"]) for r in everyone])
        metrics = {
            "critic/score/mean": rewards.mean().item(), "critic/score/max": rewards.max().item(),
            "critic/score/min": rewards.min().item(), "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "response_length/mean": lengths.mean().item(), "response_length/max": lengths.max().item(),
            "response_length/min": lengths.min().item(), "response_length/clip_ratio": truncated.mean().item(),
            "prompt_length/mean": prompt_lengths.mean().item(), "prompt_length/max": prompt_lengths.max().item(),
            "prompt_length/min": prompt_lengths.min().item(),
            "prompt_length/clip_ratio": (prompt_lengths >= self.cfg.data.max_prompt_length).float().mean().item(),
            "reward/timeouts": float(sum(r["status"] == "timeout" for r in everyone)),
            "reward/errors": float(sum(r["status"] == "error" for r in everyone)),
        }
        for part in sorted({part for r in everyone for part in r["parts"]}):  # every part any completion had
            metrics[f"reward/{part}"] = sum(r["parts"].get(part, 0.0) for r in everyone) / len(everyone)
        metrics.update({f"timing_s/{k}": v for k, v in timing.items()})
        metrics.update({f"timing_s/startup/{k}": v for k, v in self.startup.items()})  # then emptied: step 1 only
        self.startup = {}
        if self.compiled:  # torch.compile's share of this step (step 1: most of it; later: a recompile)
            total = compile_seconds()
            metrics["timing_s/compile"], self.compile_s = total - self.compile_s, total
        metrics.update(dist.sum_metrics(self.pool.take_metrics()))  # reward worker restarts, deaths, grader timeouts
        if dist.world_size() > 1:  # where ranks wait for each other: the slowest rank's phases
            slowest = dist.all_gather_objects(timing)
            metrics.update({f"timing_s/slowest/{k}": max(t.get(k, 0.0) for t in slowest) for k in timing})
        tokens = sum(r["prompt_length"] + r["length"] for r in everyone)
        metrics["perf/throughput"] = tokens / max(timing["step"], 1e-9)
        metrics["perf/throughput_per_gpu"] = metrics["perf/throughput"] / dist.world_size()
        metrics["perf/cpu_memory_used_gb"] = cpu_memory_gb()
        if self.device.type == "cuda":
            metrics["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            flops = self.flops_per_token * tokens * self.cfg.actor.ppo_epochs  # MoE: active; LoRA: 4 a frozen weight
            metrics["perf/mfu/actor"] = flops / max(timing["update_actor"], 1e-9) / (H100_BF16_FLOPS * dist.world_size())
        return metrics

    def _log_samples(self, step, samples, flat, results) -> None:
        records = []
        for (i, c), r in list(zip(flat, results))[: self.cfg.trainer.num_logged_samples]:
            s = samples[i]
            records.append({"prompt": s.prompt, "images": [im.origin for im in s.images], "answer": s.answer,
                            "completion": c.text, "reward": r.score, **{f"reward_{k}": v for k, v in r.parts.items()},
                            "finish_reason": c.finish_reason})
        self.logger.write_samples(step, records)


@dataclass
class Rollouts:
    """What a step trains on, after rollout, reward and (with filtering) refill."""

    local: list[tuple]  # this rank's (global id, prompt, Completion, row) of the groups trained on
    everyone: list[dict]  # every rank's rows of those groups, by global id 0 .. K*n - 1
    generated: list[dict]  # every row generated in the step, filtered groups and all rounds included
    num_rounds: int
    num_filtered: int
    first: tuple  # (samples, flat completions, rewards) of this rank's first round, for samples/


def _advantage_stats(advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """critic/advantages/mean|max|min over the valid tokens of the step's global batch (verl's names;
    advantages and mask (B, T), the same on every rank)."""
    valid = advantages[mask.bool()]
    if valid.numel() == 0:
        return {}
    return {"critic/advantages/mean": valid.mean().item(), "critic/advantages/max": valid.max().item(),
            "critic/advantages/min": valid.min().item()}


def _group_stats(everyone: list[dict], n: int, reward_cfg) -> dict[str, float]:
    """advantage/all_correct_ratio, all_wrong_ratio (from the accuracy part when the reward has one:
    a group of well formatted wrong answers is all wrong) and zero_variance_ratio (the score)."""
    if n == 1:  # a group of one is trivially "all equal": nothing to report
        return {}
    rewards = torch.tensor([row["reward"] for row in everyone], dtype=torch.float32)
    stats = group_stats(rewards, n, reward_cfg.reward_max_val, reward_cfg.reward_min_val)
    if everyone and all("accuracy" in row["parts"] for row in everyone):
        accuracy = torch.tensor([float(row["parts"]["accuracy"]) for row in everyone])
        by_accuracy = group_stats(accuracy, n, 1.0, 0.0)
        stats["advantage/all_correct_ratio"] = by_accuracy["advantage/all_correct_ratio"]
        stats["advantage/all_wrong_ratio"] = by_accuracy["advantage/all_wrong_ratio"]
    return stats


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


@contextmanager
def rollout_progress(rollout, total: int, show: bool):
    """A progress bar of the sequences `rollout` finishes inside this block (its `on_progress`)."""
    with progress_bar("rollout: sequences", total, show=show) as advance:
        rollout.on_progress = advance
        try:
            yield
        finally:
            rollout.on_progress = None


@contextmanager
def _timer(timing: dict[str, float], name: str):
    """Wall time of a phase into timing[name] (GPU work included); a named range in a profile; the
    phase noted for the hang diagnosis."""
    heartbeat.mark(name)
    start = time.time()
    try:
        with torch.profiler.record_function(f"lensrl/{name}"):
            yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timing[name] = timing.get(name, 0.0) + time.time() - start


def run_grpo(config_path: str | None, overrides: list[str]) -> dict[str, float]:
    from lensrl.config import load_config

    return GRPOTrainer(load_config(GRPOConfig, config_path, overrides)).fit()
