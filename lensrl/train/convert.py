"""A training checkpoint (`RUN/checkpoints/step_N/`) to a plain Hugging Face model folder, offline.

    lensrl convert --ckpt runs/geo3k/checkpoints/step_200 --out models/geo3k_step200 [--dtype bfloat16]
                   [--expert-layout stacked|per_expert]

The model weights are read from the checkpoint's torch.distributed.checkpoint (DCP) files, however
many ranks wrote them, one safetensors shard at a time: the DCP metadata gives every tensor's name,
shape and dtype, the shards are planned by size, and each shard's tensors are loaded, written and
freed before the next, so host memory stays around one shard (`max_shard_size_bytes`) whatever the
model's size. No GPU, process group or network is needed.

The weight names are the ones `model.save_pretrained` writes with the installed transformers: the
base model is built on the meta device (no memory) and transformers' own save-time steps are applied
to its names, dropping tied aliases (`lm_head.weight` when `tie_word_embeddings`) and reverting
load-time renamings (transformers 5 writes Qwen2.5-VL in its original layout, `visual.*` and
`model.layers.*`, while the module names are `model.visual.*` and `model.language_model.layers.*`).

Mixture-of-experts models (Qwen3-VL-MoE) keep each layer's experts stacked, as transformers 5 holds
and saves them: `...mlp.experts.gate_up_proj` (experts, 2 * moe_intermediate, hidden; gate rows
first, then up) and `...mlp.experts.down_proj` (experts, hidden, moe_intermediate). transformers
also loads the older transposed stacked layout of the Qwen3-VL-MoE release folders, but writes this
one. `expert_layout="per_expert"` (the role of the seed converter's `--groupgemm` flag) writes every
expert as its own three Linear weights instead, as Qwen3-MoE (text) folders store them, for tools
that read experts only in that layout:

    ...mlp.experts.{i}.gate_proj.weight  (moe_intermediate, hidden)  = gate_up_proj[i, :I]
    ...mlp.experts.{i}.up_proj.weight    (moe_intermediate, hidden)  = gate_up_proj[i, I:]
    ...mlp.experts.{i}.down_proj.weight  (hidden, moe_intermediate)  = down_proj[i]

which is exactly what transformers' own per-expert-to-stacked load conversion (the Qwen3-MoE one:
`MergeModulelist(dim=0)` then `Concatenate(dim=1)` of gate and up) turns back into the stacked
tensors (transformers 5 itself applies it to Qwen3-MoE, not to Qwen3-VL-MoE, whose folders it reads
stacked only). The pieces of one stacked tensor stay in one shard and the tensor is read once, whole,
so host memory stays near one shard (plus one stacked tensor while it is cut) here too.

config.json, generation_config.json and the tokenizer/processor files come from the base model: the
`--base` folder or shape name, or else `model.path` (and min/max_pixels) of `RUN/config.yaml`. That
config.yaml is copied as `lensrl_run.yaml`, so `lensrl eval` of the folder grades as the run did.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class ConvertError(ValueError):
    """A checkpoint, base model or output folder that cannot be converted; the message says why."""


EXPERT_LAYOUTS = ("stacked", "per_expert")


@dataclass
class _Tensor:
    name: str  # name in the Hugging Face folder
    source: str  # module FQN in the checkpoint (under "model.")
    shape: torch.Size  # as written
    stored_dtype: torch.dtype
    dtype: torch.dtype  # as written
    source_shape: torch.Size | None = None  # as stored; None: the same as `shape`
    piece: tuple[int, int, int] | None = None  # (expert, start, stop): source[expert, start:stop]

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def take(self, source: torch.Tensor) -> torch.Tensor:
        """This tensor, as written, out of its loaded source tensor (a copy when it is a piece)."""
        if self.piece is None:
            return source.to(self.dtype).contiguous()
        expert, start, stop = self.piece
        return source[expert, start:stop].to(self.dtype, copy=True).contiguous()


def parse_size(text: str | int) -> int:
    """Bytes of "5GB" (10^9, as transformers' max_shard_size), "4GiB" (2^30), "500MB" or "1024"."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConvertError(f"cannot read size {text!r}; write e.g. 5GB, 500MB, 4GiB or a number of bytes")
    unit = (match.group(2) or "").lower().removesuffix("b")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConvertError(f"size must be positive, got {text!r}")
    return size


def convert_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    base: str | None = None,
    dtype: str | None = None,
    max_shard_size_bytes: int = 5 * 2**30,
    progress: bool = True,
    expert_layout: str = "stacked",
) -> Path:
    """Write the model of checkpoint `ckpt` as a Hugging Face folder `out` and return its path.

    `base`: the model folder or shape name the run started from (default: `model.path` of
    `ckpt/../../config.yaml`). `dtype`: "float32", "bfloat16" or "float16" (default: as stored).
    `expert_layout` (mixture-of-experts models): "stacked", the layout `save_pretrained` writes, or
    "per_expert", each expert's gate/up/down Linear weights apart (module docstring); a model
    without experts refuses "per_expert". `out` is written to `.tmp_<name>` beside it and renamed
    when complete; an existing non-empty `out` is refused. Raises FileNotFoundError or ConvertError
    (a ValueError) saying what is wrong.
    """
    ckpt, out = Path(ckpt), Path(out)
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConvertError(f"unknown expert layout {expert_layout!r}; choose {' or '.join(EXPERT_LAYOUTS)}")
    _check_checkpoint(ckpt)
    target_dtype = _parse_dtype(dtype)
    if max_shard_size_bytes <= 0:
        raise ConvertError(f"max_shard_size_bytes must be positive, got {max_shard_size_bytes}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} already exists and is not empty; remove it or choose another --out")
    base_dir, pixels = _resolve_base(ckpt, base)
    tensors = _plan_tensors(ckpt, base_dir, target_dtype, expert_layout)
    shards = _plan_shards(tensors, max_shard_size_bytes)

    tmp = out.parent / f".tmp_{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_weights(ckpt, tmp, shards, progress)
        _write_model_files(base_dir, tmp, pixels, tensors)
        run_config = ckpt.parent.parent / "config.yaml"
        if run_config.is_file():  # which run trained it: `lensrl eval` grades with its reward settings
            shutil.copyfile(run_config, tmp / "lensrl_run.yaml")
        if out.exists():  # an empty folder
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def _check_checkpoint(ckpt: Path) -> None:
    from lensrl.train.checkpoint import list_checkpoints

    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist (expected RUN/checkpoints/step_N)")
    if (ckpt / "meta.json").is_file() and (ckpt / ".metadata").is_file():
        return
    found = list_checkpoints(ckpt) or list_checkpoints(ckpt / "checkpoints")
    hint = f"; complete checkpoints there: {', '.join(str(p) for p in found)}" if found else ""
    missing = "meta.json" if not (ckpt / "meta.json").is_file() else ".metadata (the DCP index)"
    raise FileNotFoundError(
        f"{ckpt} is not a complete lensrl checkpoint: no {missing}; expected a RUN/checkpoints/step_N "
        f"folder written by training{hint}"
    )


