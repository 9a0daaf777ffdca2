"""A training checkpoint (`RUN/checkpoints/step_N/`) to a plain Hugging Face model folder, offline.

    lensrl convert --ckpt runs/geo3k/checkpoints/step_200 --out models/geo3k_step200 [--dtype bfloat16]
                   [--expert-layout stacked|per_expert] [--lora-format merged|peft]

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

LoRA checkpoints (`model.lora.rank > 0`) hold the adapters alone, `<Linear>.lora_A.default.weight`
(rank, in) and `.lora_B.default.weight` (out, rank), and their optimizer state; the frozen base is
the base model folder's. Their settings (rank, alpha, dropout, target modules) are in the
checkpoint's meta.json ("lora"), or for older checkpoints in `model.lora` of RUN/config.yaml
(`lora_settings`). Two outputs:

  merged (default)  the base folder's weights with W + (alpha / rank) * B @ A in each adapted Linear
                    (Hu et al. 2021, eq. 3; the sum in fp32), under the names above: a folder plain
                    transformers loads. The base weights are streamed from the base folder's
                    safetensors, one output shard at a time with the adapters of that shard's weights
                    read from the checkpoint, when the folder stores them under save_pretrained's
                    names (any folder save_pretrained wrote; the Qwen2.5-VL and Qwen3-VL releases);
                    a folder in a layout transformers converts on load (the Qwen3-VL-MoE releases'
                    transposed experts) is loaded whole by transformers first, which takes the whole
                    model's memory. Written in the base folder's dtype unless `--dtype` (a bf16 base
                    rounds a small merged update: `--dtype float32` keeps it).
  peft              `--lora-format peft`: adapter_config.json (r, lora_alpha, lora_dropout, the
                    target_modules regex training used, base_model_name_or_path) and
                    adapter_model.safetensors (`base_model.model.<Linear>.lora_A.weight`, ...), the
                    folder `PeftModel.from_pretrained(<base model>, DIR)` loads, as training's
                    `RUN/hf_adapter` is. The base must still be found (its Linear shapes check the
                    adapters) but its weights are not read.

Either way the adapters are checked against the base model's Linear layers and the recorded rank
before anything is written; a full-parameter checkpoint refuses `--lora-format peft`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lensrl.config import LoraSettings

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
LORA_FORMATS = ("merged", "peft")


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
    lora_format: str = "merged",
) -> Path:
    """Write the model of checkpoint `ckpt` as a Hugging Face folder `out` and return its path.

    `base`: the model folder or shape name the run started from (default: `model.path` of
    `ckpt/../../config.yaml`). `dtype`: "float32", "bfloat16" or "float16" (default: as stored).
    `expert_layout` (mixture-of-experts models): "stacked", the layout `save_pretrained` writes, or
    "per_expert", each expert's gate/up/down Linear weights apart (module docstring); a model
    without experts refuses "per_expert". `lora_format` (LoRA checkpoints, which hold the adapters
    only): "merged", the base folder's weights with the adapters merged in, or "peft", a peft
    adapter folder; a full-parameter checkpoint refuses "peft". `out` is written to `.tmp_<name>`
    beside it and renamed when complete; an existing non-empty `out` is refused. Raises
    FileNotFoundError or ConvertError (a ValueError) saying what is wrong.
    """
    ckpt, out = Path(ckpt), Path(out)
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConvertError(f"unknown expert layout {expert_layout!r}; choose {' or '.join(EXPERT_LAYOUTS)}")
    if lora_format not in LORA_FORMATS:
        raise ConvertError(f"unknown LoRA format {lora_format!r}; choose {' or '.join(LORA_FORMATS)}")
    _check_checkpoint(ckpt)
    target_dtype = _parse_dtype(dtype)
    if max_shard_size_bytes <= 0:
        raise ConvertError(f"max_shard_size_bytes must be positive, got {max_shard_size_bytes}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} already exists and is not empty; remove it or choose another --out")
    lora = lora_settings(ckpt)  # None: a full-parameter checkpoint
    if lora is None and lora_format == "peft":
        raise ConvertError(
            f"--lora-format peft: {ckpt} is a full-parameter checkpoint (its DCP index {ckpt / '.metadata'} lists "
            "no '.lora_A.' / '.lora_B.' weights); a peft adapter folder needs a LoRA checkpoint (a run with "
            "model.lora.rank > 0); leave --lora-format out to write the full model"
        )
    adapter_folder = lora is not None and lora_format == "peft"
    if adapter_folder and expert_layout != "stacked":
        raise ConvertError("--expert-layout per_expert with --lora-format peft: an adapter folder holds no expert "
                           "weights; leave --expert-layout out")
    base_dir, pixels = _resolve_base(ckpt, base, adapters_only=lora is not None)
    from lensrl.models.load import base_identity

    check_base(ckpt, base_identity(base_dir), adapters=lora is not None, named=f"the base model {base_dir}")
    if adapter_folder:
        adapters = _plan_adapters(ckpt, _meta_model(base_dir)[1], lora)
    else:
        if lora is None:
            tensors, load = _plan_tensors(ckpt, base_dir, target_dtype, expert_layout), _checkpoint_loader(ckpt)
        else:
            tensors, load = _plan_merged(ckpt, base_dir, lora, target_dtype, expert_layout)
        shards = _plan_shards(tensors, max_shard_size_bytes)

    tmp = out.parent / f".tmp_{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if adapter_folder:
            _write_adapter(ckpt, tmp, adapters, lora, base_dir, target_dtype, progress)
        else:
            _write_weights(tmp, shards, load, progress)
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


def _resolve_base(ckpt: Path, base: str | None, adapters_only: bool = False) -> tuple[Path, dict[str, int | None]]:
    """The base model folder (a shape name gives its weightless folder) and min/max_pixels overrides.
    `adapters_only` (a LoRA checkpoint): the messages say why the base is needed."""
    from lensrl.models.load import detect_arch
    from lensrl.models.shapes import SHAPES, shape_dir

    why = (f"{ckpt} is a LoRA checkpoint: it holds the adapters only, not the frozen base weights they adapt, "
           "so the base model is needed; " if adapters_only else "")
    pixels: dict[str, int | None] = {"min_pixels": None, "max_pixels": None}
    run_config = ckpt.parent.parent / "config.yaml"
    if base is None:
        if not run_config.is_file():
            raise FileNotFoundError(
                f"{why}cannot tell which base model {ckpt} was trained from: {run_config} does not exist; "
                "pass --base MODEL (the model folder or shape name the run started from)"
            )
        import yaml

        model_cfg = (yaml.safe_load(run_config.read_text()) or {}).get("model") or {}
        base = model_cfg.get("path")
        if not base:
            raise ConvertError(f"{why}{run_config} has no model.path; pass --base MODEL")
        pixels = {k: model_cfg.get(k) for k in pixels}
        source = f"model.path of {run_config}"
    else:
        source = "--base"
    base = str(base)
    if base in SHAPES and not Path(base).exists():
        return shape_dir(base), pixels
    if not Path(base).is_dir():
        raise FileNotFoundError(
            f"{why}base model {base} ({source}) is not a folder or a shape name ({', '.join(SHAPES)}); "
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
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    arch, model = _meta_model(base_dir)
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

    stored = _stored_model_weights(ckpt)
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


def _meta_model(base_dir: Path) -> tuple[str, torch.nn.Module]:
    """(architecture, the base model built on the meta device: names and shapes, no memory)."""
    from lensrl.models.load import detect_arch
    from lensrl.models.shapes import config_class, model_class

    arch = detect_arch(base_dir)
    config = config_class(arch).from_pretrained(base_dir)
    with torch.device("meta"):
        return arch, model_class(arch)(config)


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
# LoRA checkpoints: the adapters alone, merged into the base folder's weights or written for peft
# ------------------------------------------------------------------------------------------------

# peft's name of an adapter weight inside the model: `<Linear FQN>.lora_A.default.weight`
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")

# safetensors' dtype names (the header's "dtype") of the tensors a base folder may hold
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _stored_model_weights(ckpt: Path) -> dict[str, Any]:
    """{module FQN: DCP storage metadata} of the model weights checkpoint `ckpt` holds."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return {key.removeprefix("model."): meta for key, meta in metadata.items() if key.startswith("model.")}


