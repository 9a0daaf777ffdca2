"""RewardPool with real worker processes and real math-verify; timeouts of 2 s keep this quick."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lensrl.config import RewardConfig
from lensrl.rewards import RewardPool, RewardResult
from lensrl.rewards.pool import _Worker

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


def test_known_timeout_is_not_run_again(pool):
    pool.score_batch([(HANGS, "35")])
    start = time.monotonic()
    results = pool.score_batch([(HANGS, "35")] * 4 + [(NORMAL[0][0], "3")])
    assert time.monotonic() - start < 1.0
    assert [r.status for r in results] == ["timeout"] * 4 + ["ok"]
    assert pool.last_batch_stats["timeout"] == 4


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


def test_worker_killed_between_batches(pool):
    os.kill(pool._workers[0].process.pid, 9)
    pool._workers[0].process.join(5)
    results = pool.score_batch([(c, a) for c, a, _ in NORMAL] * 2)
    assert [r.score for r in results] == pytest.approx([s for _, _, s in NORMAL] * 2)


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
