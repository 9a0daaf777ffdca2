"""Load a policy: a Hugging Face Qwen-VL folder (downloaded or tiny) or a named benchmark shape.

    model, processor = load_policy("runs/tiny_model")            # tiny or downloaded folder
    model, processor = load_policy("qwen2_5_vl_3b", torch.bfloat16, "cuda")  # random weights

Folders load with transformers' own classes (safetensors only, no remote code). Shapes are
built on the meta device and materialised directly on the target device in the target dtype,
so a 3B model appears on a GPU in about a second with no fp32 copy on the host.

A mixture-of-experts model (Qwen3-VL-MoE) loads unchanged, experts stacked as transformers stores
them, and runs its experts with transformers' grouped-GEMM kernel (`experts_implementation`
"grouped_mm": one `torch._grouped_mm` per projection over all experts) where torch has one for
the device, so no Python loop over the experts runs on a GPU (`use_grouped_experts`).

A damaged folder fails with `ModelError` (exit status 2 from the CLI) naming the folder, the file
and what is wrong: invalid JSON, an unsupported model_type, a truncated or non-safetensors weight
file, a shard the index lists but the folder lacks, weights missing or of the wrong shape.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from lensrl.models.errors import ModelError
from lensrl.models.processor import Processor
from lensrl.models.shapes import ARCHITECTURES, SHAPES, model_class, shape_config, shape_dir


def _how_to_get_one(path: Path) -> str:
    """Where a model folder comes from; a folder named after a Qwen release gets its own download line."""
    release = path.name if re.fullmatch(r"Qwen[\w.-]*-VL-[\w.-]+", path.name) else "Qwen2.5-VL-3B-Instruct"
    return ("create a tiny test model with `lensrl model tiny --out DIR`, download a Qwen-VL checkpoint "
            f"(e.g. `hf download Qwen/{release} --local-dir {path if release == path.name else 'DIR'}`), or name a "
            f"benchmark shape ({', '.join(SHAPES)})")


def detect_arch(path: str | Path) -> str:
    """The model_type ("qwen2_5_vl", "qwen3_vl" or "qwen3_vl_moe") of a model folder, from its config.json.

    Raises FileNotFoundError (saying how to get a model), or ModelError (a ValueError) for a
    config.json that is not a JSON object or names an unsupported architecture (saying what was
    found and what is supported).
    """
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist; {_how_to_get_one(path)}")
    if not config_path.is_file():
        if (path / "meta.json").is_file() or any(path.glob("*.distcp")):
            raise FileNotFoundError(f"{path} is a training checkpoint, not a Hugging Face model folder: make one "
                                    f"with `lensrl convert --ckpt {path} --out DIR`, or use the run's hf/ folder")
        if (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path} is a peft LoRA adapter folder (adapter_config.json), not a whole model: "
                                    "use the run's hf/ folder (adapters merged), or `lensrl convert --ckpt "
                                    "RUN/checkpoints/step_N --out DIR` for a merged folder")
        raise FileNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face model folder; {_how_to_get_one(path)}"
        )
    config = read_json(config_path, "the model's Hugging Face config (a JSON object with model_type)")
    if not isinstance(config, dict):
        raise ModelError(f"model folder {path}: config.json holds a JSON {type(config).__name__}, "
                         "expected an object with model_type")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type in ARCHITECTURES:
        return model_type
    for arch, class_name in ARCHITECTURES.items():  # older exports name only the class
        if class_name in architectures:
            return arch
    supported = ", ".join(f"{arch} ({name})" for arch, name in ARCHITECTURES.items())
    raise ModelError(
        f"model folder {path}: config.json: unsupported architecture: model_type={model_type!r}, "
        f"architectures={architectures}; lensrl supports {supported}"
    )


def read_json(path: Path, expected: str) -> object:
    """The parsed JSON file at `path`; ModelError naming the file, where the JSON breaks and
    `expected` (what the file should hold) when it is not valid JSON text."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"model folder {path.parent}: {path.name} is not valid JSON ({e.msg}: line "
                         f"{e.lineno} column {e.colno}); expected {expected}") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"model folder {path.parent}: {path.name} is not UTF-8 text (byte {e.start} is "
                         f"{e.object[e.start:e.start + 1]!r}); expected {expected}") from None