def check_base(ckpt: str | Path, base: dict, adapters: bool, named: str) -> None:
    """Refuse a base model other than the one checkpoint `ckpt` was trained from, by what its
    meta.json recorded ("base": `lensrl.models.load.base_identity` of the starting folder): another
    model_type always (its config.json would describe other weights); other weights of the same
    shapes when the checkpoint holds LoRA adapters (`adapters`), which only mean something on the
    weights they were trained on (a merge gives a model nobody trained, a resume trains on top of
    the wrong one). `base`: the identity of the folder offered, `named` how to name it. Checkpoints
    written before meta.json recorded a base, and bases without weights (shape names), pass."""
    ckpt = Path(ckpt)
    try:
        recorded = json.loads((ckpt / "meta.json").read_text()).get("base")
    except (OSError, ValueError):
        return  # load_checkpoint / lora_settings say what is wrong with the folder
    if not recorded:
        return
    if recorded.get("model_type") and base.get("model_type") and recorded["model_type"] != base["model_type"]:
        raise ConvertError(f"{ckpt} was trained from a {recorded['model_type']} model, and {named} is a "
                           f"{base['model_type']} model: name the model folder the run started from")
    if adapters and recorded.get("weights") and base.get("weights") and recorded["weights"] != base["weights"]:
        raise ConvertError(f"{ckpt} holds LoRA adapters trained on other base weights than {named}'s (weights "
                           f"fingerprint {recorded['weights']} when trained, {base['weights']} now): adapters only "
                           "mean something on the weights they were trained with; name that model folder "
                           "(the run's model.path)")


