"""The reward-function interface: built-in and user rewards behind one call.

    reward:
      function: rewards/box_iou.py:box_iou      # a file and a function in it (EasyR1 / verl style),
      function_kwargs: {format_weight: 0.1}     # or an importable `package.module:name`

A reward function is called once per completion, in a `RewardPool` worker (per-item timeout,
memory cap):

    fn(completion: str, sample: dict, **function_kwargs) -> float | {"score": float, <part>: float, ...}

`sample` holds the row's ground truth and context as plain values: `answer`, `choices` (or None),
`prompt`, `data_source` (the file), `row`, `id`, `assistant_prefix` (what the chat template
already wrote of the answer: "<think>\\n" for thinking templates), and every other non-image
column of the row by its own name (a column named like one of those keys is shadowed by it).
Named parts are logged as `reward/<part>` (and `val/<part>` in validation). Without
`reward.function`, `reward.type` picks a built-in: `math` (`lensrl.rewards.math:math_reward`) or
`choice` (`lensrl.rewards.choice:choice_reward`), called the same way with `cfg=` the reward config.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

BUILTINS = {"math": "lensrl.rewards.math:math_reward", "choice": "lensrl.rewards.choice:choice_reward"}


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded or returns something that is not a reward."""


def resolve(cfg) -> tuple[Callable[..., Any], dict[str, Any]]:
    """(the function a RewardConfig names, the keyword arguments it is called with)."""
    if cfg.function:
        return load_function(cfg.function), dict(cfg.function_kwargs)
    if cfg.type not in BUILTINS:
        raise RewardFunctionError(f"reward.type must be one of {', '.join(BUILTINS)}, got {cfg.type!r}")
    return load_function(BUILTINS[cfg.type]), {"cfg": cfg}


@lru_cache(maxsize=16)
def load_function(spec: str) -> Callable[..., Any]:
    """`path/to/file.py:name` (relative paths from the working directory) or `package.module:name`.

    Raises RewardFunctionError naming the file or the function when either is missing."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardFunctionError(f"reward.function {spec!r}: expected 'path/to/file.py:function' or "
                                  "'package.module:function'")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise RewardFunctionError(f"reward.function {spec!r}: file {path} not found (relative paths are "
                                      f"read from the working directory, {Path.cwd()})")
        module_name = f"lensrl_user_reward_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[module_name]
                raise RewardFunctionError(f"reward.function {spec!r}: importing {path} failed: "
                                          f"{type(e).__name__}: {e}") from e
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.append(str(Path.cwd()))  # as `python -m lensrl` would: a module in the working directory
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise RewardFunctionError(f"reward.function {spec!r}: cannot import module {where!r} ({e}; the "
                                      f"working directory {Path.cwd()} is searched too)") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardFunctionError(f"reward.function {spec!r}: no function {name!r} in {where} "
                                  f"(functions there: {', '.join(found) or 'none'})")
    return fn


def check_signature(fn: Callable[..., Any], kwargs: Mapping[str, Any], spec: str) -> None:
    """Raise RewardFunctionError when `fn(completion, sample, **kwargs)` cannot be called that way
    (a wrong signature, a misspelt keyword argument), before any model loads."""
    try:
        inspect.signature(fn).bind("completion", {}, **kwargs)
    except TypeError as e:
        raise RewardFunctionError(f"reward.function {spec!r} cannot be called as fn(completion, sample"
                                  f"{''.join(', ' + k + '=...' for k in kwargs)}): {e}") from None
    except ValueError:  # no signature to read (a builtin): it will tell at the first call
        pass


def reward_sample(sample, assistant_prefix: str = "") -> dict[str, Any]:
    """The `sample` dict a reward function receives for a `Sample` (no images). `assistant_prefix`:
    what the chat template already wrote of the answer (`Processor.assistant_prefix`, e.g.
    "<think>\\n"), so a format check can judge prefix + completion."""
    meta = sample.meta
    return {**meta.get("columns", {}), "answer": sample.answer, "choices": sample.choices,
            "prompt": sample.prompt, "data_source": meta.get("source", ""), "row": meta.get("row"),
            "id": meta.get("id"), "assistant_prefix": assistant_prefix}


def call_reward(fn: Callable[..., Any], kwargs: Mapping[str, Any], completion: str,
                sample: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
    """(score, parts) of one completion: `fn(completion, sample, **kwargs)` and its result checked.

    Raises RewardFunctionError when the result is not a finite number or a dict with a finite
    numeric `score` and numeric parts; whatever `fn` raises passes through."""
    result = fn(completion, sample, **kwargs)
    if isinstance(result, Mapping):
        if "score" not in result:
            raise RewardFunctionError(f"the reward function returned a dict without 'score' (keys: {sorted(result)})")
        parts = {k: v for k, v in result.items() if k != "score"}
        score = result["score"]
    else:
        score, parts = result, {}
    score = _number(score)
    if score is None:
        raise RewardFunctionError(f"the reward function returned score {result!r}; expected a finite number")
    numbers = {str(k): _number(v) for k, v in parts.items()}
    bad = {k: parts[k] for k, v in numbers.items() if v is None}
    if bad:
        raise RewardFunctionError(f"the reward function returned parts that are not finite numbers: {bad!r}")
    reserved = sorted(set(numbers) & RESERVED_PARTS)
    if reserved:
        raise RewardFunctionError(f"the reward function returned parts named {reserved}: those names are lensrl's "
                                  f"own metrics (reward/{reserved[0]}); rename them")
    return score, numbers


RESERVED_PARTS = {"mean", "std", "errors", "timeouts", "score", "worker_restarts", "grader_timeouts", "worker_deaths"}


def _number(value: Any) -> float | None:
    """A finite float from a Python, numpy or 0-d torch number; None for anything else (bools too)."""
    if isinstance(value, bool) or getattr(value, "dtype", None) is not None and str(value.dtype) == "bool":
        return None
    try:
        number = float(value) if isinstance(value, numbers.Real) or getattr(value, "ndim", 1) == 0 else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None
