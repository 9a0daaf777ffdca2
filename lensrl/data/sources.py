"""Where rows come from: local parquet, json and jsonl files or folders, and Hugging Face datasets
already in the local cache. Each source becomes Arrow tables; `datasets.py` checks the rows,
whatever the source.

    data.train_files: data/geo3k                      # a folder of *.parquet / *.jsonl / *.json
    data.train_files: [a.parquet, b.jsonl]            # files, a list or a single string
    data.train_files: hiyouga/geometry3k              # a hub dataset id, split = the run's split name
    data.train_files: hiyouga/geometry3k@validation   # ... or the split named after '@'
    data.train_files: saved/                          # a folder `datasets`' save_to_disk wrote

A hub id is read from the local cache only, never from the network: first the Hugging Face hub
cache (`hf download --repo-type dataset ID` puts the files there; lensrl reads the split's
parquet/json files as it reads local ones), then the `datasets` library's own cache (a dataset
loaded once with `datasets.load_dataset(ID)`), opened offline. Neither: an error that says how to
download it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from lensrl.data.sample import DataError

EXTENSIONS = (".parquet", ".jsonl", ".json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?:@[\w.-]+)?$")


@dataclass
class Source:
    """One table of rows: `name` for messages (a file path, or `id@split (file)`), `base_dir` for
    relative image paths. `read(columns)` returns the Arrow table with those columns."""

    name: str
    base_dir: str
    kind: str  # "parquet" | "jsonl" | "json" | "arrow"
    path: str | None = None
    table: pa.Table | None = None
    loader: Callable[[], pa.Table] | None = None  # "arrow": opens the table when first read

    def schema(self) -> pa.Schema:
        if self.kind == "parquet":
            try:
                return pq.read_schema(self.path)
            except Exception as e:
                raise DataError(f"{self.name}: not a readable parquet file ({type(e).__name__}: {e})") from None
        return self._whole().schema

    def read(self, columns: list[str]) -> pa.Table:
        if self.kind == "parquet":
            return pq.read_table(self.path, columns=columns)
        return self._whole().select(columns)

    def _whole(self) -> pa.Table:
        if self.table is None:
            self.table = self.loader() if self.loader is not None else _read_json(self.path, self.kind, self.name)
        return self.table


def resolve_sources(paths: list[str] | str, split: str) -> list[Source]:
    """Files, folders (their *.parquet, *.jsonl, *.json, by name) and cached hub ids -> Sources."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sources: list[Source] = []
    for spec in map(str, paths):
        if os.path.isdir(spec) and _saved_by_datasets(spec):
            sources.append(_from_disk(spec, split))
        elif os.path.isdir(spec):
            found = sorted(p for p in Path(spec).iterdir() if p.suffix in EXTENSIONS and p.is_file())
            if not found:
                raise DataError(f"folder {spec} holds no *.parquet, *.jsonl or *.json files")
            sources += [_file_source(str(p)) for p in _of_split(found, split, spec)]
        elif os.path.isfile(spec):
            sources.append(_file_source(spec))
        elif HUB_ID.match(spec):
            sources += hub_sources(spec, split)
        else:
            raise DataError(
                f"data file or folder not found: {spec}. Download the dataset (e.g. `hf download --repo-type "
                "dataset hiyouga/geometry3k`, then name it `hiyouga/geometry3k`), convert it "
                "(`lensrl data geo3k --src RAW --out DIR`, `lensrl data robo2vlm --src RAW --out DIR`), or make "
                "synthetic data with `lensrl data synth --task geo --n 1000 --out DIR`"
            )
    return sources


SPLIT_WORDS = {"train": ("train",), "test": ("test", "validation", "val", "dev")}


def _of_split(files: list[Path], split: str, where: str) -> list[Path]:
    """A folder's files of one split when its files are named by split (train.parquet,
    test-00000-of-00001.parquet, ...): train_files=DIR must not train on DIR/test.parquet. A
    folder without split names is all one split."""
    def split_of(path: Path) -> str | None:
        stem = path.stem.lower()
        return next((name for name, words in SPLIT_WORDS.items()
                     if any(stem == w or re.match(rf"^{w}[-_.]", stem) for w in words)), None)

    named = {f: split_of(f) for f in files}
    if not any(named.values()):
        return files
    chosen = [f for f in files if named[f] == split]
    if not chosen:
        raise DataError(f"folder {where} names its files by split but has none for '{split}' "
                        f"({', '.join(f.name for f in files)}); name the files directly")
    return chosen


def _saved_by_datasets(folder: str) -> bool:
    """A folder `datasets`' save_to_disk wrote (a Dataset, or a DatasetDict of splits)."""
    return (Path(folder) / "state.json").is_file() or (Path(folder) / "dataset_dict.json").is_file()