def _parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    return DTYPES[name]


def _resolve_base(ckpt: Path, base: str | None) -> tuple[Path, dict[str, int | None]]:
    """The base model folder (a shape name gives its weightless folder) and min/max_pixels overrides."""
    from lensrl.models.load import detect_arch
    from lensrl.models.shapes import SHAPES, shape_dir

    pixels: dict[str, int | None] = {"min_pixels": None, "max_pixels": None}
    run_config = ckpt.parent.parent / "config.yaml"
    if base is None:
        if not run_config.is_file():
            raise FileNotFoundError(
                f"cannot tell which base model {ckpt} was trained from: {run_config} does not exist; "
                "pass --base MODEL (the model folder or shape name the run started from)"
            )
        import yaml

        model_cfg = (yaml.safe_load(run_config.read_text()) or {}).get("model") or {}
        base = model_cfg.get("path")
        if not base:
            raise ConvertError(f"{run_config} has no model.path; pass --base MODEL")
        pixels = {k: model_cfg.get(k) for k in pixels}
        source = f"model.path of {run_config}"
    else:
        source = "--base"
    base = str(base)
    if base in SHAPES and not Path(base).exists():
        return shape_dir(base), pixels
    if not Path(base).is_dir():
        raise FileNotFoundError(
            f"base model {base} ({source}) is not a folder or a shape name ({', '.join(SHAPES)}); "
            "pass --base MODEL with the model folder the run started from"
        )
    detect_arch(base)  # a clear error for a folder that is not a supported HF model
    return Path(base), pixels


# ------------------------------------------------------------------------------------------------
# names, shapes and shards
# ------------------------------------------------------------------------------------------------


