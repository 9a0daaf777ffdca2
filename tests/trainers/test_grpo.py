"""GRPO end to end on a tiny Qwen2.5-VL: what a run writes, resume, Ctrl-C, bad steps, variants."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from trainer_helpers import grpo_overrides, run_cli

from lensrl.config import GRPOConfig, load_config
from lensrl.logging import read_metrics
from lensrl.rewards.pool import RewardResult
from lensrl.trainers.common import BadStepsError
from lensrl.trainers.grpo import GRPOTrainer

TIMING_PREFIXES = ("timing_s/", "perf/")


def test_grpo_cli_writes_a_complete_run(tiny_qwen25_dir, color_data, tmp_path, monkeypatch):
    """`lensrl grpo` writes config, metrics, TensorBoard events, samples, checkpoints and an HF folder,
    and shows progress on a terminal while it loads the model, validates and rolls out."""
    monkeypatch.setenv("TTY_INTERACTIVE", "1")  # rich and tqdm draw their bars as on a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "cli", "trainer.save_freq=1",
                               "trainer.save_limit=1", "trainer.test_freq=2", "trainer.val_before_train=true",
                               "rollout.val_n=2", "rollout.val_temperature=1.0",
                               "trainer.loggers=[console,jsonl,tensorboard]")
    result = run_cli("grpo", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "cli"
    assert load_config(GRPOConfig, run / "config.yaml").rollout.n == 4  # the resolved config, reloadable
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2]
    for name in ["critic/score/mean", "reward/std", "reward/accuracy", "response_length/mean", "response_length/clip_ratio",
                 "prompt_length/mean", "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy",
                 "actor/grad_norm", "actor/lr", "rollout/train_kl", "rollout/train_logprob_absdiff",
                 "advantage/all_correct_ratio", "advantage/all_wrong_ratio", "timing_s/gen", "timing_s/reward",
                 "timing_s/update_actor", "timing_s/update_weights", "timing_s/step",
                 "perf/throughput", "critic/score/max", "critic/score/min", "critic/advantages/mean",
                 "critic/advantages/max", "critic/advantages/min", "prompt_length/min", "prompt_length/clip_ratio",
                 "perf/cpu_memory_used_gb"]:
        assert name in records[1], name
    # where the time to the first step went: the set-up phases, once, in the first step's record
    startup = {k: v for k, v in records[1].items() if k.startswith("timing_s/startup/")}
    assert set(startup) == {"timing_s/startup/policy", "timing_s/startup/data", "timing_s/startup/rollout"}
    assert all(v >= 0 for v in startup.values()) and startup["timing_s/startup/policy"] > 0
    assert not any(k.startswith("timing_s/startup/") for k in records[2])
    assert "val/accuracy" in records[0] and "val/accuracy" in records[2]
    assert "val-core/test/acc/mean@2" in records[2] and "timing_s/testing" in records[2]  # 2 samples per validation prompt
    # TensorBoard: a real event file with the same numbers.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    reward = events.Scalars("critic/score/mean")
    assert [e.step for e in reward] == [1, 2]
    assert reward[0].value == pytest.approx(records[1]["critic/score/mean"], rel=1e-6)
    # Validation generations: a markdown table and the prompts' images, at each validation (steps 0 and 2).
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    text = events.Tensors("val/generations/text_summary")
    assert [e.step for e in text] == [0, 2]
    table = text[-1].tensor_proto.string_val[0].decode()
    val_sample = json.loads((run / "samples" / "val_step_2.jsonl").read_text().splitlines()[0])
    assert "| prompt | completion |" in table and val_sample["completion"].split("\n")[0][:20] in table
    images = events.Images("val/generations/0")
    assert [e.step for e in images] == [0, 2] and images[0].width > 0
    # Samples: prompt, image reference, completion, reward.
    sample = json.loads((run / "samples" / "train_step_1.jsonl").read_text().splitlines()[0])
    assert {"prompt", "images", "completion", "reward", "answer"} <= set(sample)
    assert "row" in sample["images"][0]
    # Checkpoints: complete ones only, the oldest pruned.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]
    # Progress on the console: the step line, and bars while loading, validating and rolling out.
    assert "step 2/2" in result.stderr
    for bar in ("Loading weights", "val: prompts", "rollout: sequences"):
        assert bar in result.stderr, bar
    # The final HF folder loads with plain transformers and generates.
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(run / "hf")
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    ids = tokenizer("hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(TIMING_PREFIXES)}


def test_resume_matches_uninterrupted_run(tiny_qwen25_dir, color_data, tmp_path):
    """Resuming from step 1 recomputes step 2 exactly as the uninterrupted run did (CPU, fp32)."""
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "resume", "trainer.total_steps=2",
                               "trainer.save_freq=1", "trainer.save_limit=3", "trainer.save_hf=false",
                               "actor.optim.schedule=cosine", "actor.optim.warmup_steps=1")
    GRPOTrainer(load_config(GRPOConfig, None, overrides)).fit()
    run = tmp_path / "resume"
    uninterrupted = read_metrics(run)[-1]
    assert uninterrupted["step"] == 2
    shutil.rmtree(run / "checkpoints" / "step_2")  # as if the run had died during step 2
    trainer = GRPOTrainer(load_config(GRPOConfig, None, overrides))
    assert trainer.step == 1
    trainer.fit()
    resumed = read_metrics(run)[-1]
    assert resumed["step"] == 2
    assert _comparable(resumed) == _comparable(uninterrupted)


def test_ctrl_c_saves_a_checkpoint_and_exits(tiny_qwen25_dir, color_data, tmp_path):
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "interrupt", "trainer.total_steps=1000",
                               "trainer.save_freq=0")
    process = subprocess.Popen([sys.executable, "-m", "lensrl", "grpo", *overrides], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "interrupt" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    assert metrics.exists(), "the run never logged a step"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    checkpoints = list((tmp_path / "interrupt" / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "meta.json").is_file()
    step = int(checkpoints[0].name.split("_")[1])
    assert 1 <= step < 1000
    assert "resume" in stderr


class NaNRewardTrainer(GRPOTrainer):
    """A reward function that returns NaN (a user's buggy reward), from step `bad_from` on."""

    bad_from = 2

    def score(self, samples, flat):
        results = super().score(samples, flat)
        if self.step >= self.bad_from:
            return [RewardResult(float("nan"), r.parts, r.status) for r in results]
        return results


def test_nonfinite_steps_are_skipped_then_the_run_stops(tiny_qwen25_dir, color_data, tmp_path):
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "nan", "trainer.total_steps=10",
                               "trainer.save_freq=1", "trainer.save_limit=5", "trainer.max_bad_steps=3")
    trainer = NaNRewardTrainer(load_config(GRPOConfig, None, overrides))
    with pytest.raises(BadStepsError, match="step_1"):
        trainer.fit()
    records = read_metrics(tmp_path / "nan")
    assert [r["actor/skipped_updates"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    # Skipped steps leave the weights alone: the policy still equals the step-1 checkpoint.
    good = GRPOTrainer(load_config(GRPOConfig, None, [*overrides, "trainer.resume=" + str(tmp_path / "nan" / "checkpoints" / "step_1")]))
    for (name, a), (_, b) in zip(trainer.policy.named_parameters(), good.policy.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("variant", [
    ["algorithm.adv_estimator=rloo"],
    ["algorithm.adv_estimator=reinforce_plus_plus_baseline"],
    ["algorithm.norm_adv_by_std=false", "actor.loss_agg_mode=seq-mean-token-sum-norm"],
    ["actor.policy_loss=gspo", "actor.loss_agg_mode=seq-mean-token-mean"],
    ["algorithm.use_kl_loss=true", "algorithm.kl_loss_type=k3", "actor.loss_agg_mode=seq-mean-token-sum"],
    ["actor.importance_sampling_fix=true", "actor.importance_sampling_level=sequence"],
    ["actor.importance_sampling_fix=true", "rollout.top_p=0.9", "rollout.top_k=20"],
    ["algorithm.filter_zero_variance_groups=true", "actor.mask_truncated_completions=true"],
    ["actor.ppo_epochs=2", "actor.mini_batch_size=2", "actor.micro_batch_size=3", "actor.entropy_coeff=0.01"],
], ids=["rloo", "rpp", "drgrpo", "gspo", "kl", "tis_seq", "tis_topp", "dapo_filter", "epochs"])
def test_algorithm_variants_take_finite_steps(tiny_qwen25_dir, color_data, tmp_path, variant):
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "variant", "trainer.total_steps=1",
                               "trainer.save_hf=false", *variant)
    trainer = GRPOTrainer(load_config(GRPOConfig, None, overrides))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.fit()
    record = read_metrics(tmp_path / "variant")[-1]
    assert all(math.isfinite(v) for k, v in record.items() if isinstance(v, float)), record
    if "algorithm.use_kl_loss=true" in variant:
        assert "actor/kl_loss" in record and trainer.ref is not None
    else:
        assert trainer.ref is None  # the reference model exists only when a KL term needs it
    if any("importance_sampling_fix=true" in v for v in variant):
        assert 0 < record["rollout/is_weight_mean"] <= 2.0
    if "actor.ppo_epochs=2" in variant:
        assert record["actor/num_updates"] == 4  # 2 epochs x 2 mini-batches
    moved = any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))
    if record["advantage/filtered_groups"] == 4 * record.get("batch/num_gen_batches", 1):
        # every group of every round had zero reward variance: nothing to learn
        assert not moved and record["actor/num_updates"] == 0
    else:
        assert moved


