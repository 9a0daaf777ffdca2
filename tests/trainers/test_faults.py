"""Faults a cluster produces every day, each with a real process, a real signal, a real file:
damaged and incomplete checkpoints, a full disk, SIGTERM/SIGUSR1, a crash that leaves metrics
behind its checkpoint, changed optimizer settings on resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_helpers import grpo_overrides, run_cli

from lensrl.logging import read_metrics
from lensrl.train.checkpoint import list_checkpoints, verify_checkpoint


def _grpo(tiny_qwen25_dir, color_data, out, name, *extra):
    return grpo_overrides(tiny_qwen25_dir, color_data, out, name, *extra)


@pytest.fixture(scope="module")
def saved_run(tiny_qwen25_dir, color_data, tmp_path_factory):
    """Two GRPO steps with a checkpoint after each: the pristine copy every test damages its own
    copy of."""
    out = tmp_path_factory.mktemp("faults")
    result = run_cli("grpo", *_grpo(tiny_qwen25_dir, color_data, out, "run", "trainer.save_freq=1",
                                    "trainer.save_hf=false"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


def _copy(saved_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    return run


def _resume(tiny_qwen25_dir, color_data, run: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("grpo", *_grpo(tiny_qwen25_dir, color_data, run.parent, run.name, "trainer.total_steps=3",
                                  "trainer.save_freq=1", "trainer.save_hf=false", *extra))


def test_every_checkpoint_file_carries_a_checksum(saved_run):
    ckpt = saved_run / "checkpoints" / "step_2"
    sums = json.loads((ckpt / "checksums.json").read_text())
    on_disk = {f.name for f in ckpt.iterdir()} - {"checksums.json", "meta.json"}
    assert set(sums) == on_disk and any(n.endswith(".distcp") for n in sums)
    assert verify_checkpoint(ckpt) is None


def test_plausible_bytes_in_a_shard_are_caught_and_auto_resume_falls_back(saved_run, tiny_qwen25_dir, color_data,
                                                                           tmp_path):
    """4 KiB of the newest shard replaced with other bytes of the same file (same size, plausible
    values): never loaded; resume=auto says which file and continues from the newest intact one."""
    run = _copy(saved_run, tmp_path)
    shard = next((run / "checkpoints" / "step_2").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = data[1000 : 1000 + 4096]
    shard.write_bytes(bytes(data))
    assert "checksum" in verify_checkpoint(shard.parent)
    result = _resume(tiny_qwen25_dir, color_data, run)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert shard.name in out and "checksum" in out and "falling back" in out and "step_1" in out
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == [1, 2, 3]  # step 2 retrained from step 1, logged once
    # the damaged folder is kept aside, out of the way of save_limit pruning, and never loaded
    assert (run / "checkpoints" / "damaged_step_2").is_dir()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_2", "step_3"]  # save_limit=2


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(saved_run, tiny_qwen25_dir, color_data, tmp_path):
    run = _copy(saved_run, tmp_path)
    extra = run / "checkpoints" / "step_2" / "extra_rank0.pt"
    extra.write_bytes(extra.read_bytes()[:100])  # truncated
    result = _resume(tiny_qwen25_dir, color_data, run, f"trainer.resume={extra.parent}")
    assert result.returncode == 2
    assert "extra_rank0.pt" in result.stderr and "truncated" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_that_lost_its_shards_is_named_and_skipped(saved_run, tiny_qwen25_dir, color_data, tmp_path):
    """What a kill during the old pruning left (meta.json kept, shards gone): a real resume names
    it, sets it aside and continues from the newest intact checkpoint."""
    run = _copy(saved_run, tmp_path)
    for f in (run / "checkpoints" / "step_2").glob("*.distcp"):
        f.unlink()
    result = _resume(tiny_qwen25_dir, color_data, run)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "step_2" in out and "skipped" in out and ".distcp" in out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


@pytest.mark.parametrize("damage", ["no_metadata", "no_meta_json", "no_checksums", "empty_checksums", "bad_entry"])
def test_every_kind_of_incomplete_checkpoint_is_named(saved_run, tmp_path, damage):
    """find_resumable (what resume=auto runs) names what is wrong with the newest folder and
    returns the newest intact one; with checksums.json gone or emptied a flipped byte would load."""
    from lensrl.train.checkpoint import find_resumable

    run = _copy(saved_run, tmp_path)
    newest = run / "checkpoints" / "step_2"
    if damage == "no_metadata":
        (newest / ".metadata").unlink()
    elif damage == "no_meta_json":
        (newest / "meta.json").unlink()
    elif damage == "no_checksums":
        (newest / "checksums.json").unlink()
    elif damage == "empty_checksums":
        (newest / "checksums.json").write_text("{}")
    else:
        sums = json.loads((newest / "checksums.json").read_text())
        sums[next(iter(sums))] = {"sz": 1}
        (newest / "checksums.json").write_text(json.dumps(sums))
    path, passed, notes = find_resumable(run / "checkpoints")
    assert path == run / "checkpoints" / "step_1" and passed == [newest]
    expected = {"no_metadata": ".metadata", "no_meta_json": "never completed", "no_checksums": "checksums.json",
                "empty_checksums": "checksums.json", "bad_entry": "no valid entry"}[damage]
    assert len(notes) == 1 and expected in notes[0] and "step_2" in notes[0]


@pytest.mark.parametrize("name", [".del_step_2", "step_9"])
def test_an_explicit_path_that_is_no_checkpoint_is_refused(saved_run, tiny_qwen25_dir, color_data, tmp_path, name):
    run = _copy(saved_run, tmp_path)
    if name.startswith(".del_"):
        os.replace(run / "checkpoints" / "step_2", run / "checkpoints" / name)
    result = _resume(tiny_qwen25_dir, color_data, run, f"trainer.resume={run / 'checkpoints' / name}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("never loaded" if name.startswith(".del_") else "does not exist") in result.stderr


def test_a_refused_resume_leaves_the_config_record_as_it_was(saved_run, tiny_qwen25_dir, color_data, tmp_path):
    """A resume refused (another rollout batch size than the checkpoint's sampler) exits 2 and
    neither rotates config.yaml into the history nor writes the refused config."""
    run = _copy(saved_run, tmp_path)
    before = (run / "config.yaml").read_text()
    result = _resume(tiny_qwen25_dir, color_data, run, "trainer.rollout_batch_size=8", "actor.mini_batch_size=8")
    assert result.returncode == 2, result.stderr[-3000:]
    assert (run / "config.yaml").read_text() == before
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.yaml"]


def test_a_half_deleted_checkpoint_never_looks_complete(saved_run, tmp_path):
    """Pruning renames a checkpoint out of the step_N pattern before deleting it; a leftover of a
    kill in between is ignored and removed by the next save."""
    run = _copy(saved_run, tmp_path)
    ckpts = run / "checkpoints"
    os.replace(ckpts / "step_1", ckpts / ".del_step_1")
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_2"]


def test_metrics_logged_after_the_checkpoint_are_set_aside_not_logged_twice(saved_run, tiny_qwen25_dir, color_data,
                                                                             tmp_path):
    """A crash after step 3 was logged but before its checkpoint: the resumed run logs step 3
    once; the earlier record is kept aside, and a partial last line (a crash mid-write) is too."""
    run = _copy(saved_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_2")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "actor/loss": 0.5}\n{"step": 4, "actor/lo')  # no newline: cut mid-write
    result = _resume(tiny_qwen25_dir, color_data, run)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    aside = (run / "metrics.after_step_1.jsonl").read_text()
    assert '"step": 2' in aside and '"step": 3, "actor/loss": 0.5' in aside and '"actor/lo' in aside


def test_resume_applies_the_optimizer_settings_given_now(saved_run, tiny_qwen25_dir, color_data, tmp_path):
    """lr, betas, eps and weight decay given at resume are the ones in force, not the checkpoint's."""
    import torch

    run = _copy(saved_run, tmp_path)
    result = _resume(tiny_qwen25_dir, color_data, run, "actor.optim.lr=5e-4", "actor.optim.betas=[0.8,0.9]",
                     "actor.optim.eps=1e-6", "actor.optim.weight_decay=0.05", "trainer.total_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "actor.optim.weight_decay" in result.stdout + result.stderr  # the change is listed
    groups = torch.load(run / "checkpoints" / "step_3" / "extra_rank0.pt", weights_only=True)["trainer"]["optim_groups"]
    for group in groups:
        assert tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-6 and group["weight_decay"] == 0.05
    assert read_metrics(run)[-1]["actor/lr"] == pytest.approx(5e-4, rel=0.5)


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm to mount a small tmpfs")
def test_a_full_disk_says_so_and_corrupts_nothing(saved_run, tiny_qwen25_dir, color_data, tmp_path):
    """The run folder on a tmpfs with room for the run but not for a checkpoint: the save fails
    with a message that names the disk as full and the size needed, the partial folder is gone,
    the earlier checkpoints and metrics.jsonl are intact."""
    run = _copy(saved_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_2")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    ckpt_size = sum(f.stat().st_size for f in (run / "checkpoints" / "step_1").iterdir())
    used = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    size_kb = (used + ckpt_size // 2) // 1024 + 256
    args = _grpo(tiny_qwen25_dir, color_data, mount, "run", "trainer.total_steps=3", "trainer.save_freq=1",
                 "trainer.save_hf=false")
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {mount} && cp -r {run} {mount}/run && "
              f"{sys.executable} -m lensrl grpo {' '.join(args)}; code=$?; "
              f"ls -a {mount}/run/checkpoints; cat {mount}/run/metrics.jsonl; exit $code")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "disk is full" in out and "GiB" in out and "Traceback" not in result.stderr, out[-3000:]
    assert ".tmp_step" not in result.stdout  # the partial checkpoint was removed
    assert "step_1" in result.stdout
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in records] == [1, 2]  # whole lines only


@pytest.mark.parametrize("command, sig", [("grpo", signal.SIGTERM), ("sft", signal.SIGUSR1)])
def test_a_scheduler_signal_saves_a_checkpoint_and_exits_cleanly(tiny_qwen25_dir, color_data, tmp_path, command, sig):
    """SIGTERM (Slurm, Kubernetes) and SIGUSR1 (Slurm's advance warning) end a run like Ctrl-C:
    the step in flight finishes, a checkpoint is saved, the run says so and exits 0, and
    trainer.resume=auto continues from it."""
    if command == "grpo":
        args = _grpo(tiny_qwen25_dir, color_data, tmp_path, "run", "trainer.total_steps=1000", "trainer.save_hf=false")
    else:
        args = [f"model.path={tiny_qwen25_dir}", f"data.train_files=[{color_data / 'train.parquet'}]",
                "data.max_prompt_length=64", "trainer.total_steps=1000", "trainer.global_batch_size=4",
                "trainer.micro_batch_size=4", "trainer.val_before_train=false", "trainer.test_freq=0",
                f"trainer.output_dir={tmp_path}", "trainer.run_name=run", "trainer.loggers=[jsonl]",
                "trainer.save_hf=false"]
    process = subprocess.Popen([sys.executable, "-m", "lensrl", command, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").is_file() or \
                not read_metrics(tmp_path / "run"):
            assert process.poll() is None, process.stdout.read()[-3000:]
            time.sleep(0.2)
        process.send_signal(sig)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved and "checkpoint saved" in output
    step = json.loads((saved[-1] / "meta.json").read_text())["step"]
    assert step == read_metrics(tmp_path / "run")[-1]["step"]  # nothing trained is lost