def _from_disk(folder: str, split: str) -> Source:
    """A save_to_disk folder's split, opened when first read (resolving only checks it is there)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{folder} was written by the `datasets` library (save_to_disk): pip install datasets "
                        "to read it") from None
    where = Path(folder)
    if (where / "dataset_dict.json").is_file():  # a DatasetDict: one sub-folder per split
        splits = json.loads((where / "dataset_dict.json").read_text()).get("splits", [])
        names = [split] + [w for w in SPLIT_WORDS.get(split, ()) if w != split]
        chosen = next((n for n in names if n in splits), None)
        if chosen is None:
            raise DataError(f"{folder}: no split '{split}' (splits: {', '.join(splits)})")
        where, split = where / chosen, chosen
    return Source(f"{folder}@{split}", folder, "arrow", loader=lambda: datasets.load_from_disk(str(where)).data.table)


def _file_source(path: str) -> Source:
    suffix = Path(path).suffix
    kind = {".jsonl": "jsonl", ".json": "json"}.get(suffix, "parquet")
    return Source(path, os.path.dirname(os.path.abspath(path)), kind, path=path)


def _read_json(path: str, kind: str, name: str) -> pa.Table:
    try:
        if kind == "jsonl":
            return pa_json.read_json(path)
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, ValueError, pa.ArrowInvalid) as e:
        raise DataError(f"{name}: not readable as {kind} ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(rows, dict):  # {"data": [...]} or {"train": [...]}: one list of rows inside
        lists = [v for v in rows.values() if isinstance(v, list)]
        rows = lists[0] if len(lists) == 1 else rows
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{name}: expected a JSON list of row objects (or one jsonl object per line)")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{name}: rows do not share one schema ({str(e)[:200]})") from None


def hub_sources(spec: str, split: str) -> list[Source]:
    """The split of a hub dataset id from the local caches (see the module docstring)."""
    repo_id, _, chosen = spec.partition("@")
    split = chosen or split
    snapshot = _hub_snapshot(repo_id)
    if snapshot is not None:
        names = [split] if chosen else [split, *(w for w in SPLIT_WORDS.get(split, ()) if w != split)]
        files = next((found for name in names if (found := _split_files(snapshot, name))), [])
        if not files:
            present = sorted({p.stem.split("-")[0] for p in snapshot.rglob("*") if p.suffix in EXTENSIONS})
            raise DataError(f"{spec}: the cached download {snapshot} has no files for split '{split}' "
                            f"(files there: {', '.join(present) or 'none'}); name the split as ID@split")
        return [Source(f"{repo_id}@{split} ({f.relative_to(snapshot)})", str(f.parent), _file_source(str(f)).kind,
                       path=str(f)) for f in files]  # relative image paths: from their own file's folder
    loader = _datasets_cache(repo_id, split)
    if loader is not None:
        return [Source(f"{repo_id}@{split}", os.getcwd(), "arrow", loader=loader)]
    raise DataError(
        f"{spec}: not a local file or folder (from {os.getcwd()}), and not a dataset id in the local Hugging "
        f"Face cache (lensrl never downloads). A dataset id: download it with `hf download --repo-type dataset "
        f"{repo_id}` (or `datasets.load_dataset('{repo_id}')` once); a local path: check it"
    )


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    # the cache folder as the environment names it now (huggingface_hub reads it once, at import)
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub")
                                               if os.environ.get("HF_HOME") else None)
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None


def _split_files(snapshot: Path, split: str) -> list[Path]:
    """The split's data files in a dataset repo snapshot, by the hub's naming conventions:
    `split-00000-of-00001.parquet`, `data/split-*.parquet`, `split.jsonl`, `split/*.parquet`."""
    found = []
    for path in sorted(snapshot.rglob("*")):
        if path.suffix not in EXTENSIONS or not path.is_file():
            continue
        rel = path.relative_to(snapshot)
        stem = path.stem
        if stem == split or re.match(rf"^{re.escape(split)}[-_.]", stem) or split in rel.parts[:-1]:
            found.append(path)
    return found


def _datasets_cache(repo_id: str, split: str) -> Callable[[], pa.Table] | None:
    """A loader of the split from the `datasets` library's own cache, opened offline when first
    read (None: the dataset is not in that cache)."""
    try:
        import datasets
        import datasets.config
    except ImportError:
        return None
    # the cache folder as the environment names it now (datasets reads it once, at import)
    cache = os.environ.get("HF_DATASETS_CACHE") or (os.path.join(os.environ["HF_HOME"], "datasets")
                                                    if os.environ.get("HF_HOME") else datasets.config.HF_DATASETS_CACHE)
    if not (Path(cache) / repo_id.replace("/", "___")).is_dir():
        return None

    def load() -> pa.Table:
        offline = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = True  # never the network, whatever the environment says
        try:
            dataset = datasets.load_dataset(repo_id, split=split, cache_dir=cache)
        except Exception as e:  # cached, but not this split (or not readable offline)
            raise DataError(f"{repo_id}@{split}: cannot open it from the datasets cache {cache} offline "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
        finally:
            datasets.config.HF_HUB_OFFLINE = offline
        return dataset.data.table  # Arrow: images stay {bytes, path} structs (no decoding)

    return load