class LetterShareTrainer(GRPOTrainer):
    """Rewards the share of letters in a completion, which a random tiny model earns in varying
    amounts: every group has reward variance, so every step has a gradient."""

    def score(self, samples, flat):
        return [RewardResult(sum(ch.isalpha() for ch in c.text) / max(len(c.text), 1)) for _, c in flat]


@pytest.mark.parametrize("setting", [[], ["trainer.fsdp.enable=always"], ["model.dtype=float32"]])
def test_every_supported_precision_moves_the_weights_at_rl_learning_rates(tiny_qwen25_dir, color_data, tmp_path,
                                                                          setting):
    """One step at lr 1e-6 changes (nearly) every trainable weight: master weights are fp32, so
    an update far below a bf16 ulp is not rounded away (bf16 weights are refused by the config)."""
    from safetensors.torch import load_file

    cfg = load_config(GRPOConfig, None, grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "p", "actor.optim.lr=1e-6",
                                                       "trainer.total_steps=1", *setting))
    LetterShareTrainer(cfg).fit()
    before, after = load_file(tiny_qwen25_dir / "model.safetensors"), load_file(tmp_path / "p" / "hf" / "model.safetensors")
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    assert changed / sum(t.numel() for t in before.values()) >= 0.9


class FormattedButWrongTrainer(GRPOTrainer):
    """Every completion well formatted and wrong: score 0.1 (accuracy 0, format 1)."""

    def score(self, samples, flat):
        return [RewardResult(0.1, {"accuracy": 0.0, "format": 1.0}) for _ in flat]


