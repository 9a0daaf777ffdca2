"""Typed configuration: one dataclass per section, defaults here and nowhere else.

A run's config is the dataclass defaults, then a YAML file, then dotted `key=value` overrides:

    lensrl grpo --config configs/tiny_demo.yaml data.max_prompt_length=2048

Unknown keys fail with the key's name and the closest valid names; wrong types fail with the
expected type. Nothing loads before the config is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    # LoRA (peft, lensrl.train.lora): rank > 0 trains adapters only, on a frozen base that may stay
    # bf16 (model.dtype=bfloat16); GRPO's KL reference is then the base with adapters off (no copy)
    rank: int = 0  # 0: full-parameter training
    alpha: float = 16.0  # scale alpha / rank
    dropout: float = 0.0
    # projections adapted, inside the language model (and the vision tower with vision_tower=true)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    vision_tower: bool = False


@dataclass
class ModelConfig:
    path: str = "runs/tiny_model"  # HF folder (downloaded Qwen-VL or `lensrl model tiny`) or a shape name
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 params+autocast on GPU, fp32 on CPU
    min_pixels: int | None = None  # None: the model folder's preprocessor_config.json
    max_pixels: int | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # what recomputes its activations in the backward when gradient_checkpointing is on. all: every
    # vision block and decoder layer (least memory); vision: the vision blocks only, the decoder keeps
    # its activations: about a quarter less update compute for ~3 GB more memory per 1,000 tokens of a
    # micro-batch at the 3B's widths (lower actor.max_tokens_per_mbs if it does not fit)
    gradient_checkpointing_scope: Literal["all", "vision"] = "all"
    freeze_vision_tower: bool = False
    # torch.compile every decoder layer / vision block and the logprob head (fused element-wise
    # kernels; lensrl.models.compile). auto: on CUDA with Triton; always: also on CPU (needs a C++
    # compiler; slow to compile, for tests); never: eager.
    compile: Literal["auto", "always", "never"] = "auto"
    # Mixture-of-experts models (Qwen3-VL-MoE): weight of the router load-balancing loss added to the
    # training loss (lensrl.train.router); None: config.json's router_aux_loss_coef (0.001 for
    # Qwen3-VL-30B-A3B); 0: not added (still logged). Ignored for dense models.
    router_aux_loss_coef: float | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataConfig:
    # parquet / jsonl / json files or folders, or cached hub dataset ids (lensrl.data.sources); a list
    # or a single string. val_files None: no validation; train_files None (SFT): evaluation only
    train_files: list[str] | str | None = None
    val_files: list[str] | str | None = None
    prompt_key: str = "problem"
    answer_key: str = "answer"
    choice_key: str | None = None  # set for multiple choice (Robo2VLM layout)
    image_keys: list[str] = field(default_factory=lambda: ["images"])
    system_prompt: str | None = None
    instruction: str | None = None  # appended to each prompt ("{prompt} {instruction}")
    answer_template: str = "\\boxed{{{answer}}}"  # SFT target for free-form answers
    max_prompt_length: int = 1024  # tokens, image tokens included
    filter_overlong_prompts: bool = True  # True: drop and count; False: error naming the row
    skip_bad_rows: bool = False  # rows lensrl cannot process (images, placeholders): skip and name them
    shuffle: bool = True
    seed: int = 1
    val_size: int | None = None  # evaluate on the first N test rows (None: all)


@dataclass
class RolloutConfig:
    backend: Literal["auto", "hf", "engine"] = "auto"  # auto: engine on CUDA, hf elsewhere
    n: int = 8
    temperature: float = 1.0
    # top_p < 1 / top_k > 0: tokens are drawn from the truncated, renormalised distribution, and the
    # rollout log-probabilities are of that distribution (the behaviour policy). The trainer's are of
    # the full softmax, so rollout/train_kl then measures the truncation too, and TIS
    # (actor.importance_sampling_fix) corrects for it; with the defaults both agree exactly.
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    batch_size: int = 64  # prompts per generate call (the backend may split further)
    val_temperature: float = 0.0  # greedy validation by default
    val_top_p: float = 1.0
    val_n: int = 1  # mean@k over k samples per validation prompt
    gpu_memory_utilization: float = 0.5  # engine KV-cache budget (fraction of free memory)
    seed: int | None = None  # set: each prompt's samples seeded by (seed, step, its position in the global batch)
    # MoE with the engine: each step, the experts the engine's decode chose for up to this many of a
    # rank's sequences are compared with those the model's own forward picks for the same tokens
    # (rollout/router_mismatch: fraction of (token, layer) top-k sets that differ); 0: off, and the
    # engine records no routing. The hf backend records none.
    router_mismatch_seqs: int = 8


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0


@dataclass
class AlgorithmConfig:
    adv_estimator: Literal["grpo", "rloo", "reinforce_plus_plus_baseline"] = "grpo"
    norm_adv_by_std: bool = True  # False: Dr.GRPO
    # DAPO dynamic sampling (verl's filter_groups): drop groups whose rewards are all equal and
    # generate more prompt batches until rollout_batch_size groups with signal are gathered
    filter_zero_variance_groups: bool = False
    max_num_gen_batches: int = 10  # rounds of generation per step at most; then train on what there is
    use_kl_loss: bool = False
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl", "abs"] = "low_var_kl"
    kl_loss_coef: float = 1e-2


@dataclass
class ActorConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    ppo_epochs: int = 1
    mini_batch_size: int = 16  # prompts per optimizer step (x n completions)
    # exactly on-policy steps (ppo_epochs=1 and one mini-batch a step): the update's own
    # log-probabilities, detached, are the old ones (verl's on_policy), and the separate no-grad
    # pass is skipped (TIS weights and rollout/train_kl then come from the update's forward);
    # false: always run the pass
    reuse_on_policy_logprob: bool = True
    micro_batch_size: int = 8  # sequences per forward/backward
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 3.0  # dual clip for negative advantages
    policy_loss: Literal["ppo", "gspo"] = "ppo"  # gspo: sequence-level ratio
    loss_agg_mode: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    entropy_coeff: float = 0.0
    mask_truncated_completions: bool = False
    importance_sampling_fix: bool = False  # truncated importance sampling (TIS)
    importance_sampling_clip: float = 2.0
    importance_sampling_level: Literal["token", "sequence"] = "token"
    logprob_chunk_size: int = 1024  # tokens per chunk in the logprob pass
    use_dynamic_bsz: bool = True  # packed micro-batches under a token budget (False: micro_batch_size, padded)
    max_tokens_per_mbs: int = 16384  # token budget of one packed micro-batch


@dataclass
class RewardConfig:
    # A reward function of your own: "path/to/file.py:name" or "package.module:name", called as
    # fn(completion, sample, **function_kwargs) -> float | {"score": ..., <part>: ...} in the reward
    # workers (lensrl.rewards.function); unset: the built-in `type`.
    function: str | None = None
    function_kwargs: dict[str, Any] = field(default_factory=dict)
    type: Literal["math", "choice"] = "math"
    format_pattern: str | None = r"<think>.*</think>.*\\boxed\{.*\}.*"  # None: no format reward
    format_weight: float = 0.1  # score = (1 - w) * accuracy + w * format
    reward_min_val: float = 0.0
    reward_max_val: float = 1.0
    # DAPO's overlong reward shaping (verl's reward_model.overlong_buffer), GRPO only: a completion longer
    # than rollout.max_new_tokens - overlong_buffer_len loses up to overlong_penalty_factor, linearly
    # over the buffer (the whole factor at max_new_tokens); 0: off. Logged as reward/overlong_penalty.
    overlong_buffer_len: int = 0
    overlong_penalty_factor: float = 1.0
    num_workers: int = 2
    timeout_s: float = 10.0


@dataclass
class FSDPConfig:
    enable: Literal["auto", "always", "never"] = "auto"  # auto: shard when launched on more than one rank
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # all-gather/compute dtype on GPU (fp32 on CPU)
    reshard_after_forward: bool = True  # False: keep gathered weights from forward to backward (faster, more memory)
    # per_micro_batch: reduce-scatter gradients after every micro-batch's backward (least memory);
    # per_step: accumulate them unsharded (fp32, full size on every rank) and reduce once per
    # optimizer step; with reshard_after_forward=false the weights are also gathered once per step
    reduce_grads: Literal["per_micro_batch", "per_step"] = "per_micro_batch"
    offload_params: bool = False  # CPUOffloadPolicy: parameters, gradients and optimizer state in host memory


@dataclass
class TrainerConfig:
    run_name: str = "run"
    output_dir: str = "runs"
    total_steps: int = 100
    test_freq: int = 10  # validate every N steps (0: never), and once before training
    val_before_train: bool = True
    save_freq: int = 0  # checkpoint every N steps (0: only at the end)
    save_limit: int = 2  # keep the newest N checkpoints
    save_hf: bool = True  # write runs/<name>/hf at the end
    save_last: bool = True  # checkpoint after the last step (benchmarks turn it off)
    resume: str = "auto"  # auto | never | path to checkpoints/step_N
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])
    wandb_project: str = "lensrl"
    num_logged_samples: int = 4  # samples written to samples/ per step
    # validation generations (prompt, image, completion, answer, reward) logged to TensorBoard (text
    # and images) and wandb (a Table) at each validation, as EasyR1's val_generations_to_log; 0: none
    val_generations_to_log: int = 4
    max_bad_steps: int = 3  # consecutive NaN/inf steps before the run stops
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    cpu_threads: int = 0  # torch CPU threads per rank; 0: this machine's cores shared among its ranks
    dist_timeout_s: float = 600.0  # a collective that waits longer (a rank died or hung) fails the run
    profile_steps: list[int] = field(default_factory=list)  # torch.profiler traces of these steps -> runs/<name>/profile/


@dataclass
class GRPOTrainerConfig(TrainerConfig):
    rollout_batch_size: int = 16  # prompts per GRPO step (x rollout.n completions)


@dataclass
class RefConfig:
    # GRPO's frozen KL reference, built only when algorithm.use_kl_loss needs it (a LoRA policy's
    # reference is its own base with adapters off: no copy, these do not apply). It only runs
    # forward, so it need not hold fp32 master weights; verl likewise loads its ref in bf16.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: the policy's compute dtype (bf16 on GPU, fp32 on CPU)
    offload_params: bool = False  # its parameters in host memory between uses (FSDP CPUOffloadPolicy, verl's ref.fsdp_config.param_offload)


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    trainer: GRPOTrainerConfig = field(default_factory=GRPOTrainerConfig)


@dataclass
class SFTTrainerConfig(TrainerConfig):
    total_steps: int = 0  # 0: derive from num_epochs
    num_epochs: int = 1
    global_batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 4  # sequences per forward/backward (gradient accumulation between)
    use_dynamic_bsz: bool = True  # packed micro-batches under a token budget (False: micro_batch_size, padded)
    max_tokens_per_mbs: int = 16384
    stop_at_loss: float | None = None  # stop early once the mean loss of the last 5 steps is below this


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, warmup_ratio=0.03, schedule="cosine")
    )
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(max_new_tokens=64))  # eval generation
    reward: RewardConfig = field(default_factory=RewardConfig)  # answer extraction for eval accuracy
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(max_new_tokens=256))
    reward: RewardConfig = field(default_factory=RewardConfig)
    output_dir: str = "runs"
    run_name: str = "eval"
    device: str = "auto"
    seed: int = 1


COMMAND_CONFIGS: dict[str, type] = {"grpo": GRPOConfig, "sft": SFTConfig, "eval": EvalConfig}

# ----------------------------------------------------------------------------------------------
# Loading, merging, validating
# ----------------------------------------------------------------------------------------------

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple = (),
                check_rules: bool = True) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then `key=value` overrides; then `check`
    (unless `check_rules` is False: `lensrl config show` prints incomplete configs too)."""
    config = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:  # OmegaConf reads the YAML so recipes may use ${...} interpolation
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: expected a mapping of sections at the top level")
            # Merge onto the defaults first so ${section.key} may name a key the file leaves out.
            merged = OmegaConf.merge(OmegaConf.create(to_dict(config)), loaded)
            raw = OmegaConf.to_container(merged, resolve=True)
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(f"{path}: not a valid config file: {e}") from None
        config = merge(config, raw, source=str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. data.max_prompt_length=2048)")
        key, value = item.split("=", 1)
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        config = merge(config, nested, source="command line")
    if check_rules:
        check(config)
    return config


