"""The run-folder lock, with real holder processes: refused while held, free after a kill or exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lensrl.config import ConfigError
from lensrl.train import runlock
from lensrl.train.runlock import LOCK_NAME, RunLockError, acquire_run_lock, read_lock_holder, release_run_lock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="holder checks read /proc")

ROOT = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from lensrl.train.runlock import acquire_run_lock

    lock = acquire_run_lock(sys.argv[1])
    if sys.argv[2] == "fork":  # leave a child behind that outlives this process
        if os.fork() == 0:  # os.fork returns here once the at-fork handlers have run
            print("child", os.getpid(), flush=True)
            time.sleep(60)
            os._exit(0)
    print("locked", flush=True)
    if sys.argv[2] in ("hold", "fork"):
        time.sleep(60)
    """
)


def _start(run_dir: Path, mode: str = "hold") -> tuple[subprocess.Popen, list[str]]:
    """A process that takes the lock on `run_dir` (mode hold: and keeps it; exit: and exits; fork:
    and leaves a child behind); returns it once it holds the lock, with the lines it printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    while "locked" not in lines or (mode == "fork" and not any(line.startswith("child") for line in lines)):
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise AssertionError(f"the holder did not lock (exit {proc.returncode}): {proc.stderr.read()}")
        lines.append(line.strip())
    return proc, lines


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "gone"


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "runs" / "exp"
    yield path
    release_run_lock(path)


def test_second_run_is_refused_until_the_holder_is_killed(run_dir, caplog):
    holder, _ = _start(run_dir)
    try:
        with pytest.raises(RunLockError) as e:
            acquire_run_lock(run_dir)
        message = str(e.value)
        assert isinstance(e.value, ConfigError)  # `lensrl` prints it and exits 2
        assert f"run folder {run_dir} is in use by another run" in message
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "since 20" in message and "ago)" in message
        assert "command: " in message and "acquire_run_lock" in message  # the holder's command line
        assert "another trainer.run_name" in message and "wait for that run to end" in message
        assert "remove the lock file" not in message  # it is alive, on this host

        holder.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _state(holder.pid) != "Z" and time.monotonic() < deadline:  # dead, not yet reaped
            time.sleep(0.01)
        lock = acquire_run_lock(run_dir)  # the kernel dropped its flock: stale, taken over
    finally:
        holder.kill()
        holder.wait()
    assert lock.held and lock.took_over["pid"] == holder.pid
    assert f"taking over the lock of a run that is gone (pid {holder.pid} on host" in caplog.text
    assert read_lock_holder(run_dir)["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()


def test_released_on_normal_exit(run_dir):
    holder, _ = _start(run_dir, "exit")  # never calls release(): the interpreter's exit does
    assert holder.wait(30) == 0
    assert not (run_dir / LOCK_NAME).exists()
    with acquire_run_lock(run_dir) as lock:
        assert lock.held and lock.took_over is None
        assert (run_dir / LOCK_NAME).exists()
    assert not lock.held and not (run_dir / LOCK_NAME).exists()


def test_lock_file_names_the_holder(run_dir):
    lock = acquire_run_lock(run_dir)
    holder = json.loads((run_dir / LOCK_NAME).read_text())
    assert holder == lock.holder == read_lock_holder(run_dir)
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert time.strptime(holder["since"], "%Y-%m-%d %H:%M:%S %z")
    assert abs(holder["since_unix"] - time.time()) < 60
    assert "pytest" in holder["command"] or "py.test" in holder["command"] or sys.executable in holder["command"]
    assert holder["run_dir"] == str(run_dir.resolve()) and holder["cwd"] == os.getcwd()
    assert isinstance(holder["pid_start"], int) and holder["boot_id"]
    assert acquire_run_lock(run_dir) is lock  # this process holds it already
    lock.release()
    lock.release()  # idempotent
    assert read_lock_holder(run_dir) is None


def test_only_rank_0_locks(run_dir, monkeypatch):
    lock = acquire_run_lock(run_dir, rank=1)
    assert not lock.held and not (run_dir / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "3")  # torchrun's, before the process group exists
    assert not acquire_run_lock(run_dir).held
    monkeypatch.setenv("RANK", "0")
    assert acquire_run_lock(run_dir).held


def test_a_child_left_behind_does_not_keep_the_lock(run_dir):
    holder, lines = _start(run_dir, "fork")
    child = int(next(line for line in lines if line.startswith("child")).split()[1])
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert _state(child) not in ("gone", "Z")  # still running, with a copy of the holder's files
        lock = acquire_run_lock(run_dir)
        assert lock.took_over["pid"] == holder.pid
    finally:
        os.kill(child, signal.SIGKILL)


def test_racing_runs_one_wins(tmp_path):
    run_dir = tmp_path / "exp"
    script = textwrap.dedent(
        """
        import sys, time
        from lensrl.train.runlock import RunLockError, acquire_run_lock
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together
        try:
            acquire_run_lock(sys.argv[1])
        except RunLockError:
            print("refused", flush=True)
        else:
            print("locked", flush=True)
            time.sleep(1)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0"}
    start = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(run_dir), start], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    outputs = sorted(p.communicate(timeout=30)[0].strip() for p in procs)
    assert outputs == ["locked", "refused", "refused", "refused"]