def test_all_wrong_groups_are_counted_from_the_accuracy_part(tiny_qwen25_dir, color_data, tmp_path):
    """A group of well formatted wrong answers scores 0.1, not the minimum, and is still all wrong;
    its advantages are exactly 0."""
    cfg = load_config(GRPOConfig, None, grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "w", "trainer.total_steps=1"))
    metrics = FormattedButWrongTrainer(cfg).fit()
    assert metrics["advantage/all_wrong_ratio"] == 1.0 and metrics["advantage/all_correct_ratio"] == 0.0
    assert metrics["advantage/zero_variance_ratio"] == 1.0
    assert metrics["actor/pg_loss"] == 0.0 and metrics["actor/grad_norm"] == 0.0


def test_eval_of_a_trained_folder_grades_as_its_run_did_in_a_folder_of_its_own(tiny_qwen25_dir, color_data, tmp_path):
    """`lensrl eval` of a run's hf/ folder takes the run's reward settings (this run: no format
    reward, format weight 0.25), a reward.* key given replacing that key only, and each invocation
    writes a new folder (ev, then ev_2)."""
    import yaml

    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "trained", "trainer.total_steps=1",
                               "reward.format_weight=0.25")
    GRPOTrainer(load_config(GRPOConfig, None, overrides)).fit()
    common = ["eval", "--model", str(tmp_path / "trained" / "hf"), "--data", str(color_data), "data.val_size=4",
              "rollout.backend=hf", "rollout.max_new_tokens=4", "data.max_prompt_length=64", f"output_dir={tmp_path}",
              "run_name=ev", "reward.num_workers=1"]
    first = run_cli(*common)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reward settings of the run" in first.stderr + first.stdout
    graded = yaml.safe_load((tmp_path / "ev" / "config.yaml").read_text())["reward"]
    assert graded["format_pattern"] is None and graded["format_weight"] == 0.25  # the run's, not the defaults
    before = (tmp_path / "ev" / "eval_metrics.json").read_text()
    second = run_cli(*common, "reward.format_weight=0.5")  # that key told otherwise, the others the run's
    assert second.returncode == 0, second.stderr[-3000:]
    graded = yaml.safe_load((tmp_path / "ev_2" / "config.yaml").read_text())["reward"]
    assert graded["format_weight"] == 0.5 and graded["format_pattern"] is None
    assert (tmp_path / "trained" / "hf" / "lensrl_run.yaml").is_file()  # the folder carries its run's record
    assert (tmp_path / "ev" / "eval_metrics.json").read_text() == before  # the first result is untouched


def test_per_source_metrics_keep_a_datasets_shards_together_and_two_datasets_apart():
    from lensrl.trainers.evaluate import summarize

    records = [{"source": f"/d/{folder}/{file}", "reward": r, "reward_accuracy": r, "response_length": 3,
                "status": "ok"} for folder, file, r in [("shards", "test-00000-of-00002.parquet", 1.0),
                                                        ("shards", "test-00001-of-00002.parquet", 0.0),
                                                        ("other", "test.parquet", 1.0), ("geo", "val.parquet", 0.0)]]
    metrics = summarize(records, 1, "val")
    assert {k: v for k, v in metrics.items() if k.startswith("val-core/")} == {
        "val-core/shards/test/acc/mean@1": 0.5, "val-core/other/test/acc/mean@1": 1.0, "val-core/val/acc/mean@1": 0.0}


