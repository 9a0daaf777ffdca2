"""RewardPool with real worker processes and real math-verify; timeouts of 2 s keep this quick."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lensrl.config import RewardConfig
from lensrl.rewards import RewardPool, RewardResult
from lensrl.rewards import pool as pool_module
from lensrl.rewards.pool import _Worker, describe_exit

TIMEOUT_S = 2.0
CFG = RewardConfig(num_workers=2, timeout_s=TIMEOUT_S)

NORMAL = [
    ("<think>a</think> so \\boxed{3}", "3", 1.0),
    ("\\boxed{\\frac{5}{2}}", "2.5", 0.9),
    ("<think>a</think> \\boxed{4\\sqrt{3}}", "\\sqrt{48}", 1.0),
    ("<think>a</think> \\boxed{7}", "\\boxed{8}", 0.1),
    ("no answer", "3", 0.0),
]

HANGS = "<think>a</think> \\boxed{9^{9^{9^{9}}}}"  # sympy evaluates this for ever
ADVERSARIAL = {
    "power tower": HANGS,
    "200k-character answer": "<think>a</think> \\boxed{" + "9" * 200_000 + "}",
    "unbalanced": "<think>a</think> \\boxed{\\frac{1}{2}",
    "binary junk": "<think>\x00\x01\xff\ufffd</think> \\boxed{\x00\x07" + "\ud800" + "}",
    "deep nesting": "<think>a</think> \\boxed{" + "{" * 30 + "1" + "}" * 30 + "}",
    "deep nesting unclosed": "<think>a</think> \\boxed{" + "{" * 50_000,
    "junk without a box": "\x00\ud800\udfff" * 1000 + "<think></think>",  # goes to a worker
}


def _zero(result: RewardResult) -> bool:
    return result.score == CFG.reward_min_val and set(result.parts.values()) == {0.0}


@pytest.fixture(scope="module")
def pool():
    with RewardPool(CFG) as pool:
        yield pool


def test_normal_batch(pool):
    results = pool.score_batch([(c, a) for c, a, _ in NORMAL])
    assert [r.score for r in results] == pytest.approx([s for _, _, s in NORMAL])
    assert all(r.status == "ok" for r in results)
    assert results[0].parts == {"accuracy": 1.0, "format": 1.0}
    assert pool.last_batch_stats["ok"] == len(NORMAL)


def test_adversarial_batch_is_bounded_and_counted(pool):
    stats_before = dict(pool.stats)
    items = [(text, "1") for text in ADVERSARIAL.values()] + [(c, a) for c, a, _ in NORMAL]
    start = time.monotonic()
    results = pool.score_batch(items)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S * 2 + 5

    for name, result in zip(ADVERSARIAL, results):
        assert _zero(result), (name, result)
    statuses = {name: r.status for name, r in zip(ADVERSARIAL, results)}
    assert statuses["power tower"] == "timeout"
    assert statuses["200k-character answer"] == "rejected"
    assert statuses["binary junk"] == "rejected"
    assert statuses["deep nesting"] == "rejected"
    assert statuses["unbalanced"] == "ok"  # no answer: simply wrong
    # The normal items in the same batch are scored as usual.
    assert [r.score for r in results[len(ADVERSARIAL) :]] == pytest.approx([s for _, _, s in NORMAL])

    batch = pool.last_batch_stats
    assert batch["items"] == len(items)
    assert batch["timeout"] == 1 and batch["rejected"] == 3 and batch["restarts"] == 1
    assert pool.stats["timeout"] == stats_before["timeout"] + 1
    assert pool.stats["items"] == stats_before["items"] + len(items)

    # The stuck worker was replaced: the pool still scores a normal batch.
    results = pool.score_batch([(c, a) for c, a, _ in NORMAL])
    assert [r.score for r in results] == pytest.approx([s for _, _, s in NORMAL])
    assert all(worker.process.is_alive() for worker in pool._workers)


def test_known_timeout_holds_for_its_batch(pool):
    pool.take_metrics()
    start = time.monotonic()
    results = pool.score_batch([(HANGS, "35")] * 4 + [(NORMAL[0][0], "3")])
    assert time.monotonic() - start < TIMEOUT_S * 2 + 3  # one round of stuck workers, not four
    assert [r.status for r in results] == ["timeout"] * 4 + ["ok"]
    assert pool.last_batch_stats["timeout"] == 4
    metrics = pool.take_metrics()
    assert 1 <= metrics["reward/grader_timeouts"] <= 2  # the copies that found a worker free ran
    assert metrics["reward/worker_restarts"] == metrics["reward/grader_timeouts"]
    assert metrics["reward/worker_deaths"] == 0
    assert pool.take_metrics() == dict.fromkeys(metrics, 0.0)  # since the last call


def test_more_stuck_items_than_workers(pool):
    items = [(f"\\boxed{{9^{{9^{{9^{{{n}}}}}}}}}", "1") for n in (5, 6, 7)]  # three new towers
    start = time.monotonic()
    results = pool.score_batch(items)
    assert time.monotonic() - start < 2 * TIMEOUT_S + 5  # two rounds on two workers
    assert [r.status for r in results] == ["timeout"] * 3


def test_bad_items_are_errors(pool):
    results = pool.score_batch([(None, "3"), ("\\boxed{3}", 3), ("only one",), ("\\boxed{3}", "3")])
    assert [r.status for r in results] == ["error", "error", "error", "ok"]
    assert all(_zero(r) for r in results[:3])
    assert pool.last_batch_stats["error"] == 3


def test_worker_killed_between_batches(pool, caplog):
    pool.score_batch([(c, a) for c, a, _ in NORMAL])  # every worker started and idle (else "before it was ready")
    pool.take_metrics()
    os.kill(pool._workers[0].process.pid, 9)
    pool._workers[0].process.join(5)
    results = pool.score_batch([(c, a) for c, a, _ in NORMAL] * 2)
    assert [r.score for r in results] == pytest.approx([s for _, _, s in NORMAL] * 2)
    assert "was killed by signal 9 (SIGKILL) from outside this process" in caplog.text
    assert "while idle" in caplog.text
    metrics = pool.take_metrics()
    assert metrics["reward/worker_deaths"] == 1 and metrics["reward/worker_restarts"] == 1


def test_worker_killed_before_ready():
    with RewardPool(RewardConfig(num_workers=1, timeout_s=TIMEOUT_S)) as pool:
        pool._workers.append(_Worker(pool.cfg))
        os.kill(pool._workers[0].process.pid, 9)
        results = pool.score_batch([(c, a) for c, a, _ in NORMAL])
        assert [r.score for r in results] == pytest.approx([s for _, _, s in NORMAL])
        assert pool.stats["restarts"] == 1


def test_choice_pool():
    cfg = RewardConfig(type="choice", format_pattern=None, num_workers=1, timeout_s=TIMEOUT_S)
    with RewardPool(cfg) as pool:
        results = pool.score_batch([("The answer is B", "B"), ("\\boxed{A}", "C")])
    assert [r.score for r in results] == [1.0, 0.0]


def test_inline_mode_with_timeout():
    cfg = RewardConfig(num_workers=0, timeout_s=1.0, reward_min_val=-1.0)
    with RewardPool(cfg) as pool:
        start = time.monotonic()
        results = pool.score_batch([(NORMAL[0][0], "3"), (HANGS, "1"), (ADVERSARIAL["binary junk"], "1")])
        assert time.monotonic() - start < 1.0 * 2 + 5
    assert [r.status for r in results] == ["ok", "timeout", "rejected"]
    assert [r.score for r in results] == [1.0, -1.0, -1.0]
    assert pool.stats["timeout"] == 1
    assert pool.take_metrics() == {"reward/worker_restarts": 0.0, "reward/grader_timeouts": 1.0,
                                   "reward/worker_deaths": 0.0}


def test_close():
    pool = RewardPool(CFG)
    pool.score_batch([("\\boxed{1}", "1")])
    processes = [worker.process for worker in pool._workers]
    pool.close()
    assert not any(p.is_alive() for p in processes)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score_batch([("\\boxed{1}", "1")])


def test_config_errors():
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(RewardConfig(num_workers=-1))
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(RewardConfig(timeout_s=0.0))
    with pytest.raises(ValueError, match="reward_min_val"):
        RewardPool(RewardConfig(reward_min_val=1.0, reward_max_val=0.0))


def _dead(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "State:\tZ" in status  # a zombie waiting for a reaper is dead too


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on Linux parent-death signals")
def test_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, threading, time
            from lensrl.config import RewardConfig
            from lensrl.rewards import RewardPool

            if __name__ == "__main__":
                pool = RewardPool(RewardConfig(num_workers=2, timeout_s=60.0))
                pool.score_batch([("\\\\boxed{{1}}", "1")])
                print(*[w.process.pid for w in pool._workers], flush=True)
                threading.Thread(target=pool.score_batch, args=([({HANGS!r}, "1")],), daemon=True).start()
                time.sleep(0.5)  # a worker is now stuck in sympy
                os.kill(os.getpid(), 9)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 2, run.stderr
    deadline = time.monotonic() + 10
    while not all(_dead(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_dead(pid) for pid in pids)


# ----------------------------------------------------------------------------------------------
# Graders that hang once, workers killed from outside, workers that cannot start
# ----------------------------------------------------------------------------------------------

GRADERS = """
import os, time
from pathlib import Path


