"""Rows (parquet, jsonl, json, cached hub datasets: `sources.py`) -> `Sample`s, validated before
the first step, with images left encoded.

    dataset = load_dataset(cfg.train_files, cfg, "train", length_fn=prompt_length)
    sampler = BatchSampler.from_dataset(dataset, batch_size=16, seed=cfg.seed)
    samples, prompts = process_rows(dataset, sampler, sampler.next_batch(), range(16), processor)

The text columns are read into Python once (and checked: columns, choices, answers,
placeholder counts, prompt lengths); the image columns stay in Arrow buffers, and a row's
images become Python bytes only when that row is indexed. Decoding happens in
`ImageSource.load()`, when a batch needs the pixels.

Each row keeps a stable id, its place among all rows read from the sources (skipped ones
included): the sampler orders and saves positions by these ids, so a run resumed with another
set of rows skipped continues where it stopped.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    first_id: int = 0  # stable id of the file's row 0: rows read from the sources before it


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
    """Validated rows of one split. `dataset[i]` builds a `Sample` whose images are still encoded;
    `row_id(i)` is the row's stable id, which does not move when other rows are skipped."""

    def __init__(self, tables: list[_Table], rows: list[_Row], cfg: DataConfig, split_name: str, stats: dict):
        self._tables = tables
        self._rows = rows
        self._image_keys = list(cfg.image_keys)
        self._system_prompt = cfg.system_prompt
        self._max_prompt_length = cfg.max_prompt_length
        self.split_name = split_name
        self.files = [t.path for t in tables]
        self.stats = stats
        self.bad_row_ids: set[int] = set()  # stable ids of the rows skipped as bad while loading

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_ids(self) -> int:
        """Rows read from the sources, skipped ones included: stable ids run 0 .. num_ids - 1."""
        return int(self.stats["rows_read"])

    def row_id(self, index: int) -> int:
        """The stable id of `dataset[index]`: its row's place among all rows read from the sources
        (file order, then row order), the same whichever other rows are skipped or filtered."""
        entry = self._rows[index]
        return self._tables[entry.table].first_id + entry.row

    @property
    def row_ids(self) -> np.ndarray:
        """(len(self),) int64: the stable id of every row, in index order (increasing)."""
        first = np.array([t.first_id for t in self._tables], dtype=np.int64)
        return np.array([first[r.table] + r.row for r in self._rows], dtype=np.int64).reshape(-1)

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

    Every row keeps its stable id (`PromptDataset.row_ids`: its place among all rows read, the
    dropped ones included); the ids of the rows skipped as bad are in `bad_row_ids`.
    """
    sources = resolve_sources(paths, split_name)
    files = [source.name for source in sources]
    stats: dict[str, Any] = {"rows_read": 0, "skipped_bad": 0, "filtered_overlong": 0, "skipped_rows": []}
    tables: list[_Table] = []
    rows: list[_Row] = []
    bad_ids: set[int] = set()
    for source in sources:
        before = len(stats["skipped_rows"])
        table, file_rows, read = _read_file(source, cfg, len(tables), stats["skipped_rows"])
        table.first_id = stats["rows_read"]
        bad_ids.update(table.first_id + row for _, row, _ in stats["skipped_rows"][before:])
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
                bad_ids.add(tables[entry.table].first_id + entry.row)
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
                bad_ids.add(tables[entry.table].first_id + entry.row)
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
    dataset.bad_row_ids = bad_ids
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
    from lensrl.logging import progress_bar

    def tracked():
        with progress_bar(description, len(rows)) as advance:
            for row in rows:
                yield row
                advance(1)

    return tracked()


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
    """Batches of dataset indices from a seeded permutation of the rows' stable ids, one per epoch;
    resumable mid-epoch, also when another set of rows is skipped than when the state was saved.

    Epoch `e` walks the permutation of all ids `0 .. num_ids - 1` seeded by `seed + e` (ids in
    order when shuffle is off) and takes the ids present in this run, `batch_size` at a time; with
    `drop_last`, the rows left at the end of an epoch that do not fill a batch sit that epoch out.
    The saved position is a place in that walk, so a resumed run takes exactly the batches it
    would have seen; rows that are skipped now are left out and the others keep their order. With
    every row present (ids = indices) the order is the one earlier lensrl versions drew.

    row_ids: (num_items,) the stable id of each dataset index (`PromptDataset.row_ids`); default
    `0 .. num_items - 1`. num_ids: size of the id space (`PromptDataset.num_ids`). bad_ids: ids
    the data loader skipped as bad, counted by `num_skipped`.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True,
        row_ids: Sequence[int] | np.ndarray | None = None, num_ids: int | None = None,
        bad_ids: Iterable[int] = (),
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_items < 1 or (drop_last and num_items < batch_size):
            raise ValueError(
                f"the dataset has {num_items} rows, fewer than one batch of {batch_size}; "
                "use a smaller batch size or more data"
            )
        ids = np.arange(num_items, dtype=np.int64) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
        num_ids = int(ids.max()) + 1 if num_ids is None else int(num_ids)
        if len(ids) != num_items or ids.min() < 0 or ids.max() >= num_ids or len(np.unique(ids)) != num_items:
            raise ValueError(f"row_ids must be {num_items} distinct ids in 0 .. {num_ids - 1}")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_ids = num_ids
        self.row_ids = ids
        self._index = np.full(num_ids, -1, dtype=np.int64)  # stable id -> dataset index (-1: not in this run)
        self._index[ids] = np.arange(num_items)
        self._present = self._index >= 0  # ids sampled from: in this run and not skipped since
        self.num_items = num_items  # rows sampled from (the dataset's, less those skipped in training)
        self.skipped: list[int] = []  # stable ids skipped during training (`skip`), kept in the state
        self.bad_ids = {int(i) for i in bad_ids}
        self.resume_note: str | None = None  # what load_state_dict found changed in the data, if anything
        self._start_epoch(0)

    @classmethod
    def from_dataset(cls, dataset: PromptDataset, batch_size: int, seed: int, shuffle: bool = True,
                     drop_last: bool = True) -> BatchSampler:
        """The sampler of a loaded dataset, ordered by its stable row ids (see the class)."""
        return cls(len(dataset), batch_size, seed, shuffle, drop_last, row_ids=dataset.row_ids,
                   num_ids=dataset.num_ids, bad_ids=dataset.bad_row_ids)

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    @property
    def num_skipped(self) -> int:
        """Rows skipped as bad so far: by the data loader (`bad_ids`) or during training (`skip`),
        each counted once, those of earlier runs that this state was resumed from included."""
        return len(self.bad_ids | set(self.skipped))

    def next_batch(self) -> list[int]:
        """The next `batch_size` dataset indices; moves to a freshly shuffled epoch when the current
        one has too few rows left. Raises DataError when training has skipped so many rows that
        not one batch is left."""
        upcoming = self._upcoming()
        if len(upcoming) < (self.batch_size if self.drop_last else 1):
            self._start_epoch(self.epoch + 1)
            upcoming = self._upcoming()
            if len(upcoming) < (self.batch_size if self.drop_last else 1):
                raise DataError(f"only {self.num_items} training rows are left ({len(self.skipped)} skipped as "
                                f"bad during training), fewer than one batch of {self.batch_size}")
        self.position += 1
        return self._take(upcoming[: self.batch_size])

    def refill(self, count: int) -> list[int]:
        """`count` more dataset indices from where the walk stands (into the next epoch when this
        one runs out), to stand in for rows of a batch that turned out bad. Raises DataError when
        no row is left."""
        out: list[int] = []
        while len(out) < count:
            upcoming = self._upcoming()
            if not len(upcoming):
                if not self.num_items:
                    raise DataError(f"every training row has been skipped as bad ({len(self.skipped)} during "
                                    "training); nothing is left to train on")
                self._start_epoch(self.epoch + 1)
                continue
            out += self._take(upcoming[: count - len(out)])
        return out

    def skip(self, indices: Iterable[int]) -> list[int]:
        """Leave the rows at these dataset indices out of every later batch (rows that failed
        during training); they are counted in `num_skipped` and kept in `state_dict()`. Returns
        their stable ids."""
        ids = []
        for index in indices:
            row_id = int(self.row_ids[index])
            if self._present[row_id]:
                self._present[row_id] = False
                self.num_items -= 1
                self.skipped.append(row_id)
            ids.append(row_id)
        return ids

    def iter_once(self) -> Iterator[list[int]]:
        """One pass over the epoch-0 order (in order when shuffle is off), e.g. for a test set.

        Independent of `next_batch`'s position.
        """
        order = self._epoch_sequence(0)
        indices = self._index[order[self._present[order]]]
        for b in range(self.batches_per_epoch):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        """The position as plain Python values: epoch; `cursor`, the place in the epoch's
        permutation of ids (or `remaining`, the epoch's ids still to come, when the epoch's order
        came from an older state); `absent`, the ids this run does not sample from; `skipped`, the
        ids skipped during training. `position` (batches taken this epoch) and `num_items` keep
        the keys of the older format."""
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_ids": self.num_ids,
            "absent": np.flatnonzero(~self._present).tolist(),
            "skipped": list(self.skipped),
        }
        if self._explicit:
            state["remaining"] = self._sequence[self.cursor :].tolist()
        else:
            state["cursor"] = self.cursor
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s position, in this run's set of rows: rows absent now are
        left out, rows new to this run join the order where their ids fall; `resume_note` (also
        printed) says how many of the epoch's remaining rows changed. A state without `num_ids`
        (lensrl before row ids) continues exactly when its rows can be told: every row read, or
        the same number of rows as this run.

        Raises ValueError when the batch size or seed differ, or when the data files do (another
        number of rows read), since the order could not continue.
        """
        for key in ("batch_size", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}: resuming would not continue the same order"
                )
        if "num_ids" not in state:
            self._load_positions(state)
            return
        if int(state["num_ids"]) != self.num_ids:
            raise ValueError(
                f"sampler state was saved with num_ids={state['num_ids']} (rows read from the data files) but "
                f"this run reads {self.num_ids}: the data files differ, so the saved order does not apply"
            )
        for row_id in state.get("skipped", []):
            if self._present[row_id]:
                self._present[row_id] = False
            if row_id not in self.skipped:
                self.skipped.append(int(row_id))
        self.num_items = int(self._present.sum())
        self._start_epoch(int(state["epoch"]))
        self.position = int(state["position"])
        if "remaining" in state:
            self._sequence, self._explicit = np.asarray(state["remaining"], dtype=np.int64).reshape(-1), True
        else:
            self.cursor = min(int(state["cursor"]), self.num_ids)
        before = np.ones(self.num_ids, dtype=bool)
        before[np.asarray(state.get("absent", []), dtype=np.int64)] = False
        self._report_changes(before)

    # ------------------------------------------------------------------------------------------
    def _load_positions(self, state: dict[str, Any]) -> None:
        """A state of the older format: `position` batches into the permutation of dataset
        indices `0 .. num_items - 1` seeded by `seed + epoch`."""
        saved, epoch, position = int(state["num_items"]), int(state["epoch"]), int(state["position"])
        taken = position * self.batch_size
        self._start_epoch(epoch)
        self.position = position
        if saved == self.num_ids:  # the saved run had every row: its indices are these ids
            self.cursor = min(taken, self.num_ids)
            self._report_changes(np.ones(self.num_ids, dtype=bool))
        elif saved == self.num_items:  # the same rows as this run: its indices are this run's
            rng = np.random.default_rng(self.seed + epoch)
            order = rng.permutation(saved) if self.shuffle else np.arange(saved)
            self._sequence, self._explicit = self.row_ids[order[taken:]], True
        else:
            raise ValueError(
                f"sampler state was saved with num_items={saved} but this run has num_items={self.num_items} "
                f"(of {self.num_ids} rows read), and a state saved before lensrl ordered rows by id cannot tell "
                "which rows it had: resuming would not continue the same order"
            )

    def _report_changes(self, before: np.ndarray) -> None:
        """Count the rows still to come in this epoch that the saved run had (`before`: (num_ids,)
        bool) and this one does not, and the reverse; set `resume_note` and print it."""
        rest = self._sequence[self.cursor :]
        then, now = before[rest], self._present[rest]
        gone, new = int((then & ~now).sum()), int((~then & now).sum())
        if not gone and not new:
            return
        note = (f"data: {gone} of the {int(then.sum())} rows left in epoch {self.epoch} of the saved run "
                "are not in this run (skipped now) and are left out; the rest follow in the saved order")
        if new:
            note += f"; {new} rows new to this run join them"
        self.resume_note = note
        _print_main(f"[yellow]{_escape(note)}[/yellow]")

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0  # batches taken from this epoch
        self.cursor = 0  # place in self._sequence of the next id to consider
        self._sequence = self._epoch_sequence(epoch)
        self._explicit = False  # True: the sequence is an older state's remaining ids, not the permutation

    def _epoch_sequence(self, epoch: int) -> np.ndarray:
        """(num_ids,) int64: every stable id, in epoch `epoch`'s order."""
        if not self.shuffle:
            return np.arange(self.num_ids)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_ids)

    def _upcoming(self) -> np.ndarray:
        """Places in the epoch's sequence, from the cursor on, of the ids sampled from."""
        return self.cursor + np.flatnonzero(self._present[self._sequence[self.cursor :]])

    def _take(self, places: np.ndarray) -> list[int]:
        self.cursor = int(places[-1]) + 1
        return self._index[self._sequence[places]].tolist()