def test_eval_finds_a_runs_reward_file_from_where_the_run_was_started(tmp_path, monkeypatch):
    """A run trained with reward.function=rw/mine.py:score (relative to where it was started), its
    model evaluated from another folder: the inherited path is resolved from the run's place."""
    from lensrl.trainers.evaluate import training_reward

    project = tmp_path / "project"
    (project / "rw").mkdir(parents=True)
    (project / "rw" / "mine.py").write_text("def score(completion, sample):\n    return 1.0\n")
    run = project / "out" / "exp" / "r1"
    (run / "hf").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer:\n  output_dir: out/exp\nreward:\n  function: rw/mine.py:score\n"
                                     "  format_weight: 0.3\n")
    monkeypatch.chdir(tmp_path)  # elsewhere
    overrides, record = training_reward(None, [f"model.path={run / 'hf'}", "reward.format_weight=0.5"])
    assert record == run / "config.yaml"
    assert overrides == [f'reward.function="{(project / "rw" / "mine.py").resolve()}:score"']  # format_weight: the user's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lensrl_eval_computes_as_training_validation_does(tiny_qwen25_dir, color_data, tmp_path):
    """On a GPU both run the policy under bf16 autocast: `lensrl eval` of the starting model
    writes the same greedy completions as GRPO's validation before its first step."""
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "v", "trainer.total_steps=1",
                               "trainer.val_before_train=true", "data.val_size=8")
    GRPOTrainer(load_config(GRPOConfig, None, overrides)).fit()
    result = run_cli("eval", "--model", str(tiny_qwen25_dir), "--data", str(color_data), "data.val_size=8",
                     "rollout.backend=hf", "data.max_prompt_length=64", "rollout.max_new_tokens=6",
                     f"output_dir={tmp_path}", "run_name=e")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = [json.loads(line)["completion"] for line in (tmp_path / "e" / "samples" / "eval.jsonl").open()]
    validated = [json.loads(line)["completion"] for line in (tmp_path / "v" / "samples" / "val_step_0.jsonl").open()]
    assert validated and evaluated[: len(validated)] == validated


def test_a_resumed_run_follows_its_own_config_and_says_what_changed(tiny_qwen25_dir, color_data, tmp_path, capsys):
    """A finished 2-step cosine run (lr ends at 0) resumed with total_steps=4 and another lr: the
    next step uses the new schedule's lr (logged = used, weights move), the earlier config is kept
    as config.step_2.yaml with the changed keys printed, and a stale .tmp_step_* is cleaned up."""
    from safetensors.torch import load_file

    from lensrl.train.optim import lr_factor

    base = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "r", "trainer.save_freq=1", "trainer.save_limit=3",
                          "actor.optim.schedule=cosine", "actor.optim.lr=1e-3")
    LetterShareTrainer(load_config(GRPOConfig, None, base)).fit()
    run = tmp_path / "r"
    (run / "checkpoints" / ".tmp_step_9").mkdir()  # what a crash during a save leaves
    capsys.readouterr()
    cfg = load_config(GRPOConfig, None, [*base, "trainer.total_steps=4", "actor.optim.lr=2e-3"])
    trainer = LetterShareTrainer(cfg)
    printed = capsys.readouterr().err
    assert "trainer.total_steps: 2 -> 4" in printed and "actor.optim.lr: 0.001 -> 0.002" in printed
    assert load_config(GRPOConfig, run / "config.step_2.yaml").trainer.total_steps == 2
    assert load_config(GRPOConfig, run / "config.yaml").trainer.total_steps == 4
    assert trainer.step == 2
    expected = 2e-3 * lr_factor(2, 4, cfg.actor.optim)  # one optimizer step per GRPO step here
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected) and expected > 1e-4
    trainer.fit()
    step3 = next(r for r in read_metrics(run) if r["step"] == 3)
    assert step3["actor/lr"] == pytest.approx(expected)  # logged = used
    assert not (run / "checkpoints" / ".tmp_step_9").exists()
    before = load_file(run / "hf" / "model.safetensors")  # written at the end of each fit: step 4 now
    assert any(not torch.equal(before[k], load_file(tiny_qwen25_dir / "model.safetensors")[k]) for k in before)


def test_a_rank_new_to_a_checkpoint_gets_its_own_random_stream():
    from lensrl.train.checkpoint import rng_state, seed_new_rank, set_rng_state

    torch.manual_seed(0)
    saved = rng_state()
    draws = {}
    for rank in (0, 1, 2):
        seed_new_rank(saved, rank)
        draws[rank] = torch.rand(4)
    set_rng_state(saved)
    rank0 = torch.rand(4)
    assert not any(torch.equal(draws[a], draws[b]) for a, b in [(0, 1), (0, 2), (1, 2)])
    assert not torch.equal(draws[1], rank0) and not torch.equal(draws[2], rank0)
    seed_new_rank(saved, 1)
    assert torch.equal(torch.rand(4), draws[1])  # reproducible


class RedOnlyTrainer(GRPOTrainer):
    """Only prompts whose answer is red get a varying reward (the letter share); every other
    group scores 0 throughout: about four groups in five have no signal."""

    def score(self, samples, flat):
        return [RewardResult(sum(ch.isalpha() for ch in c.text) / max(len(c.text), 1) if samples[i].answer == "red"
                             else 0.0) for i, c in flat]