# ----------------------------------------------------------------------------------------------
# Lock files whose holder flock cannot vouch for: another host, or a filesystem without flock
# ----------------------------------------------------------------------------------------------


def _write_lock(run_dir: Path, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"since": "2025-01-01 00:00:00 +0000", "since_unix": 0.0,
                                                 "command": "lensrl grpo --config a.yaml", **holder}))


def test_holder_on_another_host_is_refused_with_what_to_do(run_dir):
    _write_lock(run_dir, host="gpu-node-7", pid=4242, user="alice", boot_id="another-machine")
    with pytest.raises(RunLockError) as e:
        acquire_run_lock(run_dir)
    message = str(e.value)
    assert "pid 4242 on host gpu-node-7 (user alice), since 2025-01-01 00:00:00 +0000" in message
    assert "command: lensrl grpo --config a.yaml" in message
    assert f"If that run is gone (its host crashed or was shut down), remove the lock file {run_dir / LOCK_NAME}" in message
    (run_dir / LOCK_NAME).unlink()  # as the message says
    assert acquire_run_lock(run_dir).held


def test_holder_in_another_container_of_this_machine_is_stale(run_dir):
    # Another host name but this kernel (same boot id): alive, it would hold the flock.
    _write_lock(run_dir, host="container-before-restart", pid=1, boot_id=runlock._boot_id())
    lock = acquire_run_lock(run_dir)
    assert lock.held and lock.took_over["host"] == "container-before-restart"


def test_stale_holders_on_this_host(run_dir):
    me = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(run_dir, host=me, pid=dead.pid, boot_id=runlock._boot_id())  # a pid that has ended
    acquire_run_lock(run_dir).release()
    _write_lock(run_dir, host=me, pid=os.getppid(), pid_start=1, boot_id=runlock._boot_id())  # pid reused
    acquire_run_lock(run_dir).release()
    _write_lock(run_dir, host=me, pid=os.getppid(), boot_id="before-a-reboot")
    acquire_run_lock(run_dir).release()
    (run_dir / LOCK_NAME).write_text("")  # its maker died before writing itself in
    acquire_run_lock(run_dir).release()


def test_without_flock_pid_and_host_decide(run_dir, monkeypatch):
    holder, _ = _start(run_dir)  # holds the flock, which this process now cannot see
    monkeypatch.setattr(runlock, "_flock", lambda fd: None)
    try:
        with pytest.raises(RunLockError, match=f"pid {holder.pid} on host"):
            acquire_run_lock(run_dir)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        lock = acquire_run_lock(run_dir)  # its pid has ended: a fresh lock file, made with O_EXCL
    finally:
        holder.kill()
        holder.wait()
    assert lock.held and lock.took_over["pid"] == holder.pid and read_lock_holder(run_dir)["pid"] == os.getpid()
    with pytest.raises(RunLockError, match=f"pid {os.getpid()} on host"):  # and it holds against others
        runlock._acquire(run_dir, run_dir / LOCK_NAME)
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()


def test_refusal_when_the_holder_left_a_child_holding_the_lock(run_dir, monkeypatch):
    # flock held, yet the holder named in the file has ended: a child of it keeps the file open.
    holder, _ = _start(run_dir)
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        info = json.loads((run_dir / LOCK_NAME).read_text())
        (run_dir / LOCK_NAME).write_text(json.dumps({**info, "pid": dead.pid, "pid_start": None}))
        with pytest.raises(RunLockError, match=r"That process has ended, but a process it started still holds "
                                               r"the lock file .* open \(find it with `fuser -v"):
            acquire_run_lock(run_dir)
    finally:
        holder.kill()
        holder.wait()


def test_cli_exits_2_naming_the_holder(run_dir, monkeypatch, capsys):
    import lensrl.cli

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # main() sets it: restored after
    holder, _ = _start(run_dir)
    try:
        monkeypatch.setattr(lensrl.cli, "_dispatch", lambda args: acquire_run_lock(run_dir))
        with pytest.raises(SystemExit) as e:
            lensrl.cli.main(["grpo"])
    finally:
        holder.kill()
        holder.wait()
    assert e.value.code == 2
    assert f"error: run folder {run_dir} is in use by another run: pid {holder.pid}" in capsys.readouterr().err