def lora_settings(ckpt: str | Path) -> LoraSettings | None:
    """The `LoraSettings` (rank, alpha, dropout, target_modules, vision_tower) checkpoint `ckpt`
    was trained with, or None when it is a full-parameter checkpoint (no `lora_A`/`lora_B`
    weights in its DCP index).

    Read from the checkpoint's meta.json ("lora", which lensrl writes with every LoRA checkpoint),
    else from `model.lora` of the run's config.yaml (`ckpt/../../config.yaml`) for checkpoints
    written before meta.json held them. Raises ConvertError when the checkpoint holds adapters and
    neither gives their settings (their scale alpha / rank is known from nowhere else).
    """
    from lensrl.config import LoraSettings

    ckpt = Path(ckpt)
    adapters = sorted(k for k in _stored_model_weights(ckpt) if _ADAPTER_KEY.match(k))
    if not adapters:
        return None
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{ckpt / 'meta.json'} cannot be read ({e}); the checkpoint is damaged") from None
    run_config = ckpt.parent.parent / "config.yaml"
    settings, source = meta.get("lora") if isinstance(meta, dict) else None, f"{ckpt / 'meta.json'} (\"lora\")"
    if not isinstance(settings, dict) and run_config.is_file():
        import yaml

        settings = ((yaml.safe_load(run_config.read_text()) or {}).get("model") or {}).get("lora")
        source = f"{run_config} (model.lora)"
    if not isinstance(settings, dict) or not settings.get("rank"):
        raise ConvertError(
            f"{ckpt} holds LoRA adapters ({adapters[0]}, ...) but neither {ckpt / 'meta.json'} (key \"lora\") nor "
            f"{run_config} (model.lora with rank > 0) gives their settings (rank, alpha, target_modules); convert "
            "the checkpoint where training wrote it, RUN/checkpoints/step_N beside the run's config.yaml"
        )
    known = {field.name for field in fields(LoraSettings)}
    lora = LoraSettings(**{k: v for k, v in settings.items() if k in known})
    if not (isinstance(lora.rank, int) and lora.rank > 0 and isinstance(lora.alpha, (int, float)) and lora.alpha > 0):
        raise ConvertError(f"{source}: expected rank > 0 and alpha > 0, got rank={lora.rank!r}, alpha={lora.alpha!r}")
    return lora