def hf_weight_names(model: torch.nn.Module) -> dict[str, str]:
    """{name in a `save_pretrained` folder: module FQN} for `model` (may be on the meta device).

    The same two steps `PreTrainedModel.save_pretrained` takes: tied aliases dropped (the name
    transformers expects on reload is kept), then load-time renamings reverted.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError as e:  # transformers 4.x names weights differently on save
        raise RuntimeError(f"lensrl convert needs transformers>=5 ({e})") from None
    state = dict(model.state_dict())
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    kept = remove_tied_weights_from_state_dict(state, model)
    fqn_of = {id(tensor): name for name, tensor in kept.items()}
    renamed = revert_weight_conversion(model, kept)
    names = {}
    for name, tensor in renamed.items():
        if id(tensor) not in fqn_of:
            raise ConvertError(
                f"{type(model).__name__}: transformers changes weights on save beyond renaming ({name}); "
                "lensrl convert supports Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE only"
            )
        names[name] = fqn_of[id(tensor)]
    return names


def stacked_experts(model: torch.nn.Module) -> dict[str, str]:
    """{FQN: "gate_up_proj" or "down_proj"} of the stacked expert weights of `model` (meta is fine).

    An experts module is one holding 3-D `gate_up_proj` (experts, 2 * I, hidden) and `down_proj`
    (experts, hidden, I) parameters, as transformers 5 builds Qwen3-VL-MoE's. One that declares
    another layout (transposed, interleaved gate/up, biases) raises ConvertError: splitting it
    as if it were this one would write wrong weights.
    """
    found = {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
        if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
            continue
        experts, two_inter, hidden = gate_up.shape
        if (
            getattr(module, "is_transposed", False)
            or not getattr(module, "is_concatenated", True)
            or getattr(module, "has_bias", False)
            or two_inter % 2
            or tuple(down.shape) != (experts, hidden, two_inter // 2)
        ):
            raise ConvertError(
                f"{type(module).__name__} ({name}) stores its experts in a layout lensrl convert cannot split "
                f"(gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}); use --expert-layout stacked"
            )
        found[f"{name}.gate_up_proj"] = "gate_up_proj"
        found[f"{name}.down_proj"] = "down_proj"
    return found


def _expert_pieces(tensor: _Tensor, kind: str) -> list[_Tensor]:
    """The per-expert Linear weights of stacked `tensor` (`...experts.gate_up_proj` or `.down_proj`).

    gate_up_proj (E, 2I, H) -> experts.{i}.gate_proj.weight = [i, :I] and up_proj.weight = [i, I:],
    both (I, H); down_proj (E, H, I) -> experts.{i}.down_proj.weight = [i], (H, I). The gate half
    comes first, as the experts forward chunks it (`linear(x, gate_up_proj[i]).chunk(2, dim=-1)`).
    """
    prefix = tensor.name.rsplit(".", 1)[0]  # "...mlp.experts"
    num_experts, rows = tensor.shape[0], tensor.shape[1]
    parts = [("gate_proj", 0, rows // 2), ("up_proj", rows // 2, rows)] if kind == "gate_up_proj" else [
        ("down_proj", 0, rows)]
    return [
        _Tensor(f"{prefix}.{expert}.{proj}.weight", tensor.source, torch.Size((stop - start, *tensor.shape[2:])),
                tensor.stored_dtype, tensor.dtype, source_shape=tensor.shape, piece=(expert, start, stop))
        for expert in range(num_experts)
        for proj, start, stop in parts
    ]


def _plan_tensors(
    ckpt: Path, base_dir: Path, target_dtype: torch.dtype | None, expert_layout: str = "stacked"
) -> list[_Tensor]:
    """Every weight to write, checked against the base model's names and shapes; with
    `expert_layout="per_expert"`, each stacked expert weight as its per-expert pieces."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lensrl.models.load import detect_arch
    from lensrl.models.shapes import config_class, model_class

    arch = detect_arch(base_dir)
    config = config_class(arch).from_pretrained(base_dir)
    with torch.device("meta"):
        model = model_class(arch)(config)
    names = hf_weight_names(model)
    experts = stacked_experts(model) if expert_layout == "per_expert" else {}
    if expert_layout == "per_expert" and not experts:
        raise ConvertError(
            f"--expert-layout per_expert: base model {base_dir} ({arch}) has no mixture-of-experts layers, so there "
            "is nothing to split; leave the option out (it applies to MoE models such as Qwen3-VL-MoE)"
        )
    expected = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    aliases: dict[int, list[str]] = defaultdict(list)  # tied weights share one parameter
    for name, tensor in expected.items():
        aliases[id(tensor)].append(name)

    metadata = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    stored = {key.removeprefix("model."): meta for key, meta in metadata.items() if key.startswith("model.")}
    if not stored:
        raise ConvertError(f"{ckpt} holds no model weights (no 'model.' entries in its DCP metadata)")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise ConvertError(
            f"{ckpt} has {len(unexpected)} weights that base model {base_dir} does not "
            f"({', '.join(unexpected[:3])}, ...); pass the --base the run was trained from"
        )

    tensors, problems = [], []
    for name, fqn in names.items():
        source = next((a for a in [fqn, *aliases[id(expected[fqn])]] if a in stored), None)
        if source is None:
            problems.append(f"{fqn} is missing")
            continue
        meta = stored[source]
        if not isinstance(meta, TensorStorageMetadata):
            problems.append(f"{source} is not a tensor")
            continue
        if tuple(meta.size) != tuple(expected[fqn].shape):
            problems.append(f"{source} has shape {tuple(meta.size)}, base model {tuple(expected[fqn].shape)}")
            continue
        stored_dtype = meta.properties.dtype
        dtype = target_dtype if target_dtype is not None and stored_dtype.is_floating_point else stored_dtype
        tensor = _Tensor(name, source, torch.Size(meta.size), stored_dtype, dtype)
        tensors.extend(_expert_pieces(tensor, experts[fqn]) if fqn in experts else [tensor])
    if problems:
        raise ConvertError(
            f"{ckpt} does not match base model {base_dir}: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; "
            "pass the --base the run was trained from"
        )
    return tensors


