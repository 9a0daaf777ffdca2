"""Accuracy of a policy on a dataset: generate, score, aggregate. Used by GRPO validation, SFT
evaluation and `lensrl eval`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from rich.markup import escape

from lensrl.config import ConfigError, EvalConfig, load_config
from lensrl.data.datasets import PromptDataset
from lensrl.logging import console, progress_bar
from lensrl.rewards.function import RewardFunctionError, reward_sample
from lensrl.rewards.pool import RewardPool
from lensrl.rollout.base import SamplingParams
from lensrl.train import distributed as dist


def evaluate(
    rollout,
    processor,
    dataset: PromptDataset,
    pool: RewardPool,
    params: SamplingParams,
    batch_size: int = 64,
    max_samples: int | None = None,
    prefix: str = "val",
    keep_images: int = 0,
) -> tuple[dict[str, float], list[dict]]:
    """Generate `params.n` completions per prompt and score them.

    Returns metrics (`{prefix}/accuracy` is mean@n accuracy; per data source
    `val-core/<source>/acc/mean@n` as verl names it, or `{prefix}/<source>/acc/mean@n` for another
    prefix) and one record per completion (prompt, image reference, completion, reward). Each rank
    evaluates its own share; metrics cover the whole set. The first `keep_images` records of each
    rank also hold their prompt's first image, decoded, under "_image" (for logged generations; not
    JSON: drop the keys starting with "_" before writing records out).
    """
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    indices = list(range(count))[dist.rank() :: dist.world_size()]
    records: list[dict] = []
    with progress_bar(f"{prefix}: prompts", len(indices), show=dist.is_main()) as advance:
        for start in range(0, len(indices), batch_size):
            positions = indices[start : start + batch_size]
            first = len(records)
            samples = [dataset[i] for i in positions]
            _evaluate_batch(rollout, processor, pool, params, samples, positions, records)
            decoded: dict[int, object] = {}  # each sample's image once, for its n records
            for k in range(first, min(len(records), keep_images)):  # record k is of sample (k - first) // n
                i = (k - first) // params.n
                if i not in decoded:
                    decoded[i] = samples[i].images[0].load() if samples[i].images else None
                records[k]["_image"] = decoded[i]
            advance(len(positions))
    records = [r for part in dist.all_gather_objects(records) for r in part]
    report_reward_failures(records, prefix, pool.cfg.timeout_s)
    return summarize(records, params.n, prefix), records


def _evaluate_batch(rollout, processor, pool, params, samples, positions, records: list[dict]) -> None:
    """Generate and score one batch of prompts (`positions`: their places in the whole set), one
    record per completion appended to `records`."""
    prompts = [processor(s) for s in samples]
    # positions in the whole set: sampled validation draws the same at any rank count or batch size
    completions = rollout.generate(prompts, params, positions=positions)
    flat = [(c, s) for s, group in zip(samples, completions) for c in group]
    results = pool.score_batch([(c.text, reward_sample(s, processor.assistant_prefix)) for c, s in flat])
    for (c, s), r in zip(flat, results):
        records.append({
            "source": s.meta.get("source", ""), "row": s.meta.get("row"), "prompt": s.prompt,
            "images": [im.origin for im in s.images], "answer": s.answer, "completion": c.text,
            "reward": r.score, **{f"reward_{k}": v for k, v in r.parts.items()},
            "finish_reason": c.finish_reason, "response_length": len(c.token_ids), "status": r.status,
            **({"error": (s.where(), r.detail)} if r.status == "error" else {}),
        })


def report_reward_failures(rows: list[dict], what: str, timeout_s: float, shown: bool = False) -> bool:
    """rows: one per completion (every rank's), with "status" and, for an error, "error":
    (where, traceback). Raises RewardFunctionError when every completion failed or timed out
    (nothing to learn or measure from); otherwise the main rank prints the first error unless one
    was `shown` already. Returns whether an error has been shown now."""
    errors = [row["error"] for row in rows if "error" in row]
    if rows and all(row["status"] in ("error", "timeout") for row in rows):
        where, detail = errors[0] if errors else ("every completion", f"each took longer than "
                                                  f"reward.timeout_s={timeout_s}s")
        raise RewardFunctionError(f"the reward function failed on every completion of {what} ({len(rows)}); "
                                  f"the first, on {where}:\n{detail}")
    if errors and not shown and dist.is_main():
        where, detail = errors[0]
        console.print(f"[red]the reward function failed on {escape(where)} during {escape(what)} (scored "
                      "reward.reward_min_val, counted in reward/errors; the first failure, shown once):[/red]",
                      soft_wrap=True)
        console.print(escape(detail), soft_wrap=True)
    return shown or bool(errors)


def source_names(sources: set[str]) -> dict[str, str]:
    """A name per data source file for the per-source metrics: the file's stem without a shard
    suffix (`test-00000-of-00002` -> `test`, so a dataset's shards are one source), prefixed by its
    folder's name where two folders would give the same name (`geo3k/test`, `robo/test`)."""
    def stem(source: str) -> str:
        return re.sub(r"-\d{5}-of-\d{5}$", "", Path(source).stem) or "data"

    folders: dict[str, set[str]] = {}
    for source in sources:
        folders.setdefault(stem(source), set()).add(str(Path(source).parent))
    return {source: (f"{Path(source).parent.name}/{stem(source)}" if len(folders[stem(source)]) > 1 else stem(source))
            for source in sources}


def summarize(records: list[dict], n: int, prefix: str) -> dict[str, float]:
    if not records:
        return {}
    def mean(values):
        return sum(values) / len(values)
    metrics = {
        f"{prefix}/reward/mean": mean([r["reward"] for r in records]),
        f"{prefix}/response_length/mean": mean([r["response_length"] for r in records]),
        f"{prefix}/reward/errors": float(sum(r["status"] == "error" for r in records)),
        f"{prefix}/reward/timeouts": float(sum(r["status"] == "timeout" for r in records)),
    }
    # every named part of the reward: {prefix}/accuracy, {prefix}/format, {prefix}/iou, ...
    parts = sorted({k[len("reward_"):] for r in records for k in r if k.startswith("reward_")})
    for part in parts:
        metrics[f"{prefix}/{part}"] = mean([r.get(f"reward_{part}", 0.0) for r in records])
    # mean@n per data source, of the accuracy part (a reward without one: of the score)
    key = "reward_accuracy" if "accuracy" in parts else "reward"
    names = source_names({r["source"] for r in records})
    by_source: dict[str, list[float]] = {}
    for r in records:
        by_source.setdefault(names[r["source"]], []).append(r.get(key, 0.0))
    group = "val-core" if prefix == "val" else prefix  # verl's name for validation per data source
    for source, values in by_source.items():
        metrics[f"{group}/{source}/{'acc' if key == 'reward_accuracy' else 'reward'}/mean@{n}"] = mean(values)
    return metrics


# What decides a grade (the run's are taken); the worker count and timeout are this machine's business.
GRADING_KEYS = ("function", "function_kwargs", "type", "format_pattern", "format_weight", "reward_min_val",
                "reward_max_val")


def training_reward(config_path: str | None, overrides: list[str]) -> tuple[list[str], Path | None]:
    """(`reward.*` overrides that grade as the lensrl run that trained the model folder did, the
    record they come from). The run's GRADING_KEYS are read from the config.yaml beside the
    folder (a run's `RUN/hf`) or from the copy in it (`lensrl_run.yaml`, which `RUN/hf` and
    `lensrl convert` write). They are the base: a key the user sets (`reward.<key>=` or a `reward:`
    section in --config) replaces that key only. A relative reward.function path that does not
    exist from here is looked up from where the run was started (the folder above its output
    folder). ([], None) when the folder did not come from a run."""
    import yaml

    user = yaml.safe_load(Path(config_path).read_text()) or {} if config_path else {}
    given = {o.split("=", 1)[0][len("reward."):] for o in overrides if o.startswith("reward.")}
    given |= set((user.get("reward") or {}) if isinstance(user.get("reward"), dict) else ())
    model = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("model.path=")), None)
    model = model or (user.get("model") or {}).get("path")
    if not model or not Path(model).is_dir():
        return [], None
    for record in (Path(model) / "lensrl_run.yaml", Path(model).parent / "config.yaml"):
        if not record.is_file():
            continue
        run = yaml.safe_load(record.read_text()) or {}
        reward = run.get("reward")
        if not isinstance(reward, dict):
            continue
        reward = {k: reward[k] for k in GRADING_KEYS if k in reward and k not in given}
        file, _, name = str(reward.get("function") or "").partition(":")
        started = _run_started_in(record, run)
        if file.endswith(".py") and not Path(file).exists() and started and (started / file).is_file():
            reward["function"] = f"{(started / file).resolve()}:{name}"
        return [f"reward.{k}={json.dumps(v)}" for k, v in reward.items()], record
    return [], None


