"""Full-parameter supervised fine-tuning of a VLM: loss on assistant tokens only, gradient
accumulation from micro-batches to the global batch, periodic accuracy by greedy generation."""

from __future__ import annotations

import math
import time

import torch

from lensrl.config import SFTConfig, check, load_config
from lensrl.data.datasets import BatchSampler, process_rows
from lensrl.rewards.pool import RewardPool
from lensrl.train import distributed as dist
from lensrl.train.fsdp import forward_with_anchor, prepare_micro_batch
from lensrl.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from lensrl.train.router import RouterRecorder
from lensrl.train.runlock import release_run_lock
from lensrl.train.sequences import forward_response_logprobs, sft_sequence
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
    validate,
)


class SFTTrainer:
    def __init__(self, cfg: SFTConfig):
        check(cfg)  # the cross-key rules, before anything loads (load_config checked them too)
        check_data(cfg.data)
        self.cfg = cfg
        t = cfg.trainer
        setup_policy(self, cfg)
        self.router = RouterRecorder(self.policy, cfg.model.router_aux_loss_coef)  # MoE: aux loss, expert load
        self.train_data = load_split(cfg.data.train_files, cfg.data, "train", self.processor)
        self.val_data = load_split(cfg.data.val_files, cfg.data, "test", self.processor)
        num_train = len(self.train_data) if self.train_data is not None else 0
        self.total_steps = t.total_steps or max(1, t.num_epochs * num_train // t.global_batch_size)
        if self.train_data is None:
            self.total_steps = 0  # data.train_files: null means evaluation only
        size = min(t.global_batch_size, max(num_train, 1))
        self.sampler = (BatchSampler.from_dataset(self.train_data, size, cfg.data.seed, cfg.data.shuffle)
                        if self.train_data is not None else BatchSampler(1, 1, cfg.data.seed))
        self.optimizer = build_optimizer(self.policy.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, max(self.total_steps, 1), cfg.optim)
        self.rollout = build_rollout(cfg.rollout, self.rollout_model, self.processor, self.device)
        self.pool = RewardPool(cfg.reward)
        self.run_dir = prepare_run_dir(t.output_dir, t.run_name, cfg)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.bad_steps_in_row = 0
        if self.total_steps:  # evaluation only: nothing to resume
            resume(self)
        self.logger = make_logger(self.run_dir, t, cfg, self.total_steps, start_step=self.step)

    def fit(self) -> dict[str, float]:
        t = self.cfg.trainer
        stop = StopFlag()
        stop.install()
        metrics: dict[str, float] = {}
        recent_losses: list[float] = []
        try:
            if self.val_data is not None and (self.total_steps == 0 or (t.val_before_train and self.step == 0)):
                metrics = validate(self, self.step)
                self.logger.log(metrics, self.step)
                self.logger.info(f"step {self.step}: {headline(metrics)}")
            while self.step < self.total_steps:
                self.step += 1
                with step_scope(self, self.step):
                    metrics = self.train_step()
                recent_losses = (recent_losses + [metrics["train/loss"]])[-5:]
                if t.stop_at_loss is not None and len(recent_losses) == 5 and sum(recent_losses) / 5 < t.stop_at_loss:
                    self.logger.info(f"step {self.step}: mean loss of the last 5 steps below {t.stop_at_loss}; stopping")
                    self.total_steps = self.step
                if finish_step(self, metrics, stop):
                    return metrics
            save_final_hf(self)
            return metrics
        finally:
            self.pool.close()
            self.logger.close()
            release_run_lock(self.run_dir)

    def train_step(self) -> dict[str, float]:
        t, start = self.cfg.trainer, time.time()
        batch = self.sampler.next_batch()
        positions = dist.shard(list(range(len(batch))))
        items = {}
        _, processed = process_rows(self.train_data, self.sampler, batch, positions,
                                    lambda s: self.processor(s, add_target=True), self.cfg.data.skip_bad_rows)
        for pos, p in zip(positions, processed):
            m = p.loss_mask[p.prompt_length :]
            items[pos] = {"seq": sft_sequence(p), "target": m}
        # ranks trade sequences so each carries a similar number of tokens
        held = spread(items, {g: it["seq"].num_tokens for g, it in items.items()}, [list(range(len(batch)))])
        order = sorted(held)
        seqs = [held[g]["seq"] for g in order]
        width = max((s.response_length for s in seqs), default=1)
        target_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, g in enumerate(order):
            m = held[g]["target"]
            target_mask[i, : m.shape[0]] = m
        num_tokens = dist.all_reduce_sum(torch.tensor(float(target_mask.sum()), device=self.device)).item()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        router_metrics: dict[str, float] = {}
        micros = micro_batches(list(range(len(seqs))), seqs, t.use_dynamic_bsz, t.max_tokens_per_mbs,
                               t.micro_batch_size, same_count_on_all_ranks=self.anchor is not None)
        for i, micro in enumerate(micros):
            prepare_micro_batch(self.policy, t.fsdp, last=i == len(micros) - 1)
            mask = target_mask[micro].to(self.device)
            with autocast(self.device, self.amp_dtype), self.router.capture() as routed:
                logp, _, _ = forward_with_anchor([seqs[i] for i in micro], self.anchor, lambda run: (
                    forward_response_logprobs(self.policy, run, self.processor.pad_token_id, chunk_size=1024,
                                              width=width, suppress_ids=self.processor.suppress_token_ids,
                                              packed=t.use_dynamic_bsz)))
            loss = -(logp * mask).sum() / max(num_tokens, 1.0)  # token mean over the global batch
            router_term, micro_router = self.router.loss_term(routed, float(mask.sum()) / max(num_tokens, 1.0), "train")
            (loss + router_term).backward()  # MoE load balancing (train/loss stays the target NLL)
            total_loss += loss.item()
            for k, v in micro_router.items():
                router_metrics[k] = router_metrics.get(k, 0.0) + v
        total_loss = dist.all_reduce_sum(torch.tensor(total_loss, device=self.device)).item()
        router_metrics = {**dist.sum_metrics(router_metrics), **self.router.take_metrics()}
        grad_norm = float(clip_grad_norm(self.policy.parameters(), self.cfg.optim.grad_clip))
        lr = self.optimizer.param_groups[0]["lr"]  # what this step's update uses (logged as used)
        if math.isfinite(grad_norm) and math.isfinite(total_loss):
            self.optimizer.step()
            self.bad_steps_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps_in_row += 1
        self.scheduler.step()
        elapsed = time.time() - start
        tokens = dist.all_reduce_sum(torch.tensor(float(sum(s.num_tokens for s in seqs)))).item()
        skipped = {"data/skipped_rows": float(self.sampler.num_skipped)} if self.cfg.data.skip_bad_rows else {}
        return {
            **skipped, **router_metrics, "train/loss": total_loss, "train/grad_norm": grad_norm, "train/lr": lr,
            "train/target_tokens": num_tokens, "train/skipped_updates": float(self.bad_steps_in_row > 0),
            "timing_s/step": elapsed, "perf/throughput": tokens / max(elapsed, 1e-9),
            "perf/throughput_per_gpu": tokens / max(elapsed, 1e-9) / dist.world_size(),
            "perf/cpu_memory_used_gb": cpu_memory_gb(),
        }


def run_sft(config_path: str | None, overrides: list[str]) -> dict[str, float]:
    return SFTTrainer(load_config(SFTConfig, config_path, overrides)).fit()