def _plan_shards(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    """Consecutive tensors in shards of at most `max_bytes` (a larger tensor gets a shard alone).

    The pieces of one stored tensor (per-expert layout) are kept together, as one tensor is, so
    each shard loads every stored tensor it needs once and whole.
    """
    units: list[list[_Tensor]] = []
    for tensor in tensors:
        if units and tensor.piece is not None and units[-1][-1].source == tensor.source:
            units[-1].append(tensor)
        else:
            units.append([tensor])
    shards: list[list[_Tensor]] = []
    size = 0
    for unit in units:
        unit_size = sum(t.nbytes for t in unit)
        if not shards or (size + unit_size > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_size
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------


def _write_weights(ckpt: Path, out: Path, shards: list[list[_Tensor]], progress: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    files = shard_names(len(shards))
    total = sum(t.nbytes for shard in shards for t in shard)
    bar, task = _progress(total, len(shards)) if progress else (None, None)
    with bar or nullcontext():
        for index, (file, shard) in enumerate(zip(files, shards), 1):
            if bar is not None:
                bar.update(task, description=f"shard {index}/{len(shards)}")
            loaded = {t.source: torch.empty(t.source_shape or t.shape, dtype=t.stored_dtype) for t in shard}
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process.*")
                dcp.load({"model": loaded}, checkpoint_id=str(ckpt), no_dist=True)
            weights = {}
            for i, t in enumerate(shard):  # a stored tensor is freed once its last piece is taken
                last_use = i + 1 == len(shard) or shard[i + 1].source != t.source
                weights[t.name] = t.take(loaded.pop(t.source) if last_use else loaded[t.source])
            save_file(weights, str(out / file), metadata={"format": "pt"})
            del weights
            if bar is not None:
                bar.update(task, advance=sum(t.nbytes for t in shard))
    if len(shards) > 1:
        index_file = {
            "metadata": {
                "total_parameters": sum(t.shape.numel() for shard in shards for t in shard),
                "total_size": total,
            },
            "weight_map": {t.name: file for file, shard in zip(files, shards) for t in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2, sort_keys=True) + "\n")


def _progress(total: int, num_shards: int) -> tuple[Any, Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from lensrl.logging import console

    bar = Progress(
        TextColumn("converting {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    return bar, bar.add_task(f"shard 1/{num_shards}", total=total)


def _write_model_files(base_dir: Path, out: Path, pixels: dict[str, int | None], tensors: list[_Tensor]) -> None:
    """config.json (dtype = the written dtype), generation_config.json, tokenizer and processor files."""
    from lensrl.models.processor import Processor

    config = json.loads((base_dir / "config.json").read_text())
    float_dtypes = {t.dtype for t in tensors if t.dtype.is_floating_point}
    if len(float_dtypes) == 1:  # as save_pretrained: the dtype the weights are in
        name = str(float_dtypes.pop()).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", out / "generation_config.json")
    Processor.from_pretrained(base_dir, **pixels).save_pretrained(out)
