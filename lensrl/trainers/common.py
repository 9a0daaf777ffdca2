"""What every command does before its first step: device, seeds, run folder, model, data, rollout."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape

from lensrl.config import ConfigError, DataConfig, ModelConfig, RolloutConfig, save_config, to_dict, to_yaml
from lensrl.data.datasets import PromptDataset, load_dataset
from lensrl.logging import RunLogger, console
from lensrl.train import distributed as dist
from lensrl.train import heartbeat
from lensrl.train.checkpoint import (
    checkpoint_step,
    find_resumable,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_hf,
    set_aside,
)
from lensrl.train.heartbeat import RankHungError
from lensrl.train.optim import follow_schedule
from lensrl.train.packing import plan_micro_batches
from lensrl.train.runlock import acquire_run_lock
from lensrl.train.sequences import Sequence, image_units, make_sequence
from lensrl.trainers.errors import BadStepsError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_dtypes(cfg: ModelConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None). Parameters stay fp32 (master weights) unless
    asked; compute runs in bf16 autocast on GPU and in fp32 on CPU."""
    if cfg.dtype == "float32":
        return torch.float32, None
    if cfg.dtype == "bfloat16":
        return torch.bfloat16, None
    return torch.float32, (torch.bfloat16 if device.type == "cuda" else None)


def check_data(cfg: DataConfig) -> None:
    """Every data file, folder and hub id exists (locally), before any model loads: a DataError
    that names the path and how to get it otherwise (lensrl.data.sources)."""
    from lensrl.data.sources import resolve_sources

    for files, split in ((cfg.train_files, "train"), (cfg.val_files, "test")):
        if files:
            resolve_sources(files, split)


