"""One run folder, one run: a lock file that a second run on the same folder is refused by.

    lock = acquire_run_lock(run_dir)   # RunLockError (a ConfigError: `lensrl` exits 2) if in use
    ...
    lock.release()                     # or: with acquire_run_lock(run_dir): ...; or at exit

Two runs with the same `output_dir`/`run_name` would share checkpoints and `metrics.jsonl`: one
would crash at its first checkpoint, or resume the other's and both write into one record. The
main rank (rank 0) takes `run_dir/.lock`; other ranks of a torchrun job take nothing.

How it holds:
- The file is locked with `flock`, which the kernel releases when the process ends, however it
  ends (a crash, SIGKILL): a folder whose holder died is free again at once.
- The file names its holder as JSON (host, pid, user, start time, command line, the pid's start
  time and the boot id), so a refusal names who holds the folder, and so that, where `flock`
  does not lock (some network filesystems, FUSE), a lock whose holder is gone is still told
  apart: a holder on this host whose process no longer runs (or runs as another process under a
  reused pid, or before a reboot) is stale and is taken over with a warning.
- A holder in another container of this machine (another host name, the same boot id) that does
  not hold the flock is gone. A holder on another host cannot be checked from here; it is
  refused, and the message says to remove the lock file if that run is gone.
- A normal exit removes the file (`release()`, or at interpreter exit). After a crash the file
  stays, unlocked, and the next run takes it over.

Child processes forked by the holder (reward workers, data loaders) do not keep the lock: their
copy of the file descriptor is closed after the fork.

Within one process a second acquire of a folder it holds returns the same lock (a resumed trainer
made twice in one process, as the tests do); `release()` once frees it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import getpass
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lensrl.config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; the holder's pid and host alone decide
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_MAX_HOLDER_BYTES = 1 << 16
_ATTEMPTS = 20  # tries when the file is removed or replaced between our open and our lock
_SETTLE_S = 1.0  # how long a lock file with no holder written yet may take to get one


class RunLockError(ConfigError):
    """The run folder is in use by another run (or its lock cannot be taken); the message names
    the folder, the holder and what to do. A ConfigError, so `lensrl` prints it and exits 2."""


class RunLock:
    """The lock on one run folder (`held` False on ranks other than 0: they hold nothing).

    `holder` is what this lock file says of its holder (this process when held); `took_over`
    the stale holder it replaced, if any. Release with `release()` or by leaving a `with` block;
    a lock still held at interpreter exit is released then."""

    def __init__(self, run_dir: Path, path: Path, fd: int | None, holder: dict[str, Any] | None,
                 took_over: dict[str, Any] | None = None):
        self.run_dir = run_dir
        self.path = path
        self.holder = holder
        self.took_over = took_over
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether this process holds the folder through this lock."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and unlock it; the folder is free for another run. Idempotent."""
        with _registry_lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            if _held.get(_key(self.run_dir)) is self:
                del _held[_key(self.run_dir)]
            try:
                if _same_file(fd, self.path):  # never remove a file some other run made meanwhile
                    self.path.unlink()  # before unlocking: a run waiting on this file then sees it gone
            except OSError:
                pass
            finally:
                os.close(fd)  # the flock goes with the last descriptor

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held})"


def acquire_run_lock(run_dir: str | os.PathLike, *, rank: int | None = None) -> RunLock:
    """Lock `run_dir` (created if missing) for this run, or raise RunLockError naming its holder.

    `rank`: this process's rank in the job; only rank 0 locks (others get a RunLock that holds
    nothing). None: torch.distributed's rank when initialised, else $RANK (torchrun sets it), else
    0. A lock left by a holder that is gone (on this host, or in another container of this
    machine) is taken over, logged as a warning and kept in `RunLock.took_over`; one held by a
    holder on another host is refused. The lock lasts until `release()` or the end of the process
    (a `with` block releases it at its end)."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    if (_rank() if rank is None else rank) != 0:
        return RunLock(run_dir, path, None, None)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _registry_lock:
        existing = _held.get(_key(run_dir))
        if existing is not None and existing.held:
            return existing  # this process holds it already
        lock = _acquire(run_dir, path)
        _held[_key(run_dir)] = lock
        return lock


def release_run_lock(run_dir: str | os.PathLike) -> None:
    """Release this process's lock on `run_dir`, if it holds one (on other ranks: nothing to do)."""
    with _registry_lock:
        lock = _held.get(_key(Path(run_dir)))
    if lock is not None:
        lock.release()


def read_lock_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What `run_dir`'s lock file says of its holder (None: no lock file, or none written yet).
    The file may be left over from a crash: this does not say whether the holder still runs."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Taking the lock
# ----------------------------------------------------------------------------------------------


def _acquire(run_dir: Path, path: Path) -> RunLock:
    stale: list[dict[str, Any]] = []  # holders found gone, for RunLock.took_over
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # released between the two opens: try again
                continue
            created = False
        except OSError as e:
            raise RunLockError(f"cannot create the lock file {path} of run folder {run_dir}: {e}") from e
        try:
            lock = _try_fd(run_dir, path, fd, created, stale)
        except BaseException:
            os.close(fd)
            raise
        if lock is not None:
            if lock.took_over is None and stale:
                lock.took_over = stale[-1]
            return lock
        os.close(fd)  # the file was removed or replaced meanwhile: take the one now there
    raise RunLockError(f"could not lock {path}: the lock file kept changing under this run "
                       f"({_ATTEMPTS} tries); another run is starting or stopping in {run_dir}")


