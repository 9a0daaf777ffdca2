"""Rows (parquet, jsonl, json, cached hub datasets: `sources.py`) -> `Sample`s, validated before
the first step, with images left encoded.

    dataset = load_dataset(cfg.train_files, cfg, "train", length_fn=prompt_length)
    sampler = BatchSampler(len(dataset), batch_size=16, seed=cfg.seed)
    batch = [dataset[i] for i in sampler.next_batch()]

The text columns are read into Python once (and checked: columns, choices, answers,
placeholder counts, prompt lengths); the image columns stay in Arrow buffers, and a row's
images become Python bytes only when that row is indexed. Decoding happens in
`ImageSource.load()`, when a batch needs the pixels.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lensrl.config import DataConfig
from lensrl.data import prompts
from lensrl.data.sample import DataError, ImageSource, Sample
from lensrl.data.sources import Source, resolve_sources

# How lensrl writes images: the Hugging Face `datasets` Image feature's storage type.
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
IMAGE_LIST_TYPE = pa.list_(IMAGE_TYPE)


def image_struct(value: Any, base_dir: str | None = None, where: str = "") -> dict[str, Any]:
    """One image (bytes, `{bytes, path}` struct, base64 string or file path) as a self-contained
    `{bytes, path}` struct: files are read in, so the result no longer depends on `base_dir`."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"bytes": bytes(value["bytes"]), "path": value.get("path")}
        if value.get("path"):
            return {"bytes": image_struct(value["path"], base_dir, where)["bytes"], "path": value["path"]}
        raise DataError(f"{prefix}image struct has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, str):
        path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
        if len(value) < 4096 and os.path.isfile(path):
            return {"bytes": Path(path).read_bytes(), "path": os.path.basename(value)}
        data = value.split(",", 1)[1] if value.startswith("data:image") else value
        try:
            return {"bytes": base64.b64decode(data, validate=True), "path": None}
        except (binascii.Error, ValueError):
            pass
    raise DataError(
        f"{prefix}cannot read image value {str(value)[:80]!r} (type {type(value).__name__}); expected "
        "bytes, a {bytes, path} struct, base64 string or an existing file path"
    )


@dataclass
class _Table:
    """One parquet file's image columns, kept as Arrow arrays (encoded bytes, not Python objects)."""

    path: str  # the source's name: a file path, or `id@split (file)` for a hub dataset
    images: dict[str, pa.ChunkedArray]  # image key -> column, one image or a list of images per row
    is_list: dict[str, bool]
    base_dir: str  # relative image paths resolve against this folder


@dataclass
class _Row:
    """A validated row: its text is final; its images are read from the table when indexed."""

    table: int  # index into PromptDataset._tables
    row: int  # row index within that file
    prompt: str
    answer: str
    target: str
    choices: list[str] | None
    id: Any = None
    columns: dict[str, Any] | None = None  # the row's other non-image columns (for reward functions)


class PromptDataset:
    """Validated rows of one split. `dataset[i]` builds a `Sample` whose images are still encoded."""

    def __init__(self, tables: list[_Table], rows: list[_Row], cfg: DataConfig, split_name: str, stats: dict):
        self._tables = tables
        self._rows = rows
        self._image_keys = list(cfg.image_keys)
        self._system_prompt = cfg.system_prompt
        self._max_prompt_length = cfg.max_prompt_length
        self.split_name = split_name
        self.files = [t.path for t in tables]
        self.stats = stats

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Sample:
        return self._sample(self._rows[index])

    def _sample(self, entry: _Row) -> Sample:
        table = self._tables[entry.table]
        meta: dict[str, Any] = {"source": table.path, "row": entry.row, "split": self.split_name}
        if entry.id is not None:
            meta["id"] = entry.id
        if entry.columns:
            meta["columns"] = entry.columns
        return Sample(
            prompt=entry.prompt,
            images=_row_images(table, entry.row, self._image_keys),
            answer=entry.answer,
            choices=list(entry.choices) if entry.choices is not None else None,
            system_prompt=self._system_prompt,
            target=entry.target,
            meta=meta,
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def batch(self, indices: list[int]) -> list[Sample]:
        return [self[i] for i in indices]

    def summary(self) -> str:
        s = self.stats
        text = f"{self.split_name}: {len(self)} rows from {len(self.files)} file(s) ({s['rows_read']} read"
        if s["skipped_bad"]:
            by_reason: dict[tuple[str, str], list[int]] = {}
            for path, row, reason in s["skipped_rows"]:
                by_reason.setdefault((reason, path), []).append(row)
            named = "; ".join(f"{path} rows {', '.join(map(str, rows))} ({reason})"
                              for (reason, path), rows in by_reason.items())
            text += f", {s['skipped_bad']} skipped as bad: {named}"
        if s["filtered_overlong"]:
            text += f", {s['filtered_overlong']} dropped as longer than {self._max_prompt_length} tokens"
        return text + ")"


def load_dataset(
    paths: list[str] | str,
    cfg: DataConfig,
    split_name: str = "train",
    length_fn: Callable[[Sample], int] | None = None,
    progress: bool = False,
) -> PromptDataset:
    """Read files, folders or cached hub datasets (`sources.resolve_sources`) into a validated
    `PromptDataset`.

    Checks, all before training starts: every configured column exists; multiple-choice columns
    parse; each prompt's `<image>` count matches its images (when it has any placeholder); with
    `cfg.skip_bad_rows`, every row lensrl cannot process (an image that does not decode, a
    placeholder/image count mismatch, an image the processor rejects) is dropped and named in the
    summary instead of stopping the run; with `length_fn` (Sample -> prompt tokens, image tokens
    included), prompts over `cfg.max_prompt_length` are dropped and counted
    (`cfg.filter_overlong_prompts`) or raise an error naming the row.
    """
    sources = resolve_sources(paths, split_name)
    files = [source.name for source in sources]
    stats: dict[str, Any] = {"rows_read": 0, "skipped_bad": 0, "filtered_overlong": 0, "skipped_rows": []}
    tables: list[_Table] = []
    rows: list[_Row] = []
    for source in sources:
        table, file_rows, read = _read_file(source, cfg, len(tables), stats["skipped_rows"])
        tables.append(table)
        stats["rows_read"] += read
        rows += file_rows
    dataset = PromptDataset(tables, rows, cfg, split_name, stats)

    if cfg.skip_bad_rows:  # decodes every image, so only when asked
        good = []
        for entry in rows:
            if all(_decodes(image) for image in dataset._sample(entry).images):
                good.append(entry)
            else:
                stats["skipped_rows"].append((tables[entry.table].path, entry.row, "an image does not decode"))
        rows = good

    if length_fn is not None:
        short, skipped_before = [], len(stats["skipped_rows"])
        for entry in _scanning(rows, f"[{split_name}] measuring prompts", progress):
            try:
                length = length_fn(dataset._sample(entry))
            except DataError as e:  # e.g. an image of an aspect ratio the processor rejects
                if not cfg.skip_bad_rows:
                    raise
                stats["skipped_rows"].append((tables[entry.table].path, entry.row, str(e).rsplit(": ", 1)[-1]))
                continue
            if length <= cfg.max_prompt_length:
                short.append(entry)
            elif not cfg.filter_overlong_prompts:
                raise DataError(
                    f"{tables[entry.table].path} row {entry.row}: prompt is {length} tokens (images "
                    f"included), longer than data.max_prompt_length={cfg.max_prompt_length}; raise "
                    "data.max_prompt_length or set data.filter_overlong_prompts=true to drop such rows"
                )
        stats["filtered_overlong"] = len(rows) - len(short) - (len(stats["skipped_rows"]) - skipped_before)
        rows = short
    stats["skipped_bad"] = len(stats["skipped_rows"])

    dataset._rows = rows
    if not rows:
        raise DataError(f"{split_name} data {files} has no usable rows ({dataset.summary()})")
    return dataset


def _read_file(source: Source, cfg: DataConfig, table_index: int,
               skipped: list[tuple[str, int, str]]) -> tuple[_Table, list[_Row], int]:
    """One source's validated rows (and the number read); with `cfg.skip_bad_rows` a row that
    fails a check is appended to `skipped` as (name, row, reason) instead of raising."""
    path = source.name
    schema = source.schema()
    keys = {"data.prompt_key": cfg.prompt_key, "data.answer_key": cfg.answer_key}
    if cfg.choice_key:
        keys["data.choice_key"] = cfg.choice_key
    keys.update({f"data.image_keys[{i}]": key for i, key in enumerate(cfg.image_keys)})
    for setting, key in keys.items():
        if key not in schema.names:
            raise DataError(
                f"{path}: column '{key}' ({setting}) not found; columns present: {', '.join(schema.names)}. "
                f"Set {setting} to the column that holds it."
            )
    columns = list(dict.fromkeys([*keys.values(), *(["id"] if "id" in schema.names else [])]))
    # every other column that holds no image bytes travels with the row, for reward functions
    extra = [f.name for f in schema if f.name not in columns and not _holds_binary(f.type)]
    table = source.read(columns + extra)
    extra_values = {name: table.column(name).to_pylist() for name in extra}

    images: dict[str, pa.ChunkedArray] = {}
    is_list: dict[str, bool] = {}
    num_images = np.zeros(table.num_rows, dtype=np.int64)
    for key in cfg.image_keys:
        column = table.column(key)
        images[key] = column
        is_list[key] = _is_list_type(column.type)
        if is_list[key]:
            counts = pc.fill_null(pc.list_value_length(column), 0)
        else:
            counts = pc.cast(column.is_valid(), pa.int64())
        num_images += counts.to_numpy(zero_copy_only=False)

    questions = table.column(cfg.prompt_key).to_pylist()
    answers = table.column(cfg.answer_key).to_pylist()
    all_choices = table.column(cfg.choice_key).to_pylist() if cfg.choice_key else None
    ids = table.column("id").to_pylist() if "id" in table.column_names else None

    rows = []
    for row in range(table.num_rows):
        where = f"{path} row {row}"
        question, answer = questions[row], answers[row]
        if not isinstance(question, str):
            raise DataError(
                f"{where}: prompt column '{cfg.prompt_key}' holds {question!r}, expected a string"
            )
        if answer is None:
            raise DataError(f"{where}: answer column '{cfg.answer_key}' is empty")
        if all_choices is not None:
            choices = prompts.parse_choices(all_choices[row], where)
            index = prompts.answer_index(answer, choices, where)
            prompt = prompts.format_choices(question, choices)
            answer_text = prompts.index_to_letter(index)
            target = prompts.choice_target(index, choices)
        else:
            choices = None
            prompt = question
            answer_text = prompts.unwrap_boxed(answer if isinstance(answer, str) else json.dumps(answer))
            target = cfg.answer_template.format(answer=answer_text)
        prompt = prompts.append_instruction(prompt, cfg.instruction)
        num_placeholders = prompts.count_placeholders(prompt)
        if num_placeholders and num_placeholders != num_images[row]:
            if cfg.skip_bad_rows:
                skipped.append((path, row, f"{num_placeholders} '<image>' placeholder(s), {num_images[row]} image(s)"))
                continue
            raise DataError(
                f"{where}: the prompt has {num_placeholders} '<image>' placeholder(s) but the row has "
                f"{num_images[row]} image(s) in column(s) {', '.join(cfg.image_keys)}; each placeholder "
                "marks one image (a prompt without placeholders gets its images before the text)"
            )
        rows.append(_Row(table_index, row, prompt, answer_text, target, choices, ids[row] if ids else None,
                         {name: values[row] for name, values in extra_values.items()} or None))
    return _Table(path, images, is_list, source.base_dir), rows, table.num_rows


def _scanning(rows: list, description: str, show: bool):
    """`rows`, with a progress bar (rich, with ETA) when `show` and the scan is long."""
    if not show or len(rows) < 2000:
        return rows
    from rich.progress import track

    from lensrl.logging import console

    return track(rows, description=description, transient=True, console=console)


def _holds_binary(type_: pa.DataType) -> bool:
    """Whether an Arrow type holds bytes anywhere (image columns, structs or lists of them)."""
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_):
        return True
    if pa.types.is_struct(type_):
        return any(_holds_binary(type_.field(i).type) for i in range(type_.num_fields))
    if _is_list_type(type_):
        return _holds_binary(type_.value_type)
    return False


def _is_list_type(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)


def _row_images(table: _Table, row: int, image_keys: list[str]) -> list[ImageSource]:
    """The row's images in column order, converted from Arrow to Python only now."""
    base_dir = table.base_dir
    sources = []
    for key in image_keys:
        value = table.images[key][row].as_py()
        values = (value or []) if table.is_list[key] else ([] if value is None else [value])
        for i, data in enumerate(values):
            origin = f"{table.path} row {row} column '{key}'[{i}]"
            sources.append(ImageSource(data, origin=origin, base_dir=base_dir))
    return sources


def _decodes(image: ImageSource) -> bool:
    """Whether an image decodes, pixels and all (a header check passes a truncated JPEG). Run only
    with data.skip_bad_rows, which asks for it."""
    try:
        image.load()
        return True
    except DataError:
        return False


class BatchSampler:
    """Batches of dataset indices: a seeded permutation per epoch, resumable mid-epoch.

    Epoch `e` uses the permutation seeded by `seed + e`, so a run resumed from `state_dict()`
    continues with exactly the batches it would have seen.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_items < 1 or (drop_last and num_items < batch_size):
            raise ValueError(
                f"the dataset has {num_items} rows, fewer than one batch of {batch_size}; "
                "use a smaller batch size or more data"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # batches already taken from the current epoch
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    def next_batch(self) -> list[int]:
        """The next batch of indices; moves to a freshly shuffled epoch when one is used up."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        start = self.position * self.batch_size
        self.position += 1
        return self._order[start : start + self.batch_size].tolist()

    def iter_once(self) -> Iterator[list[int]]:
        """One pass over the epoch-0 order (in order when shuffle is off), e.g. for a test set.

        Independent of `next_batch`'s position.
        """
        order = self._epoch_order(0)
        for b in range(self.batches_per_epoch):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_items", "batch_size", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}: resuming would not continue the same order"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_items)


class SplitWriter:
    """Streams tables into `out_dir/{split}.parquet`, one file per split.

    Files are written under a temporary name and moved into place only when the `with` block
    ends without an error, so a failed conversion leaves no half-written split behind.
    """

    def __init__(self, out_dir: str | os.PathLike, schema: pa.Schema):
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.counts: dict[str, int] = {}
        self._writers: dict[str, pq.ParquetWriter] = {}

    def write(self, split: str, table: pa.Table) -> None:
        if split not in self._writers:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._writers[split] = pq.ParquetWriter(self._temporary(split), self.schema)
            self.counts[split] = 0
        self._writers[split].write_table(table.cast(self.schema))
        self.counts[split] += table.num_rows

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        for writer in self._writers.values():
            writer.close()
        for split in self._writers:
            if error_type is None:
                os.replace(self._temporary(split), self.out_dir / f"{split}.parquet")
            else:
                os.remove(self._temporary(split))

    def _temporary(self, split: str) -> Path:
        return self.out_dir / f".{split}.parquet.tmp"