def test_dynamic_sampling_refills_the_batch_with_groups_that_have_signal(tiny_qwen25_dir, color_data, tmp_path):
    """DAPO dynamic sampling as DAPO and verl define it: groups without reward variance are dropped
    and more prompts generated until rollout_batch_size groups with signal are gathered, so every
    optimizer step sees a full mini-batch and the cosine schedule ends at 0; a bound on the rounds
    makes it train on what it has and say so."""
    run = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "dapo", "algorithm.filter_zero_variance_groups=true",
                         "trainer.total_steps=2", "actor.mini_batch_size=2", "actor.optim.schedule=cosine",
                         "algorithm.max_num_gen_batches=40", "trainer.save_hf=false")
    trainer = RedOnlyTrainer(load_config(GRPOConfig, None, run))
    batch_sizes = []
    update = trainer.update
    trainer.update = lambda seqs, batch, minibatches, width: (
        batch_sizes.append([len(mb) for mb in minibatches]), update(seqs, batch, minibatches, width))[1]
    trainer.fit()
    records = read_metrics(tmp_path / "dapo")
    for r in records:
        assert r["batch/num_gen_batches"] > 1 and r["advantage/filtered_groups"] > 0
        assert r["actor/num_updates"] == 2  # 4 prompts / mini-batches of 2, both full
    assert batch_sizes == [[8, 8], [8, 8]]  # sequences per mini-batch: 2 groups x n=4, every step
    from lensrl.train.optim import lr_factor

    used = [lr_factor(k, 4, trainer.cfg.actor.optim) * 1e-3 for k in (2, 3)]  # the last step's two updates
    assert records[-1]["actor/lr"] == pytest.approx(sum(used) / 2)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the schedule ended on time

    short = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "dapo_short", "algorithm.filter_zero_variance_groups=true",
                           "trainer.total_steps=1", "actor.mini_batch_size=2", "algorithm.max_num_gen_batches=1",
                           "trainer.save_hf=false")
    RedOnlyTrainer(load_config(GRPOConfig, None, short)).fit()
    (record,) = read_metrics(tmp_path / "dapo_short")
    kept = 4 - int(record["advantage/filtered_groups"])
    assert record["batch/num_gen_batches"] == 1 and kept < 4
    assert record["actor/num_updates"] == math.ceil(kept / 2)  # what one round had, in mini-batches of 2


class ProbeTrainer(LetterShareTrainer):
    """A GRPO step observed from inside: what each micro-batch's loss saw. The policy's head gets
    a bias towards EOS (a real parameter of the module, so the rollout and the trainer both see
    it), so completions end with the stop token."""

    def __init__(self, cfg):
        super().__init__(cfg)
        head = self.policy.lm_head
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features), requires_grad=False)
        with torch.no_grad():
            head.bias[self.processor.eos_token_ids[0]] = 5.0
        self.micro_calls, self.updates = [], []

    def _micro_loss(self, seqs, batch, micro, width, num_tokens, num_seqs):
        loss, metrics = super()._micro_loss(seqs, batch, micro, width, num_tokens, num_seqs)
        with torch.no_grad():
            logp, _, _ = self.forward(self.policy, [seqs[i] for i in micro], width)
        self.micro_calls.append({"micro": list(micro), "logp": logp.detach().clone(),
                                 "old": batch["old_logp"][micro].clone(), "mask": batch["mask"][micro].clone()})
        return loss, metrics

    def update(self, seqs, batch, minibatches, width):
        metrics = super().update(seqs, batch, minibatches, width)
        self.updates.append({"seqs": seqs, "batch": batch, "width": width,
                             "after": self.logprobs(self.policy, seqs, width)})
        return metrics


def test_the_grpo_step_is_wired_as_the_algorithm_says(tiny_qwen25_dir, color_data, tmp_path):
    """Through a real step (2 PPO epochs over one mini-batch, TIS on, fp32 on CPU): the first
    update's new/old ratio is 1; the old log-probabilities stay fixed across epochs; the stop
    token is in the loss mask; TIS weights are 1 where rollout and trainer agree; and the update
    raises the log-probability of positively advantaged tokens and lowers that of negative ones."""
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "wiring", "trainer.total_steps=1",
                               "actor.ppo_epochs=2", "actor.importance_sampling_fix=true", "rollout.max_new_tokens=8",
                               "trainer.save_hf=false")
    trainer = ProbeTrainer(load_config(GRPOConfig, None, overrides))
    metrics = trainer.fit()
    first, second = trainer.micro_calls[0], trainer.micro_calls[-1]
    assert first["micro"] == second["micro"]  # one micro-batch, seen once per epoch
    mask = first["mask"]
    torch.testing.assert_close(first["logp"][mask], first["old"][mask], rtol=0, atol=1e-5)  # ratio 1 before any step
    assert torch.equal(first["old"], second["old"])  # old log-probs are not recomputed between epochs
    assert (second["logp"][mask] - second["old"][mask]).abs().max() > 1e-4  # the first epoch moved the policy
    (step,) = trainer.updates
    seqs, batch = step["seqs"], step["batch"]
    eos = set(trainer.processor.eos_token_ids)
    stopped = [i for i, s in enumerate(seqs) if int(s.input_ids[-1]) in eos]
    assert stopped, "no completion ended with the stop token"
    for i in stopped:
        assert batch["mask"][i, seqs[i].response_length - 1]  # the stop token is trained on
        assert not batch["mask"][i, seqs[i].response_length :].any()
    assert metrics["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    delta = (step["after"] - batch["old_logp"])[batch["mask"]]
    adv = batch["adv"][batch["mask"]]
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()


@pytest.mark.parametrize("tis", [False, True])
def test_an_on_policy_step_reuses_the_updates_logprobs_and_trains_the_same(tiny_qwen25_dir, color_data, tmp_path, tis):
    """One epoch over one mini-batch: without the separate old-logprob pass (the update's own
    log-probabilities, detached, as verl does) the run takes the same steps, with the same TIS
    weights and rollout/train_kl, and ends at the same weights as with the pass (fp32, CPU)."""
    from safetensors.torch import load_file

    runs = {}
    for reuse in (True, False):
        name = f"reuse_{reuse}"
        overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, name, f"actor.reuse_on_policy_logprob={reuse}",
                                   f"actor.importance_sampling_fix={tis}", "rollout.seed=3")
        trainer = GRPOTrainer(load_config(GRPOConfig, None, overrides))
        assert trainer.on_policy(trainer.minibatch_plan(16)) is reuse  # 4 prompts x 4 = one mini-batch
        trainer.fit()
        runs[reuse] = read_metrics(tmp_path / name)
    for with_pass, without in zip(runs[False], runs[True]):
        assert "timing_s/old_log_prob" in with_pass and "timing_s/old_log_prob" not in without
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/ppo_kl", "rollout/train_kl", "critic/score/mean",
                    *(("rollout/is_weight_mean", "rollout/is_clip_frac") if tis else ())):
            assert without[key] == pytest.approx(with_pass[key], rel=1e-4, abs=1e-6), key
    a, b = (load_file(tmp_path / f"reuse_{r}" / "hf" / "model.safetensors") for r in (True, False))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_more_than_one_epoch_or_mini_batch_keeps_the_old_logprob_pass(tiny_qwen25_dir, color_data, tmp_path):
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "two_mb", "actor.mini_batch_size=2")
    trainer = GRPOTrainer(load_config(GRPOConfig, None, overrides))
    assert not trainer.on_policy(trainer.minibatch_plan(16))  # two mini-batches of 2 prompts x 4
    assert trainer.on_policy(trainer.minibatch_plan(8))  # a step that filtering left with one
    trainer.cfg.actor.ppo_epochs = 2
    assert not trainer.on_policy(trainer.minibatch_plan(8))


