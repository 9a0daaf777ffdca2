"""AdamW and the learning-rate schedule (linear warmup, then constant or cosine)."""

from __future__ import annotations

import math

import torch

from lensrl.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable `params`, which must be fp32 (master weights): a plain AdamW step on
    bf16/fp16 weights rounds updates below half an ulp away (at lr 1e-6, most of them). Raises
    ValueError naming a low-precision parameter."""
    params = [p for p in params if p.requires_grad]
    low = [p for p in params if p.dtype in (torch.bfloat16, torch.float16)]
    if low:
        raise ValueError(f"{len(low)} trainable parameters are {low[0].dtype}: AdamW needs fp32 master weights "
                         "to apply RL-sized updates (model.dtype=auto keeps them)")
    # foreach is fastest on CPU and GPU for many small tensors; fused needs CUDA params.
    use_fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=use_fused
    )


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based)."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total_steps - warmup, 1), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def follow_schedule(scheduler, cfg: OptimConfig, position: int) -> None:
    """After a resume: the schedule this run's config describes (its lr, warmup, total steps), at
    `position` (optimizer steps the run has taken by this config's count: steps done x updates per
    step). The checkpoint's scheduler and optimizer carry the old run's lr (at the end of a
    finished cosine schedule: 0) and the old count of updates per step, which the next step would
    otherwise use while the log showed the new schedule's value. The loaded param groups also
    carry the old run's betas, eps and weight decay: this config's replace them too."""
    for group in scheduler.optimizer.param_groups:
        group.update(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    scheduler.last_epoch = position
    scheduler.base_lrs = [cfg.lr] * len(scheduler.optimizer.param_groups)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (<= 0: only measure) and return the total norm, inf/nan included as is."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # FSDP: the norm of sharded gradients is a DTensor (already reduced over ranks)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
