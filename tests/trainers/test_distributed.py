"""Several ranks on the CPU: torchrun, gloo, FSDP2 (fp32), real subprocesses.

Same numbers, any layout: a GRPO or SFT step at 2 ranks equals the step at 1 rank on the same
global batch, and a checkpoint written at one rank count resumes at the other into the step an
uninterrupted run takes. A rank that dies takes the job down within a bounded time.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from lensrl.logging import read_metrics

HERE = Path(__file__).resolve().parent
LENSRL = ["-m", "lensrl"]  # the command users run, under torchrun or alone
# a reward a random tiny model earns in varying amounts: every step has a learning signal
LETTER_SHARE = HERE.parents[1] / "configs" / "rewards" / "letter_share.py"
COMPARED = ("actor/loss", "actor/pg_loss", "actor/entropy", "actor/grad_norm", "critic/score/mean",
            "response_length/mean", "train/loss", "train/grad_norm", "train/target_tokens")


def launch(nproc: int, command: str, overrides: list[str], timeout: float = 300,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One process (plain python, no FSDP) or `torchrun --standalone` with `nproc` ranks; `env`:
    more environment variables."""
    if nproc == 1:
        cmd = [sys.executable, *LENSRL, command, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *LENSRL, command, *overrides]
    # PYTHONFAULTHANDLER: a rank that aborts (the rare "terminate called without an active exception"
    # of a 2-rank gloo run in the full suite, sessions 5-9) dumps every thread's Python stack
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-12000:] + _rank_notes(overrides)
    return result