def load_policy(
    path_or_shape: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[PreTrainedModel, Processor]:
    """(model, processor) for a model folder or a shape name (see module doc).

    The model is in eval mode on `device` with parameters in `dtype`; `min_pixels`/`max_pixels`
    override the folder's image-resize bounds.

    A folder is checked before transformers reads it (`check_model_folder`), and what transformers
    reports after loading is checked too, so a damaged folder raises ModelError naming the folder,
    the file and what is wrong (never a bare traceback, never randomly initialised weights): an
    invalid JSON file, an unsupported model_type, a truncated or garbage *.safetensors, a shard
    the index lists but the folder lacks, a weight missing from the files or of the wrong shape.
    A missing folder or missing weights raise FileNotFoundError saying how to get a model.
    """
    name = str(path_or_shape)
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    if name in SHAPES and not Path(name).exists():
        model = build_random_model(shape_config(name), dtype, device)
        use_grouped_experts(model, device)
        model.lensrl_base = {"model_type": model.config.model_type, "weights": None}  # random: nothing to compare
        return model, Processor.from_pretrained(shape_dir(name), **pixels)
    folder = Path(name)
    arch = check_model_folder(folder)
    from safetensors import SafetensorError

    try:
        with _weights_progress(int(os.environ.get("RANK", "0")) == 0):
            model, info = model_class(arch).from_pretrained(
                name, dtype=dtype, trust_remote_code=False, use_safetensors=True,
                output_loading_info=True, ignore_mismatched_sizes=True,  # reported below, with the folder named
            )
    except SafetensorError as e:  # damage check_model_folder's header check does not see
        raise ModelError(f"model folder {folder}: a *.safetensors weight file cannot be read: {e}") from None
    _check_loading_info(folder, info)
    model = model.to(device).eval()
    use_grouped_experts(model, device)
    model.lensrl_base = base_identity(folder)  # what checkpoints record of their starting weights
    return model, Processor.from_pretrained(name, **pixels)


def base_identity(folder: str | Path) -> dict:
    """{"model_type", "weights"} of a model folder, which checkpoints record (meta.json "base") so
    that resuming LoRA adapters or merging them (`lensrl convert`) into other base weights of the
    same shapes is refused. "weights": a SHA-256 (16 hex digits) over every tensor's shape and its
    first values (up to 4,096 along the last dimension, at index 0 of the others), sorted, so it does
    not depend on the tensors' names (a folder in transformers' other layout has the same) and costs
    milliseconds to read; None for a folder without weights (a shape's config folder)."""
    import hashlib

    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return {"model_type": config.get("model_type"), "weights": None}
    parts = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                shape = list(piece.get_shape())
                values = piece[(*(slice(0, 1) for _ in shape[:-1]), slice(0, 4096))] if shape else f.get_tensor(key)
                parts.append(hashlib.sha256(f"{shape}".encode() + values.float().numpy().tobytes()).hexdigest())
    return {"model_type": config.get("model_type"), "weights": hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()[:16]}


@contextlib.contextmanager
def _weights_progress(show: bool) -> Iterator[None]:
    """transformers' own progress bar (with ETA) over the weights it loads, on the main rank only
    (the CLI turns transformers' bars off elsewhere)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def experts_implementation(device: str | torch.device) -> str:
    """The transformers experts kernel for `device`: "grouped_mm" where torch has a grouped GEMM for
    it (CUDA from compute capability 8.0, the CPU from torch 2.9), else "batched_mm" on CUDA (one
    batched matmul over each token's experts: no Python loop, more memory) and "eager" on a CPU
    (transformers' loop over the experts that got tokens)."""
    from transformers.utils.import_utils import is_torch_greater_or_equal

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "grouped_mm" if torch.cuda.get_device_capability(index) >= (8, 0) else "batched_mm"
    if device.type == "cpu":
        return "grouped_mm" if is_torch_greater_or_equal("2.9", accept_dev=True) else "eager"
    return "eager"


def use_grouped_experts(model: PreTrainedModel, device: str | torch.device) -> None:
    """Set a mixture-of-experts model's experts kernel for `device` (`experts_implementation`);
    a dense model is left as it is."""
    from lensrl.models.shapes import is_moe

    if is_moe(model.config):
        model.set_experts_implementation(experts_implementation(device))


# JSON files a model folder may hold, read by transformers or by lensrl's Processor
_JSON_FILES = {
    "generation_config.json": "transformers' generation settings (a JSON object)",
    "preprocessor_config.json": "the image processor's settings (a JSON object)",
    "tokenizer_config.json": "the tokenizer's settings (a JSON object)",
    "tokenizer.json": "a tokenizers tokenizer (a JSON object)",
    "chat_template.json": 'a JSON object with "chat_template"',
    "special_tokens_map.json": "a JSON object",
}

# bytes per element of each safetensors dtype (sub-byte float types are left out: not checked)
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


def check_model_folder(path: str | Path) -> str:
    """Check a model folder's files without loading any weight; return its architecture.

    config.json (`detect_arch`) and the other JSON files must parse; the weights must be
    safetensors: `model.safetensors`, or the shards `model.safetensors.index.json` lists (each
    present), each with a readable header whose tensors the file holds in full. Raises
    FileNotFoundError for a missing folder, config.json or weights, ModelError for damage; each
    message names the folder and the file.
    """
    path = Path(path)
    arch = detect_arch(path)
    for file_name, expected in _JSON_FILES.items():
        if (path / file_name).is_file():
            read_json(path / file_name, expected)
    for weights in _weight_files(path):
        check_safetensors(weights)
    return arch


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files transformers loads for `path`: model.safetensors, else every shard
    model.safetensors.index.json names (all of which must exist)."""
    single, index_path = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index_path.is_file():
        _require_safetensors(path)  # no *.safetensors at all: say how to get a model
        found = ", ".join(sorted(p.name for p in path.glob("*.safetensors")))
        raise ModelError(f"model folder {path}: has no model.safetensors or model.safetensors.index.json "
                         f"(found {found}); expected the weights of a Hugging Face model folder")
    index = read_json(index_path, 'a JSON object whose "weight_map" maps each weight to its shard file')
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"model folder {path}: model.safetensors.index.json has no \"weight_map\"; expected "
                         "a JSON object whose weight_map maps each weight to its shard file")
    shards: dict[str, int] = {}
    for shard in weight_map.values():
        shards[str(shard)] = shards.get(str(shard), 0) + 1
    missing = [name for name in shards if not (path / name).is_file()]
    if missing:
        listed = ", ".join(f"{name} ({shards[name]} weights)" for name in missing)
        raise ModelError(
            f"model folder {path}: model.safetensors.index.json lists {len(shards)} shard files, "
            f"{len(missing)} of them missing: {listed}; copy or download the complete folder"
        )
    return [path / name for name in shards]


def check_safetensors(file: Path) -> None:
    """ModelError unless `file` is a complete safetensors file: an 8-byte header length, a JSON
    header of tensors (dtype, shape, data_offsets) whose byte ranges match their shapes, and exactly
    the tensor data the header describes (a truncated download or copy holds less)."""
    where = f"model folder {file.parent}: {file.name}"
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{where} is {size} bytes, too short for a safetensors file (an 8-byte header "
                             "length, a JSON header, then the tensor data); re-download or re-convert it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise ModelError(
                f"{where} is not a safetensors file: its first 8 bytes give a header of {header_len:,} "
                f"bytes but the file has {size:,} (damaged, truncated or not safetensors); re-download or "
                "re-convert it"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError(f"a JSON {type(header).__name__}")
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{where} is not a safetensors file: its {header_len:,}-byte header is not a JSON "
                         f"object ({e}); damaged or not safetensors: re-download or re-convert it") from None
    data_len = size - 8 - header_len
    end_of_data = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{where}: the header entry of {name!r} is not a tensor (dtype, shape, "
                             f"data_offsets): {entry!r}; damaged: re-download or re-convert it") from None
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if begin > end or (itemsize is not None and end - begin != math.prod(shape) * itemsize):
            raise ModelError(f"{where}: tensor {name!r} ({dtype}, shape {shape}) has data_offsets "
                             f"[{begin}, {end}], which do not hold its {math.prod(shape)} elements; damaged: "
                             "re-download or re-convert it")
        end_of_data = max(end_of_data, end)
    if end_of_data > data_len:
        raise ModelError(
            f"{where} is truncated: its header describes {end_of_data:,} bytes of tensor data, the file "
            f"holds {data_len:,} (the file is {size:,} bytes, expected {8 + header_len + end_of_data:,}); "
            "re-download or re-convert it"
        )
    if end_of_data < data_len:
        raise ModelError(f"{where} has {data_len - end_of_data:,} bytes after the tensor data its header "
                         "describes (damaged or not safetensors); re-download or re-convert it")


def _check_loading_info(folder: Path, info: dict) -> None:
    """ModelError for weights transformers would leave randomly initialised: missing from the
    folder's weight files, or stored with another shape than config.json gives."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    files = ", ".join(p.name for p in _weight_files(folder))

    def first_five(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    per_expert = [k for k in info.get("unexpected_keys") or [] if re.search(r"\.experts\.\d+\.", k)]
    if per_expert and any(".experts." in k for k in missing):
        raise ModelError(
            f"model folder {folder} stores its experts one per expert ({per_expert[0]}, ...): the per-expert layout "
            "that `lensrl convert --expert-layout per_expert` writes for older loaders; this transformers reads "
            "stacked experts and would leave them randomly initialised. Convert the checkpoint again with "
            "--expert-layout stacked (the default)"
        )
    if missing:
        raise ModelError(
            f"model folder {folder}: {_count(len(missing), 'weight')} that config.json's architecture needs "
            f"{'is' if len(missing) == 1 else 'are'} in none of its weight files ({files}): "
            f"{first_five(missing)}; the files are incomplete or belong to another config"
        )
    if mismatched:
        shown = [f"{name} (stored {tuple(stored)}, config.json gives {tuple(wanted)})"
                 for name, stored, wanted in mismatched]
        raise ModelError(
            f"model folder {folder}: {_count(len(mismatched), 'weight')} in its weight files ({files}) "
            f"{'has' if len(mismatched) == 1 else 'have'} another shape than config.json gives: "
            f"{first_five(shown)}; the files belong to another config"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE `*ForConditionalGeneration`."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def active_parameters(model: nn.Module, requires_grad: bool | None = None) -> int:
    """Parameters one token's forward uses: all of them for a dense model; for a mixture of
    experts, the stacked expert weights count top_k / num_experts of their size (every token runs
    K of the E experts of each sparse layer). Tied weights count once; under FSDP each parameter
    counts at its full (unsharded) size. The N of MFU's 6 x N x tokens. `requires_grad` True or
    False counts only the trained or only the frozen parameters (LoRA's base is frozen)."""
    def counted(p: nn.Parameter) -> bool:
        return requires_grad is None or p.requires_grad == requires_grad

    total = sum(p.numel() for p in model.parameters() if counted(p))
    text = model.config.get_text_config()
    num_experts = getattr(text, "num_experts", 0) or 0
    if not num_experts:
        return total
    experts = sum(p.numel() for layer in language_model(model).layers
                  if hasattr(layer.mlp, "experts") for p in layer.mlp.experts.parameters() if counted(p))
    return total - experts + experts * text.num_experts_per_tok // num_experts


def update_flops_per_token(model: nn.Module) -> int:
    """FLOPs of one token through the update's forward and backward, the numerator of
    `perf/mfu/actor` (per token; multiply by tokens and epochs). A trained weight costs 6 per
    parameter (forward 2, input gradient 2, weight gradient 2: the 6N of Kaplan et al. 2020 and
    verl's flops counter); a frozen one 4, since no weight gradient is formed (LoRA's base). That
    is an upper bound where nothing before a frozen block trains (a frozen vision tower needs no
    backward at all); recomputation under gradient checkpointing is not counted, as is usual for MFU.
    MoE experts count at their active share (`active_parameters`)."""
    return 6 * active_parameters(model, requires_grad=True) + 4 * active_parameters(model, requires_grad=False)


def model_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(vision blocks, decoder layers): the repeated units FSDP shards and torch.compile compiles."""
    return list(model.model.visual.blocks), list(language_model(model).layers)


def set_gradient_checkpointing(model: nn.Module, scope: str = "all") -> None:
    """Turn on activation checkpointing (non-reentrant, transformers' own) for `scope`: "all", every
    vision block and decoder layer; "vision", the vision blocks only, so the decoder layers keep
    their activations for the backward instead of recomputing their forward (the recompute is a
    third of a layer's forward+backward FLOPs). ValueError for another scope."""
    if scope not in ("all", "vision"):
        raise ValueError(f"gradient checkpointing scope must be 'all' or 'vision', got {scope!r}")
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5.2x
    if enable is not None and "activation_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also hooks the input embeddings (the vision tower's patch embedding too) so that
    # their outputs require grad, which only reentrant checkpointing needs; with a frozen vision
    # tower (freeze_vision_tower, LoRA on the language model) it made every backward run through
    # the whole tower and recompute it, for gradients nothing uses
    if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    if scope == "vision":
        for layer in model_blocks(model)[1]:
            layer.gradient_checkpointing = False


def build_random_model(
    config,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    std: float = 0.02,
) -> PreTrainedModel:
    """A model for `config` with normal(0, std) weights made directly on `device` in `dtype`.

    Parameters are created on the meta device (no memory, no init), then each is allocated on
    `device` and initialised there: linear/conv/embedding weights normal(0, std), biases 0, norm
    weights 1. Buffers (rotary frequencies) are computed for real while building, as the model
    itself computes them, and moved to `device` unchanged.
    """
    device = torch.device(device)
    with _parameters_on_meta():
        model = model_class(config.model_type)(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    materialised: dict[int, nn.Parameter] = {}  # id(meta param) -> real param: keeps tied weights tied
    for module in model.modules():
        for param_name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in materialised:
                materialised[id(param)] = nn.Parameter(
                    _random_like(param, param_name, dtype, device, generator, std),
                    requires_grad=param.requires_grad,
                )
            module._parameters[param_name] = materialised[id(param)]
    for module in model.modules():
        for buffer_name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[buffer_name] = buffer.to(device)
    config.dtype = dtype
    return model.eval()


def _random_like(
    param: torch.Tensor,
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    std: float,
) -> torch.Tensor:
    dtype = dtype if param.dtype.is_floating_point else param.dtype
    tensor = torch.empty(param.shape, dtype=dtype, device=device)
    if name == "bias":
        return tensor.zero_()
    if param.ndim == 1:  # RMSNorm / LayerNorm weights
        return tensor.fill_(1.0)
    return tensor.normal_(0.0, std, generator=generator)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device; buffers stay real.

    Each layer's parameter is allocated and moved to meta right away, so the host never holds more
    than one layer's worth (accelerate's `init_empty_weights(include_buffers=False)` trick).
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _require_safetensors(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    detail = f" (found {', '.join(found)}; lensrl does not load pickled weights)" if found else ""
    raise FileNotFoundError(f"{path} has no *.safetensors weights{detail}; {_how_to_get_one(path)}")