def hang_once(completion, sample, marker_dir):
    # Hangs the first time it sees an answer, then grades it at once.
    marker = Path(marker_dir) / ("seen_" + sample["answer"])
    if not marker.exists():
        marker.write_text("")
        time.sleep(60)
    return 1.0 if completion == sample["answer"] else 0.0


def killed_while_grading(completion, sample, marker_dir, kills):
    # The first `kills` tries write try_N (this worker's pid) and wait to be killed.
    tries = len(list(Path(marker_dir).glob("try_*")))
    if tries < kills:
        tmp = Path(marker_dir) / "partial"
        tmp.write_text(str(os.getpid()))
        tmp.rename(Path(marker_dir) / f"try_{tries}")
        time.sleep(60)
    return 1.0
"""


def _grader(tmp_path: Path, name: str, **kwargs) -> RewardConfig:
    path = tmp_path / "graders.py"
    path.write_text(GRADERS)
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    return RewardConfig(function=f"{path}:{name}", function_kwargs={"marker_dir": str(markers), **kwargs},
                        num_workers=1, timeout_s=TIMEOUT_S)


def test_an_answer_that_hung_once_is_graded_again(tmp_path):
    with RewardPool(_grader(tmp_path, "hang_once")) as pool:
        first = pool.score_batch([("7", "7")])
        assert first[0].status == "timeout"
        assert pool.take_metrics() == {"reward/worker_restarts": 1.0, "reward/grader_timeouts": 1.0,
                                       "reward/worker_deaths": 0.0}
        again = pool.score_batch([("7", "7"), ("8", "7")])  # graded afresh, not a remembered timeout
        assert [(r.status, r.score) for r in again] == [("ok", 1.0), ("ok", 0.0)]
        assert pool.take_metrics()["reward/grader_timeouts"] == 0


def _kill_tries(markers: Path, kills: int, killed: list[int]) -> None:
    deadline = time.monotonic() + 30
    while len(killed) < kills and time.monotonic() < deadline:
        marker = markers / f"try_{len(killed)}"
        if marker.exists():
            killed.append(int(marker.read_text()))
            os.kill(killed[-1], signal.SIGKILL)
        time.sleep(0.02)


@pytest.mark.parametrize("kills", [1, 2])
def test_worker_killed_while_grading(tmp_path, caplog, kills):
    cfg = _grader(tmp_path, "killed_while_grading", kills=kills)
    cfg.timeout_s = 30.0  # the kill comes first
    killed: list[int] = []
    killer = threading.Thread(target=_kill_tries, args=(tmp_path / "markers", kills, killed))
    with RewardPool(cfg) as pool:
        killer.start()
        start = time.monotonic()
        results = pool.score_batch([("a", "a")])
        killer.join()
        assert time.monotonic() - start < 15
        assert len(killed) == kills
        metrics = pool.take_metrics()
    assert metrics == {"reward/worker_restarts": float(kills), "reward/grader_timeouts": 0.0,
                       "reward/worker_deaths": float(kills)}
    assert f"reward worker (pid {killed[0]}) was killed by signal 9 (SIGKILL)" in caplog.text
    assert "num_workers=0" not in caplog.text
    if kills == 1:  # graded again by the new worker
        assert (results[0].status, results[0].score) == ("ok", 1.0)
        assert "the item is graded again" in caplog.text
    else:  # a second death on the same item: an error that says how the worker died
        assert results[0].status == "error"
        assert f"died twice; the second (pid {killed[1]}) was killed by signal 9 (SIGKILL)" in results[0].detail
        assert "num_workers=0" not in results[0].detail


def _killed_at_start(conn, cfg, start_method):
    os.kill(os.getpid(), signal.SIGKILL)


def _broken_at_start(conn, cfg, start_method):
    sys.stderr = open(os.devnull, "w")  # keep the test's output clean of the expected traceback
    raise ImportError("no module named 'grader_dependency'")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fake worker travels by fork")
def test_workers_that_cannot_start(monkeypatch):
    monkeypatch.setattr(pool_module, "_worker_main", _killed_at_start)
    with RewardPool(RewardConfig(num_workers=1, timeout_s=TIMEOUT_S)) as pool:
        with pytest.raises(RuntimeError, match=r"3 times in a row.*was killed by signal 9 \(SIGKILL\)") as e:
            pool.score_batch([("\\boxed{1}", "1")])
        assert "num_workers=0" not in str(e.value)  # killed from outside: no error of its own to show

    monkeypatch.setattr(pool_module, "_worker_main", _broken_at_start)
    with RewardPool(RewardConfig(num_workers=1, timeout_s=TIMEOUT_S)) as pool:
        with pytest.raises(RuntimeError, match=r"exited with code 1.*reward.num_workers=0 to see the error"):
            pool.score_batch([("\\boxed{1}", "1")])


def test_describe_exit():
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(-15) == "was killed by signal 15 (SIGTERM)"
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(0) == "exited normally"
    assert describe_exit(None) == "closed its connection but had not exited"