def _rank_notes(overrides: list[str]) -> str:
    """Each rank's last phase (lensrl.train.heartbeat's notes in the run folder), for a failure message."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    folder = Path(given.get("trainer.output_dir", "runs")) / given.get("trainer.run_name", "run") / ".ranks"
    notes = [p.read_text() for p in sorted(folder.glob("rank_*.json"))] if folder.is_dir() else []
    return "\nrank notes: " + (" ".join(notes) or f"none under {folder}")


def grpo_args(model_dir: Path, data: Path, out: Path, name: str, *extra: str) -> list[str]:
    # rollout.seed: every draw is keyed by the prompt's global position, so every layout samples
    # the same completions.
    return [
        f"model.path={model_dir}", f"data.train_files=[{data / 'train.parquet'}]", "data.max_prompt_length=64",
        "rollout.backend=hf", "rollout.n=4", "rollout.max_new_tokens=6", "rollout.batch_size=4", "rollout.seed=7",
        "trainer.rollout_batch_size=4", "actor.mini_batch_size=2", "actor.max_tokens_per_mbs=160",
        "actor.optim.lr=1e-3", "reward.num_workers=1", f"reward.function={LETTER_SHARE}:letter_share",
        "trainer.total_steps=3", "trainer.test_freq=0",
        "trainer.val_before_train=false", "trainer.save_freq=1", "trainer.save_limit=3",
        f"trainer.output_dir={out}", f"trainer.run_name={name}", "trainer.loggers=[jsonl]", *extra,
    ]


def assert_same_steps(a: list[dict], b: list[dict], rel: float = 1e-4, abs_: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = [k for k in COMPARED if k in ra]
        assert keys, f"no compared metric in {sorted(ra)}"
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=abs_), (ra["step"], k, ra[k], rb[k])


def assert_same_weights(dir_a: Path, dir_b: Path, atol: float = 5e-5) -> None:
    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


@pytest.fixture(scope="module")
def grpo_runs(tiny_qwen25_dir, color_data, tmp_path_factory):
    """3 GRPO steps at 1 rank and at 2 ranks (FSDP2), checkpoints after every step."""
    out = tmp_path_factory.mktemp("dist_grpo")
    launch(1, "grpo", grpo_args(tiny_qwen25_dir, color_data, out, "one"))
    two = launch(2, "grpo", grpo_args(tiny_qwen25_dir, color_data, out, "two"))
    return out, two


def test_grpo_two_ranks_equal_one_rank(grpo_runs):
    out, _ = grpo_runs
    one, two = read_metrics(out / "one"), read_metrics(out / "two")
    assert len(one) == 3 and one[0]["actor/grad_norm"] > 0  # a real learning signal
    assert_same_steps(one, two)
    assert_same_weights(out / "one" / "hf", out / "two" / "hf")
    meta = json.loads((out / "two" / "checkpoints" / "step_3" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert len(list((out / "two" / "checkpoints" / "step_3").glob("*.distcp"))) == 2  # one shard file per rank


def test_fsdp_on_one_rank_with_compiled_blocks_equals_the_plain_model(grpo_runs, tiny_qwen25_dir, color_data):
    """`trainer.fsdp.enable=always` in one process: the same code path as N ranks (a one-rank
    process group, the rollout model aliasing the policy's storage), here with `model.compile`
    and activation checkpointing on (FSDP's hooks outside the compiled blocks, the checkpoint
    around them): the same numbers as the plain eager model. (2 ranks vs 1 is tested eager.)"""
    out, _ = grpo_runs
    launch(1, "grpo", grpo_args(tiny_qwen25_dir, color_data, out, "fsdp_one", "trainer.fsdp.enable=always",
                                "model.compile=always", "model.gradient_checkpointing=true",
                                "trainer.save_freq=0", "trainer.save_last=false"))
    assert_same_steps(read_metrics(out / "one"), read_metrics(out / "fsdp_one"))
    assert_same_weights(out / "one" / "hf", out / "fsdp_one" / "hf")
    assert not (out / "fsdp_one" / "checkpoints").exists()  # save_last=false, save_freq=0


def test_gradients_reduced_once_per_step_train_what_per_micro_batch_trains(grpo_runs, tiny_qwen25_dir, color_data):
    """`trainer.fsdp.reduce_grads=per_step` with `reshard_after_forward=false`: at 2 ranks each
    unit is gathered and its gradients reduced once per optimizer step (2 micro-batches per rank
    per mini-batch here), and the run equals the 1-rank run that reduces nothing."""
    out, _ = grpo_runs
    launch(2, "grpo", grpo_args(tiny_qwen25_dir, color_data, out, "per_step", "trainer.fsdp.reduce_grads=per_step",
                                "trainer.fsdp.reshard_after_forward=false", "trainer.save_freq=0"))
    assert_same_steps(read_metrics(out / "one"), read_metrics(out / "per_step"))
    assert_same_weights(out / "one" / "hf", out / "per_step" / "hf")


@pytest.mark.parametrize("saved, resumed", [("two", 1), ("one", 2)])
def test_resume_at_another_rank_count_continues_the_run(grpo_runs, tiny_qwen25_dir, color_data, saved, resumed):
    out, _ = grpo_runs
    name = f"resume_{saved}_at_{resumed}"
    ckpt = out / saved / "checkpoints" / "step_2"
    launch(resumed, "grpo", grpo_args(tiny_qwen25_dir, color_data, out, name, f"trainer.resume={ckpt}"))
    resumed_steps = read_metrics(out / name)
    assert [r["step"] for r in resumed_steps] == [3]
    assert_same_steps(read_metrics(out / saved)[2:], resumed_steps)
    assert_same_weights(out / saved / "hf", out / name / "hf")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_saved_at_two_gpus_resumes_on_one_visible_gpu(tiny_qwen25_dir, color_data, tmp_path):
    """Each rank of a 2-GPU run sees both GPUs; resumed where only one is visible
    (CUDA_VISIBLE_DEVICES=0), the checkpoint's random state still loads (it once held every
    visible device's state, and restoring it failed with IndexError) and the run continues."""
    args = grpo_args(tiny_qwen25_dir, color_data, tmp_path, "two", "trainer.device=cuda")
    launch(2, "grpo", args)
    ckpt = tmp_path / "two" / "checkpoints" / "step_2"
    resumed = grpo_args(tiny_qwen25_dir, color_data, tmp_path, "one_gpu", "trainer.device=cuda", f"trainer.resume={ckpt}")
    launch(1, "grpo", resumed, env={"CUDA_VISIBLE_DEVICES": "0"})
    resumed_steps = read_metrics(tmp_path / "one_gpu")
    assert [r["step"] for r in resumed_steps] == [3]  # bf16 compute: 1 vs 2 ranks round differently
    assert all(math.isfinite(resumed_steps[0][k]) for k in ("actor/loss", "actor/grad_norm", "critic/score/mean"))
    assert (tmp_path / "one_gpu" / "hf" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def mixed_sft_data(color_data, tmp_path_factory) -> Path:
    """The colour task with every third row text-only and some prompts much longer: micro-batches
    without images (the FSDP image anchor) and ranks with uneven token counts."""
    rows = pq.read_table(color_data / "train.parquet").to_pylist()[:24]
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["images"] = []
            row["problem"] = row["problem"].replace("<image>", "") + " Name a colour."
        if i % 4 == 1:
            row["problem"] += " Look carefully at the picture before you answer." * 3
    out = tmp_path_factory.mktemp("mixed_sft")
    pq.write_table(pa.Table.from_pylist(rows), out / "train.parquet")
    return out


@pytest.mark.parametrize("packed, frozen_vision, reduce_grads", [(True, False, "per_micro_batch"),
                                                                 (False, True, "per_micro_batch"),
                                                                 (True, False, "per_step")])
def test_sft_two_ranks_equal_one_rank(tiny_qwen25_dir, mixed_sft_data, tmp_path, packed, frozen_vision, reduce_grads):
    args = [f"model.freeze_vision_tower={str(frozen_vision).lower()}", f"model.path={tiny_qwen25_dir}",
            f"data.train_files=[{mixed_sft_data / 'train.parquet'}]", f"trainer.fsdp.reduce_grads={reduce_grads}",
            f"trainer.fsdp.reshard_after_forward={str(reduce_grads == 'per_micro_batch').lower()}",
            "data.max_prompt_length=160", "trainer.total_steps=2", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=2", f"trainer.use_dynamic_bsz={str(packed).lower()}",
            "trainer.max_tokens_per_mbs=120", "optim.lr=1e-3", "optim.warmup_ratio=0", "trainer.val_before_train=false",
            "trainer.test_freq=0", f"trainer.output_dir={tmp_path}", "trainer.loggers=[jsonl]"]
    launch(1, "sft", [*args, "trainer.run_name=one"])
    launch(2, "sft", [*args, "trainer.run_name=two"])
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == 2
    assert_same_steps(one, two)
    assert_same_weights(tmp_path / "one" / "hf", tmp_path / "two" / "hf")
    if frozen_vision:  # the vision tower stayed exactly as it started, on both layouts
        start = load_file(tiny_qwen25_dir / "model.safetensors")
        trained = load_file(tmp_path / "two" / "hf" / "model.safetensors")
        vision = [k for k in trained if k.startswith("visual.") or ".visual." in k]
        assert vision and all(torch.equal(start[k], trained[k]) for k in vision)


def _worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers below `parent` (read from /proc); a rank's own children
    (its reward workers inherit RANK) are not ranks."""
    candidates: dict[int, tuple[int, int]] = {}  # pid -> (rank, parent pid)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if env.get(b"TORCHELASTIC_RUN_ID") and b"RANK" in env and b"LOCAL_RANK" in env:
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if ppid == parent or _is_descendant(ppid, parent):
                candidates[int(proc.name)] = (int(env[b"RANK"]), ppid)
    return {rank: pid for pid, (rank, ppid) in candidates.items() if ppid not in candidates}


def _is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return False


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 GPUs")])]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("device", DEVICES)
def test_a_rank_that_dies_stops_the_job_and_the_run_resumes_from_its_last_checkpoint(
        tiny_qwen25_dir, color_data, tmp_path, device):
    """kill -9 of rank 1 in the middle of a run: the job ends within seconds with the rank named,
    the newest checkpoint is complete, and `trainer.resume=auto` continues the run from it."""
    args = grpo_args(tiny_qwen25_dir, color_data, tmp_path, "dies", "trainer.total_steps=1000",
                     "trainer.save_freq=1", "trainer.save_limit=2", "trainer.dist_timeout_s=30",
                     f"trainer.device={device}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *LENSRL, "grpo",
           *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        ckpts = tmp_path / "dies" / "checkpoints"
        deadline = time.time() + 240
        while time.time() < deadline and not (ckpts / "step_2").is_dir():
            assert process.poll() is None, process.stdout.read()[-3000:]
            time.sleep(0.1)
        assert (ckpts / "step_2").is_dir(), "the run never wrote its second checkpoint"
        time.sleep(0.3)  # into a later step
        workers = _worker_pids(process.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.time()
        output, _ = process.communicate(timeout=120)
        elapsed = time.time() - killed_at
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop after a rank died"
    assert "rank      : 1" in output and "SIGKILL" in output, output[-3000:]
    for pid in workers.values():  # no orphaned rank left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    from lensrl.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(ckpts)
    step = json.loads((last / "meta.json").read_text())["step"]
    assert step >= 2  # the newest complete one (a half-written .tmp_step_N is never "latest")
    done = [r["step"] for r in read_metrics(tmp_path / "dies")]
    resume_args = [a for a in args if not a.startswith("trainer.total_steps=")] + [
        f"trainer.total_steps={step + 1}", "trainer.resume=auto"]
    result = subprocess.run([*cmd[:5], *LENSRL, "grpo", *resume_args], capture_output=True, text=True,
                            timeout=240, env=_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    steps = [r["step"] for r in read_metrics(tmp_path / "dies")]
    # steps logged after the checkpoint by the killed run were set aside, then trained again once
    assert steps == list(range(1, step + 2)) and len(done) >= step


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("target", ["torchrun", "rank 1 only"])
def test_sigterm_under_torchrun_saves_on_every_rank(tiny_qwen25_dir, color_data, tmp_path, target):
    """SIGTERM to one rank only, during checkpoint saves (a signal that reaches some ranks), or to
    torchrun itself (what a container runtime does to its first process; torchrun forwards it):
    the ranks finish the same step, save one complete checkpoint of it and exit 0; signalled
    ranks make the job exit 0 (torchrun signalled itself exits 1, its own rule)."""
    save_freq = 1 if target == "rank 1 only" else 0  # signals that land during a save too
    args = grpo_args(tiny_qwen25_dir, color_data, tmp_path, "run", "trainer.total_steps=1000",
                     f"trainer.save_freq={save_freq}", "trainer.save_hf=false", "trainer.device=cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *LENSRL, "grpo", *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            assert process.poll() is None, process.stdout.read()[-3000:]
            time.sleep(0.1)
        if target == "torchrun":
            process.send_signal(signal.SIGTERM)
        else:  # one rank (the other must stop after the same step, not wait or crash)
            for rank, pid in _worker_pids(process.pid).items():
                if rank == 1:
                    os.kill(pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=60)  # torchrun gives its ranks 30 s before SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    from lensrl.train.checkpoint import latest_checkpoint, verify_checkpoint

    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last is not None and verify_checkpoint(last) is None, output[-3000:]
    assert json.loads((last / "meta.json").read_text())["step"] == read_metrics(tmp_path / "run")[-1]["step"]
    assert "checkpoint saved" in output
    if target != "torchrun":
        assert process.returncode == 0, output[-3000:]


def _kill_matching(text: str) -> None:
    """SIGKILL every process whose command line contains `text` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def test_a_hung_rank_is_named_not_the_rank_that_waited(tiny_qwen25_dir, color_data, tmp_path):
    """Rank 1 hangs in its reward function at step 1; rank 0 waits at the next collective until
    trainer.dist_timeout_s, then the job fails with a message naming rank 1 and where it stopped."""
    reward = tmp_path / "hang.py"
    reward.write_text("import os, time\n"
                      "def hang(completion, sample):\n"
                      "    if os.environ.get('RANK') == '1' and os.path.exists(os.environ['HANG_FLAG']):\n"
                      "        time.sleep(3600)\n"
                      "    return {'score': len(completion) % 3 / 2}\n")
    flag = tmp_path / "hang_now"
    flag.touch()
    args = grpo_args(tiny_qwen25_dir, color_data, tmp_path, "run", "trainer.total_steps=50", "trainer.save_freq=0",
                     "trainer.save_hf=false", "trainer.device=cpu", "trainer.dist_timeout_s=15", "reward.num_workers=0",
                     "reward.timeout_s=3600", f"reward.function={reward}:hang")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *LENSRL, "grpo", *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_env(HANG_FLAG=str(flag)), start_new_session=True)
    lines = []
    try:  # read until the diagnosis; torchrun would then wait 30 s before it SIGKILLs the hung rank
        deadline = time.time() + 240
        for line in process.stdout:
            lines.append(line)
            if "hung" in line or time.time() > deadline:
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _kill_matching(str(tmp_path))  # torchrun's ranks live in sessions of their own: the hung one outlived it
    output = "".join(lines)
    assert "rank 1 (host" in output and "hung" in output and "'reward'" in output, \
        output[-4000:]


@pytest.mark.parametrize("device", DEVICES)
def test_two_nodes_train_what_one_node_trains(grpo_runs, tiny_qwen25_dir, color_data, tmp_path, device):
    """The README's multi-node launch, two torchrun agents with a c10d rendezvous (here both on
    this machine, one rank each, every agent running the same command): the same steps and weights
    as one node with two ranks. On CUDA each agent sees its own GPU, and both runs compute in fp32:
    under bf16 the two layouts' collectives sum in another order (NVLink within one process group,
    another transport between agents), and the rounding flips sampled tokens from step 2 on."""
    out, _ = grpo_runs
    fp32 = ["model.dtype=float32", "trainer.fsdp.param_dtype=float32"] if device == "cuda" else []
    args = grpo_args(tiny_qwen25_dir, color_data, tmp_path, "nodes", f"trainer.device={device}", *fp32)
    if device == "cuda":  # the one-node reference on the same device
        launch(2, "grpo", grpo_args(tiny_qwen25_dir, color_data, tmp_path, "node", f"trainer.device={device}", *fp32))
        reference = tmp_path / "node"
    else:
        reference = out / "two"
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lensrl_nodes",
               *LENSRL, "grpo", *args]
        env = _env(**({"CUDA_VISIBLE_DEVICES": str(node)} if device == "cuda" else {}))
        agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-4000:]
    nodes = read_metrics(tmp_path / "nodes")
    assert len(nodes) == 3 and nodes[0]["actor/grad_norm"] > 0
    assert_same_steps(read_metrics(reference), nodes)
    assert_same_weights(reference / "hf", tmp_path / "nodes" / "hf")


def test_checkpoint_written_at_two_ranks_is_complete_and_atomic(grpo_runs):
    out, _ = grpo_runs
    ckpts = sorted(p.name for p in (out / "two" / "checkpoints").iterdir())
    assert ckpts == ["step_1", "step_2", "step_3"]  # save_limit=3, no .tmp_ left behind
    for step in ckpts:
        extra = torch.load(out / "two" / "checkpoints" / step / "extra_rank1.pt", weights_only=True)
        assert extra["trainer"]["step"] == int(step.split("_")[1])



def test_two_ranks_without_fsdp_are_refused_before_anything_loads(tiny_qwen25_dir, color_data, tmp_path):
    """Without FSDP nothing would average the ranks' gradients: each rank would train its own model.
    `torchrun ... lensrl grpo trainer.fsdp.enable=never` stops with one error line per rank."""
    args = grpo_args(tiny_qwen25_dir, color_data, tmp_path, "ddp", "trainer.fsdp.enable=never")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lensrl",
           "grpo", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode != 0
    assert "error: trainer.fsdp.enable=never with 2 ranks" in result.stderr
    assert "Loading weights" not in result.stderr and not (tmp_path / "ddp").exists()