@pytest.mark.parametrize("setting", [["ref.dtype=auto"], ["ref.dtype=bfloat16"],
                                     ["ref.offload_params=true", "trainer.fsdp.enable=always"]],
                         ids=["auto", "bf16", "offload"])
def test_the_kl_reference_is_the_starting_policy_in_the_dtype_it_computes_in(tiny_qwen25_dir, color_data, tmp_path,
                                                                             setting):
    """GRPO's KL reference holds the starting policy's weights, frozen, in its own dtype (`auto`:
    the compute dtype, fp32 on CPU; bf16 on request: half the memory), optionally offloaded: the
    first update's KL to it is 0 in fp32 and bf16 rounding at most in bf16, and it does not move."""
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "ref", "trainer.total_steps=1",
                               "trainer.save_hf=false", "algorithm.use_kl_loss=true", "algorithm.kl_loss_type=low_var_kl",
                               *setting)
    trainer = GRPOTrainer(load_config(GRPOConfig, None, overrides))
    bf16 = "ref.dtype=bfloat16" in setting
    ref = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in trainer.ref.named_parameters()}
    start = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in trainer.policy.named_parameters()}
    assert ref.keys() == start.keys()
    assert {p.dtype for p in ref.values()} == {torch.bfloat16 if bf16 else torch.float32}
    assert not any(p.requires_grad for p in trainer.ref.parameters())
    for name, value in start.items():
        assert torch.equal(ref[name].to("cpu"), value.to(ref[name].dtype)), name
    trainer.fit()
    kl = read_metrics(tmp_path / "ref")[-1]["actor/kl_loss"]
    assert (0 < kl < 1e-3) if bf16 else kl == pytest.approx(0, abs=1e-7)
    after = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in trainer.ref.named_parameters()}
    assert all(torch.equal(after[n].to("cpu"), ref[n].to("cpu")) for n in ref)
    assert any(not torch.equal(start[n], p.detach().to("cpu")) for n, p in
               ((n, q.full_tensor() if hasattr(q, "full_tensor") else q) for n, q in trainer.policy.named_parameters()))


def test_overlong_completions_lose_reward_over_the_buffer(tiny_qwen25_dir, color_data, tmp_path, capsys):
    """DAPO's overlong reward shaping: nothing up to max_new_tokens - buffer, then linearly down to
    -factor at max_new_tokens; in a real step the batch's score is its accuracy plus the penalty,
    logged as reward/overlong_penalty (a random tiny model runs to the 6-token limit)."""
    from lensrl.config import ConfigError, check
    from lensrl.rewards import overlong_penalty

    assert [overlong_penalty(n, 6, 3, 1.0) for n in range(7)] == pytest.approx([0, 0, 0, 0, -1 / 3, -2 / 3, -1])
    assert overlong_penalty(6, 6, 0, 1.0) == 0.0 and overlong_penalty(6, 6, 2, 0.5) == -0.5
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "overlong", "trainer.total_steps=1",
                               "trainer.save_hf=false", "reward.overlong_buffer_len=3")
    GRPOTrainer(load_config(GRPOConfig, None, overrides)).fit()
    record = read_metrics(tmp_path / "overlong")[-1]
    assert record["reward/overlong_penalty"] < 0
    assert record["critic/score/mean"] == pytest.approx(record["reward/accuracy"] + record["reward/overlong_penalty"])
    with pytest.raises(ConfigError, match="overlong_buffer_len"):
        check(load_config(GRPOConfig, None, overrides[:-1] + ["reward.overlong_buffer_len=7"]), world_size=1)
    with pytest.raises(ConfigError, match="finite"):  # inf: every score -inf, every update skipped
        check(load_config(GRPOConfig, None, overrides + ["reward.overlong_penalty_factor=inf"]), world_size=1)
    assert "overlong_buffer_len=3" not in capsys.readouterr().err  # cut-off completions: what the buffer is for