def process_rows(
    dataset: PromptDataset,
    sampler: BatchSampler,
    batch: list[int],
    positions: Iterable[int],
    process: Callable[[Sample], Any],
    skip_bad_rows: bool = False,
) -> tuple[list[Sample], list[Any]]:
    """`process(dataset[batch[p]])` for each of this rank's `positions` in `batch` (dataset
    indices from `sampler.next_batch()`, the same list on every rank): (samples, results), both
    aligned with `positions`. This is where a step first decodes a row's images.

    A row that raises DataError (an image that does not decode, a row the processor rejects):
    without `skip_bad_rows` the error is raised again, naming the file and row as before and how to
    skip such rows. With it, the row is named in a warning, left out of every later batch
    (`sampler.skip`, counted in `sampler.num_skipped`), and its place in `batch` is refilled from
    `sampler.refill`, so the step still trains on a full batch; `batch` is updated in place. Over
    several ranks the failures are gathered (one all-gather per round, only with `skip_bad_rows`)
    so every rank's sampler skips and refills alike. Raises DataError when no row is left.
    """
    positions = list(positions)
    done: dict[int, tuple[Sample, Any]] = {}
    pending = positions
    while True:
        failed: list[tuple[int, str]] = []
        for pos in pending:
            try:
                sample = dataset[batch[pos]]
                done[pos] = (sample, process(sample))
            except DataError as e:
                if not skip_bad_rows:
                    raise DataError(f"{e}; data.skip_bad_rows=true skips rows that fail like this one (a run "
                                    "resumed with it continues from its last checkpoint)") from None
                failed.append((pos, str(e)))
        if not skip_bad_rows:
            break
        everyone = sorted(pos for part in _gather([pos for pos, _ in failed]) for pos in part)
        if not everyone:
            break
        ids = dict(zip(everyone, sampler.skip([batch[pos] for pos in everyone])))
        for pos, error in failed:
            _print(f"[yellow]data.skip_bad_rows: skipped training row id {ids[pos]} ({sampler.num_skipped} "
                   f"skipped so far), another row takes its place: {_escape(error)}[/yellow]")
        for pos, index in zip(everyone, sampler.refill(len(everyone))):
            batch[pos] = index
        mine = set(positions)
        pending = [pos for pos in everyone if pos in mine]
    return [done[pos][0] for pos in positions], [done[pos][1] for pos in positions]


def _gather(local: list[int]) -> list[list[int]]:
    """Every rank's `local` (just [local] in a single process)."""
    from lensrl.train import distributed as dist

    return dist.all_gather_objects(local) if dist.world_size() > 1 else [local]


def _print(text: str) -> None:
    from lensrl.logging import console

    console.print(text, soft_wrap=True)


def _print_main(text: str) -> None:
    from lensrl.train import distributed as dist

    if dist.is_main():
        _print(text)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


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