@dataclass
class _Adapter:
    module: str  # FQN of the adapted Linear
    a: str  # FQN of its lora_A weight in the checkpoint, (rank, in_features)
    b: str  # of its lora_B weight, (out_features, rank)
    a_shape: torch.Size
    b_shape: torch.Size
    dtype: torch.dtype

    def empty(self) -> dict[str, torch.Tensor]:
        """Empty tensors for `_dcp_load` to fill: {a: ..., b: ...}."""
        return {self.a: torch.empty(self.a_shape, dtype=self.dtype), self.b: torch.empty(self.b_shape, dtype=self.dtype)}

    def delta(self, loaded: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """scale * B @ A in fp32 (LoRA's weight update, as peft's `get_delta_weight` computes it)."""
        return (loaded[self.b].float() @ loaded[self.a].float()) * scale


def _plan_adapters(ckpt: Path, model: torch.nn.Module, lora: LoraSettings) -> list[_Adapter]:
    """Every adapter of LoRA checkpoint `ckpt`, checked against the Linear layers of base `model`
    (meta is fine) and the rank of `lora`."""
    stored = _stored_model_weights(ckpt)
    modules = dict(model.named_modules())
    found: dict[str, dict[str, tuple[str, Any]]] = defaultdict(dict)
    adapter_names, problems = set(), []
    for key, meta in stored.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            problems.append(f"{key} is not a LoRA adapter weight (a LoRA checkpoint holds lora_A/lora_B only)")
            continue
        found[match["module"]][match["part"]] = (key, meta)
        adapter_names.add(match["adapter"])
    if len(adapter_names) > 1:
        problems.append(f"it holds adapters of {len(adapter_names)} names ({', '.join(sorted(adapter_names))}); "
                        "lensrl trains one")
    adapters = []
    for module, parts in sorted(found.items()):
        linear = modules.get(module)
        if not isinstance(linear, torch.nn.Linear):
            problems.append(f"{module} (adapted) is not a Linear layer of the base model")
            continue
        if set(parts) != {"A", "B"}:
            problems.append(f"{module} has lora_{next(iter(parts))} but no lora_{'B' if 'A' in parts else 'A'}")
            continue
        (a, a_meta), (b, b_meta) = parts["A"], parts["B"]
        want_a, want_b = (lora.rank, linear.in_features), (linear.out_features, lora.rank)
        if tuple(a_meta.size) != want_a or tuple(b_meta.size) != want_b:
            problems.append(f"{module}: lora_A {tuple(a_meta.size)} and lora_B {tuple(b_meta.size)}, expected {want_a} "
                            f"and {want_b} (rank {lora.rank}, base Linear {linear.in_features} -> {linear.out_features})")
            continue
        adapters.append(_Adapter(module, a, b, torch.Size(a_meta.size), torch.Size(b_meta.size),
                                 a_meta.properties.dtype))
    if problems:
        raise ConvertError(
            f"LoRA checkpoint {ckpt} does not fit its base model and LoRA settings: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; pass the --base the run was "
            "trained from"
        )
    return adapters


class _BaseWeights:
    """The base folder's weights, read a few tensors at a time, by the names `save_pretrained`
    writes (`expected`: {name: (module FQN, shape)}).

    Streamed from its safetensors files when they hold every weight under that name and with that
    shape (a folder `save_pretrained` wrote; the Qwen2.5-VL and Qwen3-VL releases), so memory stays
    near one output shard. A folder in a layout transformers converts on load (the Qwen3-VL-MoE
    releases' transposed experts, older module names) is loaded whole by transformers instead, in
    fp32, once: memory is then the whole model.
    """

    def __init__(self, base_dir: Path, expected: dict[str, tuple[str, torch.Size]]):
        from safetensors import safe_open

        from lensrl.models.load import check_model_folder

        try:
            check_model_folder(base_dir)
        except FileNotFoundError as e:  # a shape name's weightless folder, a folder of pickles
            raise ConvertError(f"a LoRA checkpoint is merged into the base model's weights, and base model "
                               f"{base_dir} has none: {e}; pass --base with the model folder the run started "
                               "from, or --lora-format peft for the adapters alone") from None
        single, index = base_dir / "model.safetensors", base_dir / "model.safetensors.index.json"
        files = [single] if single.is_file() else sorted(
            {base_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        self.file_of: dict[str, Path] = {}
        header: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    self.file_of[key] = file
                    header[key] = (tuple(piece.get_shape()), piece.get_dtype())
        self.state: dict[str, torch.Tensor] | None = None
        self.source: dict[str, tuple[str, torch.dtype]] = {}  # name: (what `read` takes, stored dtype)
        if all(name in header and header[name][0] == tuple(shape) and header[name][1] in _SAFETENSORS_DTYPES
               for name, (_, shape) in expected.items()):
            self.source = {name: (name, _SAFETENSORS_DTYPES[header[name][1]]) for name in expected}
            return
        from lensrl.logging import console
        from lensrl.models.load import load_policy

        console.print(f"base model {base_dir} stores its weights in a layout transformers converts on load: "
                      "loading it whole (memory: the whole model in fp32)", soft_wrap=True)
        self.state = load_policy(base_dir, torch.float32)[0].state_dict()
        stored = _config_dtype(base_dir)
        self.source = {name: (fqn, stored if self.state[fqn].is_floating_point() else self.state[fqn].dtype)
                       for name, (fqn, _) in expected.items()}

    def read(self, sources: list[str]) -> dict[str, torch.Tensor]:
        """{source: tensor} of the given `source` names (`self.source`'s first items)."""
        if self.state is not None:
            return {s: self.state[s] for s in sources}
        from safetensors import safe_open

        out = {}
        for file in dict.fromkeys(self.file_of[s] for s in sources):  # each file opened once
            with safe_open(str(file), "pt") as f:
                out.update({s: f.get_tensor(s) for s in sources if self.file_of[s] == file})
        return out


def _config_dtype(base_dir: Path) -> torch.dtype:
    """The dtype config.json gives the weights (float32 when it names none)."""
    config = json.loads((base_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def _plan_merged(
    ckpt: Path, base_dir: Path, lora: LoraSettings, target_dtype: torch.dtype | None, expert_layout: str
) -> tuple[list[_Tensor], Callable[[list[_Tensor]], dict[str, torch.Tensor]]]:
    """(every weight to write, the loader of a shard's tensors) for LoRA checkpoint `ckpt`: the
    base folder's weights, W + (alpha / rank) * B @ A for each adapted Linear."""
    _, model = _meta_model(base_dir)
    adapters = {f"{a.module}.weight": a for a in _plan_adapters(ckpt, model, lora)}
    names = hf_weight_names(model)
    experts = stacked_experts(model) if expert_layout == "per_expert" else {}
    if expert_layout == "per_expert" and not experts:
        raise ConvertError(f"--expert-layout per_expert: base model {base_dir} has no mixture-of-experts layers, so "
                           "there is nothing to split; leave the option out")
    expected = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = defaultdict(list)  # tied weights share one parameter
    for fqn, tensor in expected.items():
        aliases[id(tensor)].append(fqn)
    base = _BaseWeights(base_dir, {name: (fqn, expected[fqn].shape) for name, fqn in names.items()})

    tensors: list[_Tensor] = []
    merge: dict[str, _Adapter] = {}  # source: the adapter merged into it
    for name, fqn in names.items():
        source, stored_dtype = base.source[name]
        tied = aliases[id(expected[fqn])]
        adapted = [adapters.pop(alias) for alias in tied if alias in adapters]
        if adapted and len(tied) > 1:
            others = [alias for alias in tied if alias != f"{adapted[0].module}.weight"]
            raise ConvertError(f"LoRA checkpoint {ckpt} adapts {adapted[0].module}, whose weight is tied to "
                               f"{', '.join(others)}; a merged folder cannot hold the two apart")
        if adapted:
            merge[source] = adapted[0]
        dtype = target_dtype if target_dtype is not None and stored_dtype.is_floating_point else stored_dtype
        tensor = _Tensor(name, source, expected[fqn].shape, stored_dtype, dtype)
        tensors.extend(_expert_pieces(tensor, experts[fqn]) if fqn in experts else [tensor])
    if adapters:  # adapted weights that save_pretrained does not write
        raise ConvertError(f"LoRA checkpoint {ckpt} adapts {', '.join(sorted(adapters)[:3])}, which the base model's "
                           "saved folder does not hold; lensrl convert cannot merge it")

    def load(shard: list[_Tensor]) -> dict[str, torch.Tensor]:
        sources = list(dict.fromkeys(t.source for t in shard))
        weights = base.read(sources)
        merged = [(s, merge[s]) for s in sources if s in merge]
        if merged:  # the adapters of this shard's weights, from the checkpoint
            loaded: dict[str, torch.Tensor] = {}
            for _, adapter in merged:
                loaded.update(adapter.empty())
            _dcp_load(ckpt, loaded)
            for source, adapter in merged:  # fp32 sum; `_Tensor.take` casts to the written dtype
                weights[source] = weights[source].float() + adapter.delta(loaded, lora.alpha / lora.rank)
        return weights

    return tensors, load


def _write_adapter(ckpt: Path, out: Path, adapters: list[_Adapter], lora: LoraSettings, base_dir: Path,
                   target_dtype: torch.dtype | None, progress: bool) -> None:
    """adapter_config.json + adapter_model.safetensors: the folder `PeftModel.from_pretrained(<base
    model>, out)` loads, as `lensrl.train.lora.save_adapter` writes it from a live model."""
    from safetensors.torch import save_file

    from lensrl.train.lora import target_regex

    try:
        from peft import LoraConfig
    except ImportError:
        raise ConvertError("--lora-format peft needs peft: pip install 'lensrl[lora]'") from None
    total = sum((a.a_shape.numel() + a.b_shape.numel()) * (target_dtype or a.dtype).itemsize for a in adapters)
    bar, task = _progress(total, 1) if progress else (None, None)
    with bar or nullcontext():
        if bar is not None:
            bar.update(task, description="adapters")
        loaded: dict[str, torch.Tensor] = {}
        for adapter in adapters:
            loaded.update(adapter.empty())
        _dcp_load(ckpt, loaded)
        weights = {}
        for adapter in adapters:  # peft's names: the adapter's own name ("default") left out
            for part, key in (("A", adapter.a), ("B", adapter.b)):
                value = loaded.pop(key)
                weights[f"base_model.model.{adapter.module}.lora_{part}.weight"] = \
                    value.to(target_dtype or value.dtype).contiguous()
        save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        if bar is not None:
            bar.update(task, advance=total)
    LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target_regex(lora),
               bias="none", base_model_name_or_path=str(base_dir)).save_pretrained(str(out))


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------


def _checkpoint_loader(ckpt: Path) -> Callable[[list[_Tensor]], dict[str, torch.Tensor]]:
    """A shard's stored tensors, {source: tensor}, read from checkpoint `ckpt`'s DCP files."""

    def load(shard: list[_Tensor]) -> dict[str, torch.Tensor]:
        loaded = {t.source: torch.empty(t.source_shape or t.shape, dtype=t.stored_dtype) for t in shard}
        _dcp_load(ckpt, loaded)
        return loaded

    return load


def _dcp_load(ckpt: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` ({module FQN: empty tensor}) with the model weights of checkpoint `ckpt`."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load({"model": tensors}, checkpoint_id=str(ckpt), no_dist=True)


def _write_weights(out: Path, shards: list[list[_Tensor]], load: Callable[[list[_Tensor]], dict[str, torch.Tensor]],
                   progress: bool) -> None:
    """Each shard's tensors, read by `load` ({source: tensor}), written as one safetensors file."""
    from safetensors.torch import save_file

    files = shard_names(len(shards))
    total = sum(t.nbytes for shard in shards for t in shard)
    bar, task = _progress(total, len(shards)) if progress else (None, None)
    with bar or nullcontext():
        for index, (file, shard) in enumerate(zip(files, shards), 1):
            if bar is not None:
                bar.update(task, description=f"shard {index}/{len(shards)}")
            loaded = load(shard)
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