def test_a_buffer_that_penalises_finished_answers_is_named(tiny_qwen25_dir, color_data, tmp_path, capsys):
    """A buffer reaching into the answers' own length (GPU, 2026-12-01: 5-token answers, 8 new
    tokens, buffer 4) penalises completions that ended on their own: said once, naming the keys."""
    from lensrl.rewards import RewardResult
    from lensrl.rollout.base import Completion

    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "overlong", "rollout.max_new_tokens=8",
                               "reward.overlong_buffer_len=4")
    trainer = GRPOTrainer(load_config(GRPOConfig, None, overrides))
    flat = [(0, Completion(0, [5] * n, [0.0] * n, "stop" if n < 8 else "length")) for n in (5, 5, 5, 8)]
    results = [RewardResult(1.0, {"accuracy": 1.0}, "ok", "")] * 4
    assert [r.score for r in trainer.shape_overlong(results, flat)] == pytest.approx([0.75, 0.75, 0.75, 0.0])
    out = " ".join(capsys.readouterr().err.split())  # the console writes to stderr, wrapped
    assert "overlong_buffer_len=4: 3 of the 3 completions that ended on their own" in out
    assert "starts at token 5" in out and "rollout.max_new_tokens" in out
    trainer.shape_overlong(results, flat)
    assert "overlong_buffer_len" not in capsys.readouterr().err  # once a run


def test_offloading_the_reference_needs_fsdp(tiny_qwen25_dir, color_data, tmp_path):
    from lensrl.config import ConfigError, check

    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "ref", "algorithm.use_kl_loss=true",
                               "ref.offload_params=true")
    with pytest.raises(ConfigError, match="trainer.fsdp.enable=always"):
        check(load_config(GRPOConfig, None, overrides), world_size=1)


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_a_recipe_with_a_reward_of_its_own_logs_its_parts(tiny_qwen25_dir, tmp_path):
    """configs/tiny_box_iou_grpo.yaml: bounding-box IoU on rendered shapes through
    `reward.function` (a file in configs/rewards/), its parts in the metrics and validation."""
    from lensrl.data.synth import make_synth

    make_synth("box", 32, 0, tmp_path / "box", n_test=4)
    result = run_cli("grpo", "--config", "configs/tiny_box_iou_grpo.yaml", f"model.path={tiny_qwen25_dir}",
                     f"data.train_files=[{tmp_path / 'box' / 'train.parquet'}]",
                     f"data.val_files=[{tmp_path / 'box' / 'test.parquet'}]", "rollout.n=4",
                     "rollout.max_new_tokens=8", "trainer.rollout_batch_size=4", "actor.mini_batch_size=4",
                     "trainer.total_steps=2", "trainer.test_freq=2", "trainer.val_before_train=false",
                     "reward.num_workers=1", f"trainer.output_dir={tmp_path}", "trainer.loggers=[jsonl]",
                     "trainer.save_hf=false", "trainer.save_last=false", cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "box_iou")
    assert all({"reward/iou", "reward/format"} <= set(r) for r in records)
    assert {"val/iou", "val/format", "val/reward/mean"} <= set(records[-1])
    sample = json.loads((tmp_path / "box_iou" / "samples" / "train_step_1.jsonl").read_text().splitlines()[0])
    assert {"reward_iou", "reward_format"} <= set(sample)


def test_a_reward_function_that_always_fails_stops_the_run_with_its_traceback(tiny_qwen25_dir, color_data,
                                                                                tmp_path):
    rewards = tmp_path / "broken.py"
    rewards.write_text("def score(completion, sample):\n    return sample['no_such_column'] * 2\n")
    result = run_cli("grpo", *grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "broken",
                                             f"reward.function={rewards}:score"))
    assert result.returncode == 2
    err = result.stderr
    assert "failed on" in err and "row" in err  # the first failure, shown with its row
    assert "error: the reward function failed on every completion of step 1" in err
    assert "KeyError: 'no_such_column'" in err and "in score" in err and "broken.py" in err