def _try_fd(run_dir: Path, path: Path, fd: int, created: bool, stale: list[dict[str, Any]]) -> RunLock | None:
    """Lock the open file `fd`: a RunLock, None to try again, or RunLockError. A holder found
    gone is appended to `stale`."""
    locked = _flock(fd)  # True: ours; False: another process holds it; None: flock does not work here
    if locked is False:
        holder = _settled_holder(fd)
        raise RunLockError(_refusal(run_dir, path, holder, flock_held=True))
    if not _same_file(fd, path):
        return None
    me = _me(run_dir)
    if created:
        _write_holder(fd, me)
        return RunLock(run_dir, path, fd, me)

    # The file was there before us, and no process holds its flock (or flock does not work here).
    holder = _read_holder(fd) if locked else _settled_holder(fd)
    if _holder_state(holder, flock_free=bool(locked)) != "dead":
        raise RunLockError(_refusal(run_dir, path, holder, flock_held=False))
    if holder is not None:
        stale.append(holder)
        logger.warning("%s", f"{run_dir}: taking over the lock of a run that is gone ({_describe(holder)})")
    if not locked:
        # No flock to keep a racing run out: start from a fresh file only O_EXCL can create.
        if _same_file(fd, path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return None
    _write_holder(fd, me)
    return RunLock(run_dir, path, fd, me, took_over=holder)


def _flock(fd: int) -> bool | None:
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, ENOSYS, ...: this filesystem does not lock
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ----------------------------------------------------------------------------------------------
# The holder
# ----------------------------------------------------------------------------------------------


def _me(run_dir: Path) -> dict[str, Any]:
    now = time.time()
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": user,
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now)),
        "since_unix": now,
        "command": _command_line(),
        "cwd": os.getcwd(),
        "run_dir": str(run_dir.resolve()),
        "pid_start": _process_start(os.getpid()),
        "boot_id": _boot_id(),
    }


def _command_line() -> str:
    """This process's command line as a shell would take it (Linux: exactly as started)."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        argv = []
    if not argv:
        argv = [sys.executable, *sys.argv]
    return shlex.join(argv)


def _write_holder(fd: int, holder: dict[str, Any]) -> None:
    data = (json.dumps(holder, indent=1) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    with contextlib.suppress(OSError):
        os.fsync(fd)  # other hosts of a network filesystem read it


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, _MAX_HOLDER_BYTES, 0)
        holder = json.loads(data.decode())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _settled_holder(fd: int) -> dict[str, Any] | None:
    """The holder, waiting a moment for one that has just made the file to write itself in."""
    deadline = time.monotonic() + _SETTLE_S
    while True:
        holder = _read_holder(fd)
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


def _holder_state(holder: dict[str, Any] | None, flock_free: bool) -> str:
    """"alive", "dead" or "unknown" (cannot be told from here): the holder a lock file names.
    `flock_free`: this process got the file's flock, so no process on this kernel holds it."""
    if holder is None:
        return "dead"  # no holder written in, after a moment's wait: it died as it made the file
    boot_id = _boot_id()
    same_kernel = bool(boot_id) and holder.get("boot_id") == boot_id
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
        if holder.get("boot_id") and boot_id and not same_kernel:
            return "dead"  # this host has rebooted since
        if not _pid_running(pid):
            return "dead"
        start = _process_start(pid)
        if holder.get("pid_start") is not None and start is not None and start != holder["pid_start"]:
            return "dead"  # the pid now belongs to another process
        return "alive"
    if flock_free and same_kernel:
        return "dead"  # another container of this machine: alive, it would hold the flock
    return "unknown"  # another host


def _pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        return state not in ("Z", "X")  # a zombie has ended, only not been reaped
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def _process_start(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (Linux; None elsewhere): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a process that has not written who it is"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("user"):
        text += f" (user {holder['user']})"
    if holder.get("since"):
        text += f", since {holder['since']}"
        if isinstance(holder.get("since_unix"), (int, float)):
            text += f" ({_ago(time.time() - holder['since_unix'])} ago)"
    if holder.get("command"):
        command = str(holder["command"])
        text += f", command: {command if len(command) <= 500 else command[:500] + ' ...'}"
    return text


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _refusal(run_dir: Path, path: Path, holder: dict[str, Any] | None, flock_held: bool) -> str:
    head = (f"run folder {run_dir} is in use by another run: {_describe(holder)}. Two runs in one folder "
            "would resume each other's checkpoints and write into one metrics.jsonl.")
    todo = ("Give this run another trainer.run_name (or trainer.output_dir), or wait for that run to end "
            "(or stop it)")
    state = _holder_state(holder, flock_free=False) if holder is not None else "unknown"
    if flock_held:
        if state == "dead":  # the holder is gone, yet its lock is held: by a process it left behind
            return (f"{head} That process has ended, but a process it started still holds the lock file "
                    f"{path} open (find it with `fuser -v {path}` and stop it). {todo}.")
        return f"{head} {todo}."
    if state == "unknown":
        return (f"{head} {todo}. If that run is gone (its host crashed or was shut down), remove the lock "
                f"file {path} and start again.")
    return f"{head} {todo}."


# ----------------------------------------------------------------------------------------------
# This process's locks
# ----------------------------------------------------------------------------------------------

_held: dict[str, RunLock] = {}
_registry_lock = threading.RLock()


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")  # not imported: no process group to ask
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _release_all() -> None:
    for lock in list(_held.values()):
        lock.release()


def _forget_in_child() -> None:
    """After a fork, in the child: drop its copies of the lock descriptors without unlocking (the
    parent's lock stays), so a child that outlives the parent does not keep the folder locked."""
    global _registry_lock
    _registry_lock = threading.RLock()  # another thread of the parent may have held it at the fork
    for lock in list(_held.values()):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _held.clear()


atexit.register(_release_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
