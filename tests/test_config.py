"""Config: defaults, YAML, dotted overrides, clear errors, the saved resolved config, `config show`."""

import subprocess
import sys

import pytest
import yaml

from lensrl.config import (
    COMMAND_CONFIGS,
    ConfigError,
    GRPOConfig,
    SFTConfig,
    check,
    flat_keys,
    load_config,
    save_config,
    to_dict,
)

# Every key users can set. A new knob must be added here on purpose (and documented).
EXPECTED_KEYS = {
    'grpo': [
        'model.path',
        'model.dtype',
        'model.min_pixels',
        'model.max_pixels',
        'model.trust_remote_code',
        'model.gradient_checkpointing',
        'model.gradient_checkpointing_scope',
        'model.freeze_vision_tower',
        'model.compile',
        'model.router_aux_loss_coef',
        'model.lora.rank',
        'model.lora.alpha',
        'model.lora.dropout',
        'model.lora.target_modules',
        'model.lora.vision_tower',
        'data.train_files',
        'data.val_files',
        'data.prompt_key',
        'data.answer_key',
        'data.choice_key',
        'data.image_keys',
        'data.system_prompt',
        'data.instruction',
        'data.answer_template',
        'data.max_prompt_length',
        'data.filter_overlong_prompts',
        'data.skip_bad_rows',
        'data.shuffle',
        'data.seed',
        'data.val_size',
        'rollout.backend',
        'rollout.n',
        'rollout.temperature',
        'rollout.top_p',
        'rollout.top_k',
        'rollout.max_new_tokens',
        'rollout.batch_size',
        'rollout.val_temperature',
        'rollout.val_top_p',
        'rollout.val_n',
        'rollout.gpu_memory_utilization',
        'rollout.seed',
        'rollout.router_mismatch_seqs',
        'algorithm.adv_estimator',
        'algorithm.norm_adv_by_std',
        'algorithm.filter_zero_variance_groups',
        'algorithm.max_num_gen_batches',
        'algorithm.use_kl_loss',
        'algorithm.kl_loss_type',
        'algorithm.kl_loss_coef',
        'actor.optim.lr',
        'actor.optim.betas',
        'actor.optim.eps',
        'actor.optim.weight_decay',
        'actor.optim.warmup_steps',
        'actor.optim.warmup_ratio',
        'actor.optim.schedule',
        'actor.optim.min_lr_ratio',
        'actor.optim.grad_clip',
        'actor.ppo_epochs',
        'actor.mini_batch_size',
        'actor.reuse_on_policy_logprob',
        'actor.micro_batch_size',
        'actor.clip_ratio_low',
        'actor.clip_ratio_high',
        'actor.clip_ratio_c',
        'actor.policy_loss',
        'actor.loss_agg_mode',
        'actor.entropy_coeff',
        'actor.mask_truncated_completions',
        'actor.importance_sampling_fix',
        'actor.importance_sampling_clip',
        'actor.importance_sampling_level',
        'actor.logprob_chunk_size',
        'actor.use_dynamic_bsz',
        'actor.max_tokens_per_mbs',
        'reward.function',
        'reward.function_kwargs',
        'reward.type',
        'reward.format_pattern',
        'reward.format_weight',
        'reward.reward_min_val',
        'reward.reward_max_val',
        'reward.overlong_buffer_len',
        'reward.overlong_penalty_factor',
        'reward.num_workers',
        'reward.timeout_s',
        'ref.dtype',
        'ref.offload_params',
        'trainer.run_name',
        'trainer.output_dir',
        'trainer.total_steps',
        'trainer.test_freq',
        'trainer.val_before_train',
        'trainer.save_freq',
        'trainer.save_limit',
        'trainer.save_hf',
        'trainer.save_last',
        'trainer.resume',
        'trainer.seed',
        'trainer.device',
        'trainer.loggers',
        'trainer.wandb_project',
        'trainer.num_logged_samples',
        'trainer.val_generations_to_log',
        'trainer.max_bad_steps',
        'trainer.fsdp.enable',
        'trainer.fsdp.param_dtype',
        'trainer.fsdp.reshard_after_forward',
        'trainer.fsdp.reduce_grads',
        'trainer.fsdp.offload_params',
        'trainer.cpu_threads',
        'trainer.dist_timeout_s',
        'trainer.profile_steps',
        'trainer.rollout_batch_size',
    ],
    'sft': [
        'model.path',
        'model.dtype',
        'model.min_pixels',
        'model.max_pixels',
        'model.trust_remote_code',
        'model.gradient_checkpointing',
        'model.gradient_checkpointing_scope',
        'model.freeze_vision_tower',
        'model.compile',
        'model.router_aux_loss_coef',
        'model.lora.rank',
        'model.lora.alpha',
        'model.lora.dropout',
        'model.lora.target_modules',
        'model.lora.vision_tower',
        'data.train_files',
        'data.val_files',
        'data.prompt_key',
        'data.answer_key',
        'data.choice_key',
        'data.image_keys',
        'data.system_prompt',
        'data.instruction',
        'data.answer_template',
        'data.max_prompt_length',
        'data.filter_overlong_prompts',
        'data.skip_bad_rows',
        'data.shuffle',
        'data.seed',
        'data.val_size',
        'optim.lr',
        'optim.betas',
        'optim.eps',
        'optim.weight_decay',
        'optim.warmup_steps',
        'optim.warmup_ratio',
        'optim.schedule',
        'optim.min_lr_ratio',
        'optim.grad_clip',
        'rollout.backend',
        'rollout.n',
        'rollout.temperature',
        'rollout.top_p',
        'rollout.top_k',
        'rollout.max_new_tokens',
        'rollout.batch_size',
        'rollout.val_temperature',
        'rollout.val_top_p',
        'rollout.val_n',
        'rollout.gpu_memory_utilization',
        'rollout.seed',
        'rollout.router_mismatch_seqs',
        'reward.function',
        'reward.function_kwargs',
        'reward.type',
        'reward.format_pattern',
        'reward.format_weight',
        'reward.reward_min_val',
        'reward.reward_max_val',
        'reward.overlong_buffer_len',
        'reward.overlong_penalty_factor',
        'reward.num_workers',
        'reward.timeout_s',
        'trainer.run_name',
        'trainer.output_dir',
        'trainer.total_steps',
        'trainer.test_freq',
        'trainer.val_before_train',
        'trainer.save_freq',
        'trainer.save_limit',
        'trainer.save_hf',
        'trainer.save_last',
        'trainer.resume',
        'trainer.seed',
        'trainer.device',
        'trainer.loggers',
        'trainer.wandb_project',
        'trainer.num_logged_samples',
        'trainer.val_generations_to_log',
        'trainer.max_bad_steps',
        'trainer.fsdp.enable',
        'trainer.fsdp.param_dtype',
        'trainer.fsdp.reshard_after_forward',
        'trainer.fsdp.reduce_grads',
        'trainer.fsdp.offload_params',
        'trainer.cpu_threads',
        'trainer.dist_timeout_s',
        'trainer.profile_steps',
        'trainer.num_epochs',
        'trainer.global_batch_size',
        'trainer.micro_batch_size',
        'trainer.use_dynamic_bsz',
        'trainer.max_tokens_per_mbs',
        'trainer.stop_at_loss',
    ],
    'eval': [
        'model.path',
        'model.dtype',
        'model.min_pixels',
        'model.max_pixels',
        'model.trust_remote_code',
        'model.gradient_checkpointing',
        'model.gradient_checkpointing_scope',
        'model.freeze_vision_tower',
        'model.compile',
        'model.router_aux_loss_coef',
        'model.lora.rank',
        'model.lora.alpha',
        'model.lora.dropout',
        'model.lora.target_modules',
        'model.lora.vision_tower',
        'data.train_files',
        'data.val_files',
        'data.prompt_key',
        'data.answer_key',
        'data.choice_key',
        'data.image_keys',
        'data.system_prompt',
        'data.instruction',
        'data.answer_template',
        'data.max_prompt_length',
        'data.filter_overlong_prompts',
        'data.skip_bad_rows',
        'data.shuffle',
        'data.seed',
        'data.val_size',
        'rollout.backend',
        'rollout.n',
        'rollout.temperature',
        'rollout.top_p',
        'rollout.top_k',
        'rollout.max_new_tokens',
        'rollout.batch_size',
        'rollout.val_temperature',
        'rollout.val_top_p',
        'rollout.val_n',
        'rollout.gpu_memory_utilization',
        'rollout.seed',
        'rollout.router_mismatch_seqs',
        'reward.function',
        'reward.function_kwargs',
        'reward.type',
        'reward.format_pattern',
        'reward.format_weight',
        'reward.reward_min_val',
        'reward.reward_max_val',
        'reward.overlong_buffer_len',
        'reward.overlong_penalty_factor',
        'reward.num_workers',
        'reward.timeout_s',
        'output_dir',
        'run_name',
        'device',
        'seed',
    ],
}


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_config_key_is_a_conscious_choice(command):
    assert flat_keys(COMMAND_CONFIGS[command]()) == EXPECTED_KEYS[command]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  max_prompt_length: 512\n  image_keys: [image]\nactor:\n  optim:\n    lr: 1.0e-5\n"
                    "trainer:\n  run_name: ${data.prompt_key}_run\n")
    cfg = load_config(GRPOConfig, path, ["data.max_prompt_length=2048", "actor.optim.betas=[0.9,0.95]",
                                         "rollout.temperature=1", "data.system_prompt=null",
                                         "data.train_files=[train.parquet]"])
    assert cfg.data.max_prompt_length == 2048  # command line wins over the file
    assert cfg.data.image_keys == ["image"]
    assert cfg.actor.optim.lr == 1e-5
    assert cfg.actor.optim.betas == (0.9, 0.95)
    assert cfg.rollout.temperature == 1.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.trainer.run_name == "problem_run"  # OmegaConf interpolation in recipes
    assert cfg.data.system_prompt is None


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(GRPOConfig, None, ["data.max_promt_length=3"])
    assert "data.max_promt_length" in str(e.value) and "data.max_prompt_length" in str(e.value)
    path = tmp_path / "bad.yaml"
    path.write_text("actor:\n  optim:\n    learning_rate: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(GRPOConfig, path)
    assert "actor.optim.learning_rate" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("data.max_prompt_length=abc", "an integer"),
    ("rollout.backend=vllm", "one of 'auto', 'hf', 'engine'"),
    ("algorithm.use_kl_loss=maybe", "a boolean"),
    ("data.image_keys=images", "a list of a string"),
    ("actor.optim.betas=[0.9]", "a list"),
    ("actor=3", "section"),
])
def test_wrong_type_names_expected_type(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(GRPOConfig, None, [override])
    assert expected in str(e.value) and override.split("=")[0] in str(e.value)


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(GRPOConfig, None, ["data.max_prompt_length"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(GRPOConfig, tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, ["optim.lr=3e-4", "data.train_files=[a.parquet,b.parquet]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(SFTConfig, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("recipe", ["tiny_demo_sft", "tiny_demo_grpo", "qwen2_5_vl_3b_geo3k_grpo",
                                    "qwen2_5_vl_7b_geo3k_grpo", "qwen3_vl_2b_geo3k_tis_grpo",
                                    "qwen2_5_vl_3b_robo2vlm_sft", "tiny_box_iou_grpo", "qwen3_vl_30b_a3b_geo3k_grpo",
                                    "qwen2_5_vl_7b_geo3k_grpo_lora"])
def test_recipes_are_valid(recipe, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[1])  # recipes name paths from the repository's root
    path = Path(__file__).parents[1] / "configs" / f"{recipe}.yaml"
    command = "sft" if recipe.endswith("sft") else "grpo"
    cfg = load_config(COMMAND_CONFIGS[command], path)
    if recipe.endswith("lora"):  # a LoRA recipe trains adapters on a bf16 base, under FSDP too
        assert cfg.model.lora.rank > 0 and cfg.model.dtype == "bfloat16"
        check(cfg, world_size=8)


def test_config_show_prints_defaults():
    out = subprocess.run([sys.executable, "-m", "lensrl", "config", "show", "grpo", "actor.optim.lr=5e-7"],
                         capture_output=True, text=True, check=True).stdout
    shown = yaml.safe_load(out)
    assert shown["actor"]["optim"]["lr"] == 5e-7
    assert shown["rollout"]["n"] == GRPOConfig().rollout.n


# Settings that cannot train correctly are refused with the config, before any model or data loads.
@pytest.mark.parametrize("config_cls, overrides, world, expected", [
    (GRPOConfig, ["rollout.n=1"], 1, "rollout.n=1 leaves algorithm.adv_estimator=grpo no group baseline"),
    (GRPOConfig, ["rollout.n=1", "algorithm.adv_estimator=rloo"], 1, "adv_estimator=rloo"),
    (GRPOConfig, ["rollout.n=1", "algorithm.adv_estimator=reinforce_plus_plus_baseline",
                  "algorithm.filter_zero_variance_groups=true"], 1, "would filter every group"),
    (GRPOConfig, ["trainer.rollout_batch_size=12", "actor.mini_batch_size=8"], 1, "must be a multiple of actor.mini_batch_size"),
    (GRPOConfig, ["trainer.rollout_batch_size=6", "actor.mini_batch_size=2"], 4, "must be divisible by the number of ranks (4)"),
    (GRPOConfig, ["trainer.fsdp.enable=never"], 2, "trainer.fsdp.enable=never with 2 ranks"),
    (SFTConfig, ["trainer.fsdp.enable=never"], 2, "trainer.fsdp.enable=never with 2 ranks"),
    (GRPOConfig, ["model.dtype=bfloat16"], 1, "model.dtype=bfloat16 trains bf16 weights with a plain AdamW"),
    (SFTConfig, ["model.dtype=bfloat16"], 1, "model.dtype=bfloat16"),
    (GRPOConfig, ["trainer.loggers=[jsonl,tensorbord]"], 1, "trainer.loggers: unknown logger(s) ['tensorbord']"),
    (SFTConfig, ["trainer.global_batch_size=6", "trainer.micro_batch_size=4"], 1, "must be a multiple of"),
    (GRPOConfig, ["actor.importance_sampling_fix=true", "actor.importance_sampling_clip=0"], 1, "must be > 0"),
    (GRPOConfig, ["data.train_files=null"], 1, "GRPO needs data.train_files"),
    (SFTConfig, ["data.train_files=null", "data.val_files=null"], 1, "set data.train_files"),
    (GRPOConfig, ["rollout.gpu_memory_utilization=1.5"], 1, "rollout.gpu_memory_utilization must be in (0, 1]"),
    (GRPOConfig, ["reward.reward_min_val=2"], 1, "must not exceed reward.reward_max_val"),
    (GRPOConfig, ["reward.timeout_s=0"], 1, "reward.timeout_s > 0"),
    (GRPOConfig, ["rollout.max_new_tokens=0"], 1, "rollout.max_new_tokens must be >= 1"),
])
def test_settings_that_cannot_train_correctly_are_refused(config_cls, overrides, world, expected, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as e:
        load_config(config_cls, None, ["data.train_files=[data/train.parquet]", *overrides])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_reinforce_plus_plus_baseline_trains_with_one_sample_per_prompt():
    load_config(GRPOConfig, None, ["data.train_files=[t.parquet]", "rollout.n=1",
                                   "algorithm.adv_estimator=reinforce_plus_plus_baseline"])


def test_eval_may_run_a_bf16_model():
    from lensrl.config import EvalConfig

    assert load_config(EvalConfig, None, ["model.dtype=bfloat16", "data.val_files=[t.parquet]"]).model.dtype == "bfloat16"


def test_the_cli_refuses_before_loading_anything(tmp_path):
    """A rule broken on the command line: one `error:` line and exit code 2, before the model
    (which does not exist here) or the data is touched."""
    result = subprocess.run([sys.executable, "-m", "lensrl", "grpo", "model.path=/nonexistent", "rollout.n=1",
                             "data.train_files=[/nonexistent/train.parquet]"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: rollout.n=1 leaves")
    assert "Traceback" not in result.stderr and "nonexistent" not in result.stderr