def _run_started_in(record: Path, run: dict) -> Path | None:
    """The working directory a run was started in, from its config record's place: RUN/config.yaml
    or RUN/hf/lensrl_run.yaml, RUN being trainer.output_dir/trainer.run_name from there. None when
    that cannot be known (a converted folder elsewhere, an absolute output_dir)."""
    run_dir = record.parent if record.name == "config.yaml" else record.parent.parent
    if record.name != "config.yaml" and not (run_dir / "config.yaml").is_file():
        return None
    output_dir = Path((run.get("trainer") or {}).get("output_dir", "runs"))
    if output_dir.is_absolute():
        return None
    up = run_dir.resolve()
    for _ in range(len(output_dir.parts) + 1):  # run_name, then each part of output_dir
        up = up.parent
    return up


def fresh_run_name(output_dir: str, run_name: str) -> str:
    """`run_name`, or `run_name_2`, `_3`, ... when an earlier evaluation's results are in the folder:
    each `lensrl eval` writes a folder of its own, never over the last one's."""
    name, k = run_name, 1
    while (Path(output_dir) / name / "eval_metrics.json").exists() or (Path(output_dir) / name / "samples").exists():
        k += 1
        name = f"{run_name}_{k}"
    return name


def run_eval(config_path: str | None, overrides: list[str]) -> dict[str, float]:
    """`lensrl eval`: accuracy of a model folder on a dataset, samples and metrics written to a new
    folder `output_dir/run_name` (`run_name_2`, ... when taken). A model folder from a lensrl run is
    graded with that run's reward settings unless reward.* is given (`training_reward`)."""
    from lensrl.models.compile import compile_blocks, compile_enabled
    from lensrl.models.load import load_policy
    from lensrl.trainers.common import (
        autocast,
        build_rollout,
        check_data,
        load_split,
        model_dtypes,
        prepare_run_dir,
        record_config,
        seed_everything,
    )

    run_reward, record = training_reward(config_path, overrides)
    try:
        cfg = load_config(EvalConfig, config_path, [*run_reward, *overrides])
    except ConfigError as e:
        if not run_reward:
            raise
        raise ConfigError(f"{e} (the reward settings came from {record}, the run that trained the model; set "
                          "reward.* here to grade otherwise)") from None
    cfg.run_name = fresh_run_name(cfg.output_dir, cfg.run_name)
    check_data(cfg.data)
    device = dist.resolve_device(cfg.device)
    dist.init_distributed(device)
    seed_everything(cfg.seed)
    param_dtype, amp_dtype = model_dtypes(cfg.model, device)  # bf16 autocast on GPU, as training's validation
    model, processor = load_policy(cfg.model.path, dtype=param_dtype, device=device,
                                   min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    model.eval()
    if compile_enabled(cfg.model.compile, device):  # the engine's prefill runs the compiled blocks
        compile_blocks(model)
    dataset = load_split(cfg.data.val_files, cfg.data, "test", processor)
    run_dir = prepare_run_dir(cfg.output_dir, cfg.run_name, cfg)
    record_config(run_dir, cfg)
    if run_reward and dist.is_main():
        console.print(f"grading with the reward settings of the run that trained {cfg.model.path} ({record}); "
                      "reward.* on the command line or in --config replaces single keys", soft_wrap=True)
    rollout = build_rollout(cfg.rollout, model, processor, device)
    params = SamplingParams(n=cfg.rollout.val_n, temperature=cfg.rollout.val_temperature,
                            top_p=cfg.rollout.val_top_p, max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed)
    start = time.time()
    with RewardPool(cfg.reward) as pool, torch.no_grad(), autocast(device, amp_dtype):
        metrics, records = evaluate(rollout, processor, dataset, pool, params, cfg.rollout.batch_size,
                                    cfg.data.val_size, prefix="eval")
    metrics["eval/num_samples"] = len(records)
    metrics["timing_s/eval"] = time.time() - start
    if dist.is_main():
        (run_dir / "samples").mkdir(exist_ok=True)
        with open(run_dir / "samples" / "eval.jsonl", "w") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        (run_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
        headline = ("accuracy", metrics["eval/accuracy"]) if "eval/accuracy" in metrics else ("reward",
                                                                                            metrics["eval/reward/mean"])
        console.print(f"{headline[0]} {headline[1]:.3f} on {len(records)} completions; "
                      f"samples in {run_dir / 'samples' / 'eval.jsonl'}")
    return metrics