LOGGERS = ("console", "jsonl", "tensorboard", "wandb")


def check(config: Any, world_size: int | None = None) -> None:
    """The rules between keys that a type cannot say, checked before anything loads: one
    ConfigError naming the key(s) and the fix. `world_size`: the number of ranks the run will have
    (default: torchrun's WORLD_SIZE, else 1)."""
    import os

    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    trainer = getattr(config, "trainer", None)
    training = isinstance(config, GRPOConfig) or (isinstance(config, SFTConfig) and bool(config.data.train_files))
    device = trainer.device if trainer is not None else getattr(config, "device", "auto")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is available (use auto or cpu)")
    if trainer is not None:
        unknown = sorted(set(trainer.loggers) - set(LOGGERS))
        if unknown:
            raise ConfigError(f"trainer.loggers: unknown logger(s) {unknown}; choose from {', '.join(LOGGERS)}")
        if "wandb" in trainer.loggers:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("trainer.loggers has 'wandb' but wandb is not installed: pip install 'lensrl[wandb]'")
        if world > 1 and trainer.fsdp.enable == "never":
            raise ConfigError(
                f"trainer.fsdp.enable=never with {world} ranks: nothing would keep the ranks' models equal "
                "(each would train its own copy); use trainer.fsdp.enable=auto"
            )
    rollout, reward = getattr(config, "rollout", None), getattr(config, "reward", None)
    if rollout is not None:
        if rollout.max_new_tokens < 1:
            raise ConfigError(f"rollout.max_new_tokens must be >= 1, got {rollout.max_new_tokens}")
        if not 0 < rollout.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.gpu_memory_utilization must be in (0, 1], got {rollout.gpu_memory_utilization}")
        if not 0 < rollout.top_p <= 1 or rollout.temperature < 0:
            raise ConfigError(f"rollout.top_p must be in (0, 1] and rollout.temperature >= 0, got "
                              f"{rollout.top_p} and {rollout.temperature}")
        if rollout.router_mismatch_seqs < 0:
            raise ConfigError(f"rollout.router_mismatch_seqs must be >= 0 (0: off), got {rollout.router_mismatch_seqs}")
    if reward is not None:
        if reward.function:
            from lensrl.rewards.function import RewardFunctionError, check_signature, load_function

            try:
                check_signature(load_function(reward.function), reward.function_kwargs, reward.function)
            except RewardFunctionError as e:
                raise ConfigError(str(e)) from None
        elif reward.function_kwargs:
            raise ConfigError("reward.function_kwargs is set but reward.function is not: the built-in rewards take "
                              "their settings from reward.* keys")
        if reward.type == "choice" and not reward.function and isinstance(config, (GRPOConfig, SFTConfig, EvalConfig)) \
                and not config.data.choice_key:
            raise ConfigError("reward.type=choice grades option letters: set data.choice_key to the column of "
                              "choices (e.g. data.choice_key=choices data.prompt_key=question "
                              "data.answer_key=correct_answer data.image_keys=[image])")
        if reward.num_workers < 0 or not reward.timeout_s > 0:
            raise ConfigError(f"reward.num_workers must be >= 0 (0: score inline) and reward.timeout_s > 0, got "
                              f"{reward.num_workers} and {reward.timeout_s}")
        if isinstance(config, GRPOConfig) and not (0 <= reward.overlong_buffer_len <= config.rollout.max_new_tokens
                                                   and 0 <= reward.overlong_penalty_factor < float("inf")):
            raise ConfigError(f"reward.overlong_buffer_len must be within 0..rollout.max_new_tokens "
                              f"({config.rollout.max_new_tokens}) and reward.overlong_penalty_factor a finite number >= 0; got "
                              f"{reward.overlong_buffer_len} and {reward.overlong_penalty_factor}")
        if reward.reward_min_val > reward.reward_max_val:
            raise ConfigError(f"reward.reward_min_val ({reward.reward_min_val}) must not exceed "
                              f"reward.reward_max_val ({reward.reward_max_val})")
    if isinstance(config, GRPOConfig) and not config.data.train_files:
        raise ConfigError("GRPO needs data.train_files (parquet files or folders)")
    if isinstance(config, SFTConfig) and not (config.data.train_files or config.data.val_files):
        raise ConfigError("set data.train_files (training) and/or data.val_files (evaluation)")
    if isinstance(config, EvalConfig) and not config.data.val_files:
        raise ConfigError("lensrl eval needs data: --data DIR (its test.parquet) or data.val_files=[...]")
    coef = config.model.router_aux_loss_coef
    if coef is not None and not 0 <= coef < float("inf"):  # nan fails too: it would drop the loss without a word
        raise ConfigError(f"model.router_aux_loss_coef must be a finite number >= 0 (0: logged, not added; null: "
                          f"the model's config.json value), got {coef}")
    if config.model.gradient_checkpointing_scope != "all" and not config.model.gradient_checkpointing:
        raise ConfigError(f"model.gradient_checkpointing_scope={config.model.gradient_checkpointing_scope} has no effect "
                          "while model.gradient_checkpointing=false; set both, or leave the scope out")
    lora = config.model.lora
    if lora.rank < 0 or (lora.rank and not (0 < lora.alpha < float("inf") and 0 <= lora.dropout < 1
                                            and lora.target_modules)):
        raise ConfigError(f"model.lora: rank must be >= 0 (0: off), alpha a finite number > 0, 0 <= dropout < 1 "
                          f"and target_modules not empty; got rank={lora.rank}, alpha={lora.alpha}, "
                          f"dropout={lora.dropout}, target_modules={list(lora.target_modules)}")
    if not lora.rank:  # settings of a LoRA that is off: the user meant something that would not happen
        unused = [f"model.lora.{k}" for k, v in dataclasses.asdict(lora).items()
                  if k != "rank" and v != getattr(LoraSettings(), k)]
        if unused:
            raise ConfigError(f"{', '.join(unused)} set while model.lora.rank=0 (LoRA off: full-parameter training); "
                              "set model.lora.rank (e.g. 16) or leave them out")
    elif config.model.freeze_vision_tower and lora.vision_tower:
        raise ConfigError("model.freeze_vision_tower=true and model.lora.vision_tower=true contradict each other "
                          "(the vision adapters would train); keep one")
    ref = getattr(config, "ref", None)
    if lora.rank and ref is not None and (ref.dtype != "auto" or ref.offload_params):
        raise ConfigError(f"ref.dtype={ref.dtype} / ref.offload_params={ref.offload_params} do not apply with LoRA: the "
                          "KL reference is the base model with the adapters off, not a copy; leave ref.* at its defaults")
    if training and config.model.dtype == "bfloat16" and not lora.rank:  # LoRA: the frozen base may be bf16
        raise ConfigError(
            "model.dtype=bfloat16 trains bf16 weights with a plain AdamW: an update at RL learning rates "
            "(1e-6) is below half a bf16 ulp of most weights and is lost (one step leaves ~98% of them "
            "unchanged); use model.dtype=auto (fp32 master weights, bf16 compute on GPU) and, to fit, "
            "model.gradient_checkpointing=true, trainer.fsdp.offload_params=true or more GPUs"
        )
    if isinstance(config, GRPOConfig):
        t, actor, n = config.trainer, config.actor, config.rollout.n
        if config.ref.offload_params and config.algorithm.use_kl_loss and not config.model.lora.rank and (
                t.fsdp.enable == "never" or (t.fsdp.enable == "auto" and world == 1)):
            raise ConfigError("ref.offload_params keeps the KL reference's parameters in host memory with FSDP's CPU "
                              "offload, and this run is not sharded; add trainer.fsdp.enable=always (one rank works too)")
        for key, value in (("trainer.rollout_batch_size", t.rollout_batch_size), ("actor.mini_batch_size",
                           actor.mini_batch_size), ("rollout.n", n), ("actor.ppo_epochs", actor.ppo_epochs),
                           ("rollout.val_n", config.rollout.val_n),
                           ("algorithm.max_num_gen_batches", config.algorithm.max_num_gen_batches),
                           ("trainer.total_steps", t.total_steps), ("actor.micro_batch_size", actor.micro_batch_size),
                           ("actor.max_tokens_per_mbs", actor.max_tokens_per_mbs),
                           ("actor.logprob_chunk_size", actor.logprob_chunk_size)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if config.rollout.temperature <= 0:
            raise ConfigError("rollout.temperature=0 samples one completion per prompt n times: no group has reward "
                              "variance and nothing is learned; sample with rollout.temperature > 0 "
                              "(rollout.val_temperature sets validation's)")
        if t.rollout_batch_size % actor.mini_batch_size:
            raise ConfigError(f"trainer.rollout_batch_size ({t.rollout_batch_size}) must be a multiple of "
                              f"actor.mini_batch_size ({actor.mini_batch_size})")
        if t.rollout_batch_size % world:
            raise ConfigError(f"trainer.rollout_batch_size ({t.rollout_batch_size}) must be divisible by the "
                              f"number of ranks ({world})")
        estimator = config.algorithm.adv_estimator
        if n == 1 and estimator in ("grpo", "rloo"):
            raise ConfigError(
                f"rollout.n=1 leaves algorithm.adv_estimator={estimator} no group baseline: every advantage "
                "is 0 and nothing is learned; set rollout.n >= 2 or use "
                "algorithm.adv_estimator=reinforce_plus_plus_baseline"
            )
        if n == 1 and config.algorithm.filter_zero_variance_groups:
            raise ConfigError("algorithm.filter_zero_variance_groups=true with rollout.n=1 would filter every "
                              "group (one reward has no variance); set rollout.n >= 2")
        if actor.importance_sampling_fix and not actor.importance_sampling_clip > 0:
            raise ConfigError(f"actor.importance_sampling_clip must be > 0, got {actor.importance_sampling_clip}")
    if isinstance(config, SFTConfig):
        t = config.trainer
        for key, value in (("trainer.global_batch_size", t.global_batch_size), ("trainer.micro_batch_size",
                           t.micro_batch_size), ("trainer.max_tokens_per_mbs", t.max_tokens_per_mbs)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if t.total_steps < 0:
            raise ConfigError(f"trainer.total_steps must be >= 0 (0: from trainer.num_epochs), got {t.total_steps}")
        if t.global_batch_size % (t.micro_batch_size * world):
            raise ConfigError(f"trainer.global_batch_size ({t.global_batch_size}) must be a multiple of "
                              f"trainer.micro_batch_size x ranks ({t.micro_batch_size} x {world})")


def merge(config: T, values: dict[str, Any], source: str = "", prefix: str = "") -> T:
    """Return a copy of dataclass `config` with `values` (a nested dict) applied and type-checked."""
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    updates: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"{source}: unknown config key '{dotted}'{hint} (valid keys here: {', '.join(names)})"
            )
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' is a section; expected a mapping, got {value!r}")
            updates[key] = merge(current, value, source, prefix=f"{dotted}.")
        else:
            updates[key] = _coerce(value, hints[key], dotted, source)
    return dataclasses.replace(config, **updates)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    ok, result = _try_coerce(value, hint)
    if not ok:
        raise ConfigError(f"{source}: '{key}' expects {_type_name(hint)}, got {value!r}")
    return result


def _try_coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return (type(None) in args), None
        for arg in args:
            if arg is type(None):
                continue
            ok, result = _try_coerce(value, arg)
            if ok:
                return True, result
        return False, None
    if origin is Literal:
        return (value in args), value
    if origin is dict or hint is dict:
        return (isinstance(value, dict) and all(isinstance(k, str) for k in value)), value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False, None
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False, None
            items = [_try_coerce(v, a) for v, a in zip(value, args)]
        else:
            items = [_try_coerce(v, args[0] if args else Any) for v in value]
        if not all(ok for ok, _ in items):
            return False, None
        return True, origin(v for _, v in items)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if hint is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # yaml reads 1e-6 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    return isinstance(value, hint), value


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), for YAML and loggers."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(config))


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None, width=100)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(to_yaml(config))


def flat_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config, in declaration order."""
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += flat_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