def setup_policy(trainer, cfg, with_ref: bool = False) -> None:
    """Device, process group, policy (+ frozen reference), FSDP and the model rollout generates
    with. Sets trainer.device, .amp_dtype, .policy, .processor, .ref, .rollout_model, .logprob_model,
    .anchor."""
    from lensrl.models.compile import compile_blocks, compile_enabled
    from lensrl.models.load import load_policy, set_gradient_checkpointing
    from lensrl.train import fsdp
    from lensrl.train.logprobs import compile_head

    t = cfg.trainer
    trainer.device = device = dist.resolve_device(t.device)
    sharded = fsdp.fsdp_enabled(t.fsdp)
    dist.init_distributed(device, t.dist_timeout_s, force=sharded)
    dist.set_cpu_threads(t.cpu_threads)
    seed_everything(t.seed + dist.rank())
    param_dtype, trainer.amp_dtype = model_dtypes(cfg.model, device)
    policy, trainer.processor = load_policy(cfg.model.path, dtype=param_dtype, device=device,
                                            min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    policy.train()
    if cfg.model.gradient_checkpointing:
        set_gradient_checkpointing(policy, cfg.model.gradient_checkpointing_scope)
    if cfg.model.freeze_vision_tower:
        policy.model.visual.requires_grad_(False)
    trainer.lora = cfg.model.lora.rank > 0
    if trainer.lora:  # adapters only; the base with adapters off is the reference (lensrl.train.lora)
        from lensrl.train.lora import add_lora

        trainable = add_lora(policy, cfg.model.lora, seed=t.seed)  # the same adapters on every rank
        if dist.is_main():
            console.print(f"LoRA rank {cfg.model.lora.rank}: {trainable:,} trainable parameters", soft_wrap=True)
    if not with_ref:
        ref = None
    elif trainer.lora:
        ref = policy  # computed with its adapters off (GRPOTrainer.logprobs(base=True)): no second copy
    else:  # a copy in its own dtype (bf16 on GPU: it only runs forward), never a transient fp32 one
        ref = frozen_copy(policy, reference_dtype(cfg.ref.dtype, param_dtype, trainer.amp_dtype))
    compiled = compile_enabled(cfg.model.compile, device)
    if compiled:  # before sharding: FSDP's hooks stay outside the compiled code
        for model in (policy, ref if ref is not policy else None):  # LoRA: the reference is the policy
            if model is not None:
                compile_blocks(model)
        compile_head()
    trainer.anchor = None
    trainer.rollout_copy = None
    if sharded:
        fsdp.shard_model(policy, t.fsdp, device)
        if ref is not None and ref is not policy:
            ref_fsdp = dataclasses.replace(t.fsdp, offload_params=cfg.ref.offload_params)
            fsdp.shard_model(ref, ref_fsdp, device, train=False)
        trainer.anchor = image_anchor(trainer.processor)
    # The rollout generates from plain, whole weights: a sharded policy's gathered, a LoRA policy's
    # merged (the engine decodes from weights, not through peft's layers; the hf backend on one
    # rank runs the peft model's own forward, the trainer's).
    if sharded or (trainer.lora and rollout_backend(cfg.rollout, device) == "engine"):
        trainer.rollout_copy = fsdp.RolloutCopy(policy, trainer.amp_dtype or param_dtype, device)
        if compiled:  # the engine's prefill runs its vision blocks and decoder layers
            compile_blocks(trainer.rollout_copy.model)
    trainer.policy, trainer.ref = policy, ref
    trainer.rollout_model = trainer.rollout_copy.model if trainer.rollout_copy is not None else policy
    # No-grad passes over the current policy (GRPO's old log-probabilities) run on the full-weight
    # copy when it holds exactly the weights FSDP computes with (its all-gather dtype): the same
    # numbers, without an all-gather per unit per micro-batch or a rank waiting for another. Not
    # for LoRA: merged weights round differently from the separate adapter path the update takes.
    gather_dtype = torch.bfloat16 if device.type == "cuda" and t.fsdp.param_dtype != "float32" else param_dtype
    same = sharded and not trainer.lora and (trainer.amp_dtype or param_dtype) == gather_dtype
    trainer.logprob_model = trainer.rollout_copy.model if same else policy


def reference_dtype(setting: str, param_dtype: torch.dtype, amp_dtype: torch.dtype | None) -> torch.dtype:
    """The KL reference's parameter dtype for `ref.dtype`: "auto" is the dtype the policy computes
    in (its autocast dtype, bf16 on GPU, else its parameter dtype), "bfloat16"/"float32" as named."""
    if setting == "auto":
        return amp_dtype or param_dtype
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[setting]


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen, eval-mode copy of an unsharded `model` (GRPO's KL reference) whose parameters are
    `model`'s, cast to `dtype` one tensor at a time: built on the meta device, so the peak is the
    copy plus one parameter (a deepcopy then cast would first hold a second copy in the model's
    own dtype: 30 GB more for a 7B with fp32 master weights). Buffers (rotary frequencies) are
    cloned as they are; tied weights stay tied."""
    from lensrl.train.fsdp import plain_model

    return plain_model(model, dtype, lambda name, param: param.detach().to(dtype, copy=True), what="reference copy")


def spread(items: dict[int, object], num_tokens: dict[int, int], blocks: list[list[int]]) -> dict[int, object]:
    """Re-deal items over ranks so each rank carries a similar number of tokens in every block
    (a GRPO mini-batch, an SFT batch), moving as few items as that takes (only moved items
    travel). items / num_tokens: this rank's, keyed by global id; blocks: global ids, the same
    lists on every rank. Returns the items this rank now holds. One rank keeps everything; no
    item is lost or duplicated."""
    if dist.world_size() == 1:
        return dict(items)
    lengths: dict[int, int] = {}
    where: dict[int, int] = {}
    for rank, part in enumerate(dist.all_gather_objects(num_tokens)):
        lengths.update(part)
        where.update(dict.fromkeys(part, rank))
    owner: dict[int, int] = {}
    for block in blocks:
        ranks = dist.balanced_assignment([lengths[g] for g in block], dist.world_size(), [where[g] for g in block])
        owner.update(zip(block, ranks))
    missing = set(lengths) - set(owner)
    if missing:
        raise ValueError(f"spread: {len(missing)} items are in no block (e.g. global id {min(missing)})")
    return dist.exchange(items, owner)


def sync_rollout(trainer, frozen: bool = False) -> None:
    """The policy's current weights into the rollout backend (through the plain copy when there
    is one: a sharded or LoRA policy). `frozen`: the frozen weights too (a checkpoint was loaded)."""
    if trainer.rollout_copy is not None:
        trainer.rollout_copy.sync(trainer.policy, frozen=frozen)
    trainer.rollout.sync_weights(trainer.rollout_model)


def image_anchor(processor) -> Sequence:
    """A one-image, one-token sequence that FSDP micro-batches without images carry along, with
    loss weight 0, so every rank runs the vision tower (see lensrl.train.fsdp)."""
    from PIL import Image

    from lensrl.data.sample import ImageSource, Sample

    image = Image.new("RGB", (56, 56))
    prompt = processor(Sample(prompt="", images=[ImageSource(image, origin="FSDP image anchor")]))
    return make_sequence(prompt, [processor.eos_token_ids[0]])


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_run_dir(output_dir: str, run_name: str, config) -> Path:
    """runs/<name>/, locked for this run (`lensrl.train.runlock`); refuses a folder that holds
    checkpoints when trainer.resume=never. The config is recorded by `record_config` once the
    resume (if any) has been accepted."""
    run_dir = Path(output_dir) / run_name
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        acquire_run_lock(run_dir)  # one run per folder: a second is refused, naming the holder
        ckpts = list_checkpoints(run_dir / "checkpoints")
        if ckpts and getattr(config.trainer, "resume", "auto") == "never":
            raise ConfigError(f"{run_dir} holds checkpoints of an earlier run (newest {ckpts[-1].name}); "
                              "continue it with trainer.resume=auto, or start afresh under another trainer.run_name")
    dist.barrier()
    heartbeat.start(run_dir, dist.rank())
    return run_dir


def record_config(run_dir: Path, config) -> None:
    """Write the resolved config.yaml. A folder that already holds a different config.yaml (a
    resumed run with changed settings) keeps it as config.step_N.yaml (N: its newest checkpoint)
    and the changed keys are printed before the first step; nothing is overwritten silently.
    Called after the resume was accepted, so a refused resume leaves the record as it was."""
    if not dist.is_main():
        return
    previous = run_dir / "config.yaml"
    if previous.is_file() and previous.read_text() != to_yaml(config):
        ckpts = list_checkpoints(run_dir / "checkpoints")
        changes = config_changes(previous, config)
        tag = ckpts[-1].name if ckpts else time.strftime("%Y%m%d-%H%M%S")
        kept = run_dir / f"config.{tag}.yaml"
        for k in range(1, 1000):  # never over an earlier record
            if not kept.exists():
                break
            kept = run_dir / f"config.{tag}.{k}.yaml"
        os.replace(previous, kept)
        console.print(f"[yellow]{escape(str(run_dir))}: config differs from the earlier run's (kept as "
                      f"{escape(kept.name)}):[/yellow]", soft_wrap=True)
        for key, (old, new) in changes.items():
            console.print(escape(f"  {key}: {old!r} -> {new!r}"), soft_wrap=True)
    save_config(config, run_dir / "config.yaml")


def config_changes(previous: Path, config) -> dict[str, tuple[object, object]]:
    """{dotted key: (value in the `previous` YAML file, value in `config`)} for every key that differs."""
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = flat(yaml.safe_load(previous.read_text())), flat(to_dict(config))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def make_logger(run_dir: Path, trainer_cfg, config, total_steps: int, start_step: int = 0) -> RunLogger:
    """The run's record from `start_step` on: config.yaml (`record_config`) and the metric sinks.
    Made after the resume, so a refused resume changes neither."""
    record_config(run_dir, config)
    return RunLogger(run_dir, trainer_cfg.loggers, total_steps, to_dict(config), trainer_cfg.run_name,
                     trainer_cfg.wandb_project, enabled=dist.is_main(), start_step=start_step)


def load_split(files: list[str] | None, cfg: DataConfig, split: str, processor) -> PromptDataset | None:
    if not files:
        return None
    files = [files] if isinstance(files, str) else list(files)
    dataset = load_dataset(files, cfg, split_name=split, length_fn=processor.prompt_length, progress=dist.is_main())
    if dist.is_main():
        console.print(escape(f"[{split}] {dataset.summary()}"), soft_wrap=True)
    if len(dataset) == 0:
        raise ValueError(f"the {split} data ({', '.join(files)}) has no usable rows: {dataset.summary()}")
    return dataset


def build_rollout(cfg: RolloutConfig, model: torch.nn.Module, processor, device: torch.device):
    """The rollout backend `cfg.backend` over `model` (a LoRA policy's must be its plain copy for
    the engine: `setup_policy` makes it)."""
    if rollout_backend(cfg, device) == "engine":
        from lensrl.rollout.engine import EngineRollout

        return EngineRollout(model, processor, cfg, capture_routing=cfg.router_mismatch_seqs > 0)  # MoE only
    from lensrl.rollout.hf import HFRollout

    return HFRollout(model, processor, batch_size=cfg.batch_size)


def rollout_backend(cfg: RolloutConfig, device: torch.device) -> str:
    """`rollout.backend` resolved: "engine" or "hf"."""
    return auto_backend(device) if cfg.backend == "auto" else cfg.backend


def auto_backend(device: torch.device) -> str:
    """What rollout.backend=auto means: the engine on CUDA, transformers generate elsewhere."""
    return "engine" if device.type == "cuda" else "hf"


@dataclass
class StopFlag:
    """Ctrl-C (SIGINT), SIGTERM (Slurm, Kubernetes and most schedulers before they kill) and
    SIGUSR1 (Slurm's advance warning, `--signal=USR1@120`) ask the loop to stop after the current
    step, which then saves a checkpoint; the run says so and exits 0. A second Ctrl-C interrupts at
    once; a repeated SIGTERM does not (torchrun forwards SIGTERM to ranks that already got the
    terminal's SIGINT). Under torchrun every rank stops after the same step (`finish_step`)."""

    requested: bool = False

    def install(self) -> None:
        if dist.world_size() > 1 and os.environ.get("LENSRL_NO_SIGNAL"):
            return

        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if not self.requested and dist.rank() == 0:  # one notice per job, not one per rank
                console.print(f"[yellow]{signal.Signals(signum).name}: finishing this step, saving a checkpoint, "
                              "then exiting (Ctrl-C again to abort now)[/yellow]")
            self.requested = True

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. inside a test runner thread)
                signal.signal(sig, handler)


def micro_batches(rows: list[int], seqs, use_dynamic_bsz: bool, max_tokens: int, micro_batch_size: int,
                  same_count_on_all_ranks: bool = False) -> list[list[int]]:
    """Split `rows` (indices into `seqs`) into micro-batches: balanced under a token budget when
    `use_dynamic_bsz` (each then runs as one packed row), else `micro_batch_size` at a time.

    same_count_on_all_ranks (FSDP): every rank gets the largest rank's number of micro-batches,
    some of them empty when a rank has fewer sequences than that."""
    if use_dynamic_bsz:
        units = image_units([seqs[i] for i in rows])  # a GRPO group's sequences together: its image runs once
        plan = plan_micro_batches([seqs[i].num_tokens for i in rows], max_tokens, units=units)
        groups = [[rows[j] for j in group] for group in plan if group]
    else:
        groups = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    if not same_count_on_all_ranks:
        return groups
    count = int(dist.all_reduce_max(torch.tensor(float(len(groups)))).item())
    if use_dynamic_bsz and len(groups) < count and len(rows) > len(groups):
        plan = plan_micro_batches([seqs[i].num_tokens for i in rows], max_tokens, min_num_groups=count, units=units)
        groups = [[rows[j] for j in group] for group in plan]
    return groups + [[] for _ in range(count - len(groups))]


def validate(trainer, step: int) -> dict[str, float]:
    """Held-out accuracy of `trainer.policy` through its rollout backend (greedy by default,
    `rollout.val_n` samples each for mean@k); a few samples written to samples/val_step_N.jsonl."""
    from lensrl.rollout.base import SamplingParams
    from lensrl.trainers.evaluate import evaluate

    r = trainer.cfg.rollout
    params = SamplingParams(n=r.val_n, temperature=r.val_temperature, top_p=r.val_top_p,
                            max_new_tokens=r.max_new_tokens, seed=trainer.cfg.trainer.seed + step)
    start = time.time()
    sync_rollout(trainer)  # a backend with its own weight copy must see the latest
    with torch.no_grad(), autocast(trainer.device, trainer.amp_dtype):
        metrics, records = evaluate(trainer.rollout, trainer.processor, trainer.val_data, trainer.pool, params,
                                    r.batch_size, trainer.cfg.data.val_size,
                                    keep_images=trainer.cfg.trainer.val_generations_to_log)
    metrics["timing_s/testing"] = time.time() - start
    shown = [r for r in records if "_image" in r][: trainer.cfg.trainer.val_generations_to_log]
    trainer.logger.log_generations(step, [{**r, "image": r["_image"]} for r in shown])
    records = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    trainer.logger.write_samples(step, records[: trainer.cfg.trainer.num_logged_samples], "val")
    return metrics


def headline(metrics: dict[str, float]) -> str:
    """val/accuracy when the reward has an accuracy part, else val/reward/mean."""
    key = "val/accuracy" if "val/accuracy" in metrics else "val/reward/mean"
    return f"{key} {metrics[key]:.3f}"


def save(trainer) -> Path:
    """Checkpoint the trainer at its current step (model, optimizer, scheduler, RNG, data position)."""
    # the optimizer's hyperparameters as trained with, readable without loading the DCP shards
    groups = [{k: v for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay")}
              for g in trainer.optimizer.param_groups]
    state = {"step": trainer.step, "sampler": trainer.sampler.state_dict(),
             "bad_steps_in_row": trainer.bad_steps_in_row, "optim_groups": groups}
    return save_checkpoint(trainer.ckpt_dir, trainer.step, trainer.policy, trainer.optimizer, trainer.scheduler,
                           state, trainer.cfg.trainer.save_limit, trainable_only=trainer.lora)


def check_lora_resume(path: Path, current, base: dict | None = None) -> None:
    """Refuse to resume checkpoint `path` with other LoRA settings than it was trained with: full
    parameters vs adapters, or another rank, alpha, target_modules or vision_tower (dropout may
    change). Loading would fail deep in torch's loader or, with fewer targets, silently drop
    trained adapters. current: this run's LoraSettings, None for full-parameter training. base:
    this run's base identity (`base_identity`), checked against the checkpoint's for LoRA."""
    from lensrl.train.convert import ConvertError, check_base, lora_settings

    if not (Path(path) / ".metadata").is_file():  # no DCP index: load_checkpoint says what is wrong with it
        return
    try:
        saved = lora_settings(path)
    except ConvertError as e:
        raise ConfigError(str(e)) from None

    def shape(s):
        return None if s is None else (s.rank, float(s.alpha), sorted(s.target_modules), bool(s.vision_tower))

    def say(s):
        return "full-parameter training" if s is None else (
            f"model.lora rank={s.rank} alpha={s.alpha} target_modules={sorted(s.target_modules)} "
            f"vision_tower={s.vision_tower}")

    if shape(saved) != shape(current):
        raise ConfigError(f"{path} was trained with {say(saved)}, and this run asks for {say(current)}: resuming "
                          "would drop or misplace trained weights. Resume with the checkpoint's settings, or start "
                          "afresh under another trainer.run_name (or trainer.resume=never)")
    if current is not None and base is not None:  # adapters on top of other base weights: refused
        try:
            check_base(path, base, adapters=True, named="this run's model.path")
        except ConvertError as e:
            raise ConfigError(str(e)) from None


def resume(trainer) -> None:
    """Restore the trainer from `trainer.resume` (auto: the newest complete checkpoint, if any)."""
    setting = trainer.cfg.trainer.resume
    if setting == "never":
        return
    if setting == "auto":
        path, passed, notes = find_resumable(trainer.ckpt_dir)
        if dist.is_main() and passed:
            moved = set_aside(passed)
            for note in notes:
                console.print(f"[yellow]{escape(note)}[/yellow]", soft_wrap=True)
            console.print(f"[yellow]set aside as {escape(', '.join(m.name for m in moved))}; "
                          + (f"falling back to {escape(str(path))}, the newest intact checkpoint" if path is not None
                             else "no intact checkpoint: starting from step 0") + "[/yellow]", soft_wrap=True)
        dist.barrier()
    else:
        path = Path(setting)
        if path.name.startswith((".tmp_", ".del_", "damaged_")):
            raise ConfigError(f"trainer.resume={path}: a partial, half-deleted or damaged checkpoint folder is never "
                              "loaded; name a step_N folder")
        newer = [p for p in list_checkpoints(trainer.ckpt_dir) if p.resolve() != path.resolve()
                 and checkpoint_step(p) > checkpoint_step(path)]
        if newer and dist.is_main():
            console.print(f"[yellow]resuming from {escape(str(path))} although {escape(newer[-1].name)} is newer: "
                          "those newer checkpoints are replaced as the run reaches their steps[/yellow]", soft_wrap=True)
    if path is None:
        return
    check_lora_resume(path, trainer.cfg.model.lora if trainer.lora else None, getattr(trainer.policy, "lensrl_base", None))
    state = load_checkpoint(path, trainer.policy, trainer.optimizer, trainer.scheduler, trainable_only=trainer.lora)
    trainer.step = state["step"]
    optim = trainer.cfg.actor.optim if hasattr(trainer.cfg, "actor") else trainer.cfg.optim
    follow_schedule(trainer.scheduler, optim, trainer.step * getattr(trainer, "updates_per_step", 1))
    try:
        trainer.sampler.load_state_dict(state["sampler"])
    except ValueError as e:
        raise ConfigError(f"cannot resume from {path}: {e} (keep the batch size, data and data.seed of the run, "
                          "or start a new one under another trainer.run_name)") from None
    trainer.bad_steps_in_row = state.get("bad_steps_in_row", 0)
    if getattr(trainer, "rollout", None) is not None:
        sync_rollout(trainer, frozen=True)  # the backend's own copies (engine, the plain copy) are stale
    if dist.is_main():
        console.print(escape(f"resumed from {path} at step {trainer.step}"), soft_wrap=True)


@contextlib.contextmanager
def step_scope(trainer, step: int):
    """Around one training step: notes the step for the hang diagnosis (`lensrl.train.heartbeat`),
    turns a collective that timed out into RankHungError naming the rank that stopped (not only
    the rank that waited), and profiles the steps listed in `trainer.profile_steps`."""
    heartbeat.mark("step", step)
    try:
        with profile_step(trainer, step):
            yield
    except Exception as e:
        if dist.world_size() > 1 and heartbeat.is_timeout(e):
            raise RankHungError(heartbeat.diagnose(dist.rank(), dist.world_size(),
                                                   trainer.cfg.trainer.dist_timeout_s)) from e
        raise


@contextlib.contextmanager
def profile_step(trainer, step: int):
    """torch.profiler around a step listed in `trainer.profile_steps` (CPU and CUDA activity; the
    trainers' phases are named ranges `lensrl/<phase>`). Each rank writes
    runs/<name>/profile/step_N.rank_R.json.gz (a Chrome/Perfetto trace) and .txt (the top ops)."""
    if step not in trainer.cfg.trainer.profile_steps:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        yield
    out = trainer.run_dir / "profile"
    out.mkdir(parents=True, exist_ok=True)
    name = f"step_{step}.rank_{dist.rank()}"
    prof.export_chrome_trace(str(out / f"{name}.json.gz"))
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40)
    (out / f"{name}.txt").write_text(table)


def finish_step(trainer, metrics: dict[str, float], stop: StopFlag) -> bool:
    """Everything after a training step, the same for every trainer: validation on schedule,
    logging, the bad-step stop, checkpoints, Ctrl-C. Returns True when the run should stop now."""
    t = trainer.cfg.trainer
    last = trainer.step == trainer.total_steps
    # A signal seen by any rank stops every rank after the same step: all act on the reduced value;
    # a rank's own flag is never cleared (a signal that lands during the reduce counts next step).
    stop_now = stop.requested
    if dist.world_size() > 1:
        stop_now = bool(dist.all_reduce_max(torch.tensor(float(stop_now))).item())
    if trainer.val_data is not None and ((t.test_freq and trainer.step % t.test_freq == 0) or last):
        try:
            metrics.update(validate(trainer, trainer.step))
        except Exception:  # the step itself trained: keep its record (and, in one process, a checkpoint)
            trainer.logger.log(metrics, trainer.step)
            if dist.world_size() == 1:
                save(trainer)
            raise
    trainer.logger.log(metrics, trainer.step)
    trainer.logger.progress(trainer.step)
    if trainer.bad_steps_in_row >= t.max_bad_steps:
        raise BadStepsError(
            f"{trainer.bad_steps_in_row} consecutive steps had non-finite loss or gradients; stopping. "
            f"Last good checkpoint: {latest_checkpoint(trainer.ckpt_dir) or 'none'} "
            "(lower the learning rate or check the data)"
        )
    # No checkpoint while steps are failing: the last one stays the last good one.
    periodic = t.save_freq and trainer.step % t.save_freq == 0 and trainer.bad_steps_in_row == 0
    if periodic or stop_now or (last and t.save_last):
        save(trainer)
    if stop_now and dist.is_main():
        console.print(f"stopped at step {trainer.step}; checkpoint saved, resume with trainer.resume=auto")
    return stop_now


def save_final_hf(trainer) -> None:
    """runs/<name>/hf: the trained policy as a plain Hugging Face folder (gathered on every rank,
    written by rank 0)."""
    from lensrl.train.fsdp import full_state_dict

    if not (trainer.total_steps and trainer.cfg.trainer.save_hf):
        return
    state = full_state_dict(trainer.policy)
    if trainer.lora:  # the merged model, and the adapters as peft writes them
        from lensrl.train.lora import merged_state_dict, save_adapter

        if dist.is_main():
            # A bf16 base merged in bf16 loses every update below half an ulp (a reviewer's 3 steps at
            # lr 1e-5: 97% of the adapted weights came out equal to the base): hf/ is then fp32, the
            # policy that trained (`lensrl convert --dtype bfloat16` writes the rounded, smaller one)
            low = any(t.dtype in (torch.bfloat16, torch.float16) for t in state.values() if t.is_floating_point())
            dtype = torch.float32 if low else None
            path = save_hf(trainer.policy, trainer.processor, trainer.run_dir / "hf", dtype=dtype,
                           state_dict=merged_state_dict(trainer.policy, dtype, state=state))
            save_adapter(trainer.policy, trainer.run_dir / "hf_adapter", trainer.cfg.model.path, state=state)
            _record_run(trainer.run_dir, path)
            trainer.logger.info(f"Hugging Face model (LoRA merged{', float32: a bf16 base would round the update away' if low else ''}): "
                                f"{path}; adapters: {trainer.run_dir / 'hf_adapter'}")
        dist.barrier()
        return
    if dist.is_main():
        path = save_hf(trainer.policy, trainer.processor, trainer.run_dir / "hf", state_dict=state)
        _record_run(trainer.run_dir, path)
        trainer.logger.info(f"Hugging Face model: {path}")
    dist.barrier()


def _record_run(run_dir: Path, hf_dir: Path) -> None:
    """The run's config.yaml into its HF folder as lensrl_run.yaml (as `lensrl convert` does): the
    folder keeps which reward graded it wherever it is copied (`lensrl eval` reads it)."""
    if (run_dir / "config.yaml").is_file():
        shutil.copyfile(run_dir / "config.yaml", hf_dir / "lensrl_run.yaml")


def cpu_memory_gb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0