def test_the_geometry3k_hub_layout_trains_by_its_id(tiny_qwen25_dir, color_data, tmp_path, monkeypatch):
    """A dataset in the hub's geometry3k layout (images, problem, answer), downloaded into the
    Hugging Face cache: `data.train_files=ID` trains without `lensrl data geo3k`, offline."""
    import pyarrow.parquet as pq

    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hf" / "hub" / "datasets--someone--geometry3k" / "snapshots" / revision / "data"
    snapshot.mkdir(parents=True)
    pq.write_table(pq.read_table(color_data / "train.parquet"), snapshot / "train-00000-of-00001.parquet")
    pq.write_table(pq.read_table(color_data / "test.parquet"), snapshot / "test-00000-of-00001.parquet")
    (snapshot.parents[2] / "refs").mkdir()
    (snapshot.parents[2] / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = [o for o in grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "hub", "trainer.test_freq=2")
                 if not o.startswith(("data.train_files", "data.val_files"))]
    result = run_cli("grpo", *overrides, "data.train_files=someone/geometry3k", "data.val_files=someone/geometry3k")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 64 rows" in result.stderr and "test: 16 rows" in result.stderr
    assert "val/accuracy" in read_metrics(tmp_path / "hub")[-1]


def test_a_run_folder_keeps_its_history(tiny_qwen25_dir, color_data, tmp_path):
    """A resume that cannot continue (another batch size) says so in one line; the config that
    produced the checkpoints is never overwritten, however many resumes follow; a fresh run
    (resume=never) into a folder with checkpoints is refused."""
    base = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "h", "trainer.save_freq=1", "trainer.total_steps=1")
    assert run_cli("grpo", *base).returncode == 0
    run = tmp_path / "h"
    first = (run / "config.yaml").read_text()
    wrong = run_cli("grpo", *base, "trainer.rollout_batch_size=8", "actor.mini_batch_size=8", "trainer.total_steps=2")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1].startswith("error: cannot resume from")
    assert run_cli("grpo", *base, "trainer.total_steps=2").returncode == 0
    kept = sorted(p.name for p in run.glob("config.*.yaml"))
    assert kept == ["config.step_1.yaml"]  # the refused resume recorded nothing
    assert (run / "config.step_1.yaml").read_text() == first  # the run's own record survives
    fresh = run_cli("grpo", *base, "trainer.resume=never")
    assert fresh.returncode == 2 and "holds checkpoints of an earlier run" in fresh.stderr


REWARDS_THAT_MISBEHAVE = '''
def sometimes(completion, sample):
    if len(completion) % 2 == 0:  # a message that looks like console markup must print as it is
        raise ValueError("could not parse [/answer] tag in " + repr(completion[:10]))
    return {"score": 1.0, "odd": 1.0}

def hangs(completion, sample):
    while True:
        pass
'''


def test_a_reward_that_fails_sometimes_or_hangs_always(tiny_qwen25_dir, color_data, tmp_path):
    """Failures that look like markup print verbatim and the run goes on, logging every part any
    completion returned; a function that only ever times out stops the run instead of training
    on nothing; `lensrl eval` counts and shows reward failures too."""
    rewards = tmp_path / "misbehave.py"
    rewards.write_text(REWARDS_THAT_MISBEHAVE)
    result = run_cli("grpo", *grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "some",
                                             f"reward.function={rewards}:sometimes", "trainer.total_steps=1",
                                             "rollout.max_new_tokens=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_metrics(tmp_path / "some")
    assert 0 < record["reward/errors"] < 16 and "reward/odd" in record
    assert "could not parse [/answer] tag" in result.stderr
    hang = run_cli("grpo", *grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "hang", "reward.timeout_s=0.3",
                                           f"reward.function={rewards}:hangs"))
    assert hang.returncode == 2 and "failed on every completion of step 1" in hang.stderr
    assert "reward.timeout_s=0.3" in hang.stderr
    ev = run_cli("eval", "--model", str(tiny_qwen25_dir), "--data", str(color_data), "data.val_size=6",
                 f"reward.function={rewards}:sometimes", "data.max_prompt_length=64", "rollout.max_new_tokens=5",
                 f"output_dir={tmp_path}", "run_name=ev")
    assert ev.returncode == 0, ev.stderr[-2000:]
    metrics = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert metrics["eval/reward/errors"] >= 1 or metrics["eval/reward/mean"] == 1.0


class VisionCountTrainer(GRPOTrainer):
    """Counts the image patches the vision tower computes during each update."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seen = []

    def update(self, seqs, batch, minibatches, width):
        patches = []
        hook = self.policy.model.visual.register_forward_pre_hook(
            lambda module, args, kwargs: patches.append(args[0].shape[0]), with_kwargs=True)
        try:
            return super().update(seqs, batch, minibatches, width)
        finally:
            hook.remove()
            self.seen.append((sum(patches), seqs))


def test_the_update_runs_each_prompts_image_through_the_vision_tower_once(tiny_qwen25_dir, color_data, tmp_path):
    """A GRPO group's n completions share their prompt's image: the packed update plans them into
    one micro-batch and the vision tower computes the image once, not n times (4 prompts x 4)."""
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "shared", "trainer.total_steps=1",
                               "trainer.save_hf=false", "trainer.save_last=false")
    trainer = VisionCountTrainer(load_config(GRPOConfig, None, overrides))
    trainer.fit()
    ((patches, seqs),) = trainer.seen
    distinct = {id(s.pixel_values): s.pixel_values.shape[0] for s in seqs if s.pixel_values is not None}
    every = sum(s.pixel_values.shape[0] for s in seqs if s.pixel_values is not None)
    assert len(seqs) == 16 and len(distinct) == 4
    assert patches == sum(distinct.values()) == every // 4
