"""Preference rows from Pick-a-Pic parquet, any HF `datasets` source, or JSONL + image files, as one record type.

Every row becomes a `PreferenceRecord` (prompt, image 0/1 as encoded bytes or a path, `label_0` = probability that
image 0 is preferred, and where it came from). The cheap checks (columns, prompt, labels, zero-size images) run
when a map-style source is opened, or per row while streaming; image decoding is checked in `images.py`.
Every error is one line that names the file and the row; with `skip_bad_rows=True` the row is skipped, counted in
`.counts["bad"]` and logged instead.

Source kinds (`load_preferences(source, ...)`):
  * ``*.jsonl``: one object per line with `prompt`, `chosen`, `rejected` (paths relative to the JSONL's folder)
    and an optional soft `label` (probability that `chosen` wins, default 1.0);
  * ``*.parquet`` or a folder of parquet shards (Pick-a-Pic v2 schema: `caption`, `jpg_0`, `jpg_1`, `label_0`,
    `label_1`; other columns ignored). In a folder, files named ``{split}-*`` (or inside a ``{split}/`` folder)
    are used when there are any, else all of them;
  * a folder written by `Dataset.save_to_disk`, any other local dataset folder, or a hub id (same schema).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffalign.errors import DiffalignError

logger = logging.getLogger(__name__)

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
JSONL_KEYS = ("prompt", "chosen", "rejected")
TIE = 0.5


class DataError(DiffalignError, ValueError):
    """A preference source or row is unusable; the message names the file and the row."""


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair as it is stored: nothing decoded, nothing ordered."""

    prompt: str
    image_0: bytes | str  # encoded image bytes or a file path
    image_1: bytes | str
    label_0: float  # probability that image_0 is preferred, in [0, 1]
    file: str  # parquet/JSONL file, or "dataset[split]" for HF sources
    row: int  # row number within `file`

    @property
    def where(self) -> str:
        return f"{self.file} row {self.row}"


class _Checker:
    """The cheap per-row rules, shared by every source kind; raises or skips-and-counts."""

    def __init__(self, drop_ties: bool, skip_bad_rows: bool):
        self.drop_ties, self.skip_bad_rows = drop_ties, skip_bad_rows
        self.counts: Counter = Counter()  # "kept", "ties", "bad"

    def problem(self, prompt, label_0, label_1, size_0, size_1) -> str | None:
        if not isinstance(prompt, str) or not prompt.strip():
            return f"empty prompt ({prompt!r})"
        for name, value in (("label_0", label_0), ("label_1", label_1)):
            if name == "label_1" and value is None:
                continue  # JSONL: one soft label only
            if value is None or not isinstance(value, (int, float)) or math.isnan(value):
                return f"missing or non-numeric {name} ({value!r})"
            if not 0.0 <= value <= 1.0:
                return f"{name} = {value} is outside [0, 1]"
        if label_1 is not None and abs(label_0 + label_1 - 1.0) > 1e-6:
            return f"label_0 + label_1 = {label_0} + {label_1} != 1"
        for name, size in (("image 0", size_0), ("image 1", size_1)):
            if size == 0:
                return f"{name} is zero-size"
        return None

    def keep(self, where: str, prompt, label_0, label_1=None, size_0=None, size_1=None) -> bool:
        """True if the row is used; False if it is a dropped tie or a skipped bad row."""
        problem = self.problem(prompt, label_0, label_1, size_0, size_1)
        if problem is not None:
            self.bad(where, problem)
            return False
        if self.drop_ties and label_0 == TIE:
            self.counts["ties"] += 1
            return False
        self.counts["kept"] += 1
        return True

    def bad(self, where: str, problem: str) -> None:
        if not self.skip_bad_rows:
            raise DataError(f"{where}: {problem}")
        self.counts["bad"] += 1
        logger.warning("skipping %s: %s", where, problem)


def _require_columns(columns, required, file: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{file}: missing column '{missing[0]}' (columns: {', '.join(columns)})")


def _image_value(value) -> bytes | str | None:
    """bytes, a path, or an `Image(decode=False)` dict {bytes, path} -> bytes or path."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


class PreferenceRows:
    """Map-style records: `rows[i]` is the i-th kept `PreferenceRecord`; `.counts` says what was dropped."""

    def __init__(self, records, table, keep, files, counts: Counter, options: dict):
        self._records = records  # list[PreferenceRecord] (JSONL) or None
        self._table = table  # datasets.Dataset (parquet / HF) or None
        self._keep = keep  # kept row numbers of `table`
        self._files = files  # [(name, first global row)], for naming the file of a table row
        self._starts = [start for _, start in files or []]
        self.counts, self.options = counts, options

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else len(self._keep)

    def __getitem__(self, i: int) -> PreferenceRecord:
        if self._records is not None:
            return self._records[i]
        row = int(self._keep[i])
        raw = self._table[row]
        file, local = _locate(self._files, self._starts, row)
        return PreferenceRecord(
            raw["caption"], _image_value(raw["jpg_0"]), _image_value(raw["jpg_1"]), float(raw["label_0"]), file, local
        )


class PreferenceStream:
    """Iterable records read lazily (nothing materialised); `.counts` grows as rows are read."""

    def __init__(self, rows_fn, args: tuple, counts: Counter, options: dict):
        self._rows_fn, self._args, self.counts, self.options = rows_fn, args, counts, options  # picklable for workers

    def __iter__(self) -> Iterator[PreferenceRecord]:
        self.counts.clear()  # counts describe one pass, not the sum over epochs
        return self._rows_fn(*self._args)


def _locate(files: list[tuple[str, int]], starts: list[int], row: int) -> tuple[str, int]:
    """Global table row -> (file name, row within that file); `starts` = the files' first global rows."""
    k = bisect.bisect_right(starts, row) - 1
    return files[k][0], row - starts[k]


# ---------------------------------------------------------------------------------------------------------------
# JSONL


def _jsonl_rows(path: Path, check: _Checker) -> Iterator[PreferenceRecord]:
    n = 0
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f):
            if not line.strip():
                continue
            n += 1
            where = f"{path} row {row}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                check.bad(where, f"invalid JSON ({err.msg})")
                continue
            missing = [k for k in JSONL_KEYS if k not in obj]
            if missing:
                raise DataError(f"{where}: missing key '{missing[0]}' (keys: {', '.join(obj)})")
            label = obj.get("label", 1.0)
            images = [str(path.parent / obj[k]) for k in ("chosen", "rejected")]
            sizes = [os.path.getsize(p) if os.path.isfile(p) else None for p in images]
            for name, p, size in zip(("chosen", "rejected"), images, sizes):
                if size is None:
                    check.bad(where, f"{name} image not found: {p}")
                    break
            else:
                if check.keep(where, obj["prompt"], label, None, *sizes):
                    yield PreferenceRecord(obj["prompt"], images[0], images[1], float(label), str(path), row)
    if n == 0:
        raise DataError(f"{path}: empty file (no rows)")


# ---------------------------------------------------------------------------------------------------------------
# parquet and HF datasets


def _parquet_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    in_split = [f for f in files if f.name.startswith(f"{split}-") or f.parent.name == split]
    files = in_split or files
    if not files:
        raise DataError(f"{path}: no parquet files")
    return files


def _parquet_offsets(files: list[Path]) -> list[tuple[str, int]]:
    """Read each footer (cheap): catches truncated files and missing columns with the file's name."""
    import pyarrow.parquet as pq

    offsets, start = [], 0
    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as err:  # pyarrow.ArrowInvalid on a truncated / non-parquet file
            raise DataError(f"{f}: unreadable parquet, truncated or corrupt ({str(err).splitlines()[0]})") from None
        _require_columns(meta.schema.to_arrow_schema().names, PICKAPIC_COLUMNS, str(f))
        if meta.num_rows == 0:
            raise DataError(f"{f}: empty file (no rows)")
        offsets.append((str(f), start))
        start += meta.num_rows
    return offsets


def _check_table(ds, files, check: _Checker):
    """Run the cheap rules over the non-image columns of an Arrow-backed dataset -> kept row numbers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.data  # before any filter, so row numbers are table rows
    columns = {c: table.column(c) for c in ("caption", "label_0", "label_1")}
    values = {c: col.to_pylist() for c, col in columns.items()}
    sizes = {}
    for c in ("jpg_0", "jpg_1"):
        col = table.column(c)
        binary = pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
        sizes[c] = pc.binary_length(col).to_pylist() if binary else [None] * len(table)
    keep = []
    ends = [start for _, start in files[1:]] + [len(table)]
    for (file, start), end in zip(files, ends):
        for row in range(start, end):
            args = [values[c][row] for c in ("caption", "label_0", "label_1")] + [sizes[c][row] for c in sizes]
            if check.keep(f"{file} row {row - start}", *args):
                keep.append(row)
    if "ranking_id" in table.column_names:  # Pick-a-Pic's pair id
        _count_duplicate_ids(table.column("ranking_id").to_pylist(), keep, files, check)
    return np.asarray(keep, dtype=np.int64)


def _count_duplicate_ids(ids: list, keep: list[int], files, check: _Checker) -> None:
    """Kept rows repeating an earlier row's ranking_id are kept (a repeated judgement only weighs that pair more,
    and the official Diffusion-DPO code trains on Pick-a-Pic as is) but counted in counts["duplicate_ids"] and
    reported in one warning naming the first repeat."""
    first: dict = {}
    starts = [start for _, start in files]
    for row in keep:
        if ids[row] in first:
            if check.counts["duplicate_ids"] == 0:
                where, dup = _locate(files, starts, first[ids[row]]), _locate(files, starts, row)
                example = f"ranking_id {ids[row]!r} at {where[0]} row {where[1]} and {dup[0]} row {dup[1]}"
            check.counts["duplicate_ids"] += 1
        else:
            first[ids[row]] = row
    if check.counts["duplicate_ids"]:
        logger.warning("%d rows repeat a ranking_id (kept; first: %s)", check.counts["duplicate_ids"], example)


def _image_columns_undecoded(ds):
    """HF `Image()` columns -> undecoded {bytes, path} dicts, so decoding stays in images.py."""
    from datasets import Image

    features = ds.features or {}  # None for some streamed hub datasets
    for c in ("jpg_0", "jpg_1"):
        if isinstance(features.get(c), Image):
            ds = ds.cast_column(c, Image(decode=False))
    return ds


def _unbatched(ds, batch_size: int = 64) -> Iterator[dict]:
    """Rows of a datasets.IterableDataset, all of them even inside a DataLoader worker.

    `iter(ds)` in a worker reads only that worker's files (datasets shards by file), which would break the row
    numbering; pairs.PreferencePairStream splits the rows between workers instead.
    """
    for batch in ds.iter(batch_size=batch_size):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


def _stream_rows(ds, files, check: _Checker) -> Iterator[PreferenceRecord]:
    starts = [start for _, start in files]
    n = 0
    for row, raw in enumerate(_unbatched(ds)):
        n += 1
        file, local = _locate(files, starts, row)
        if n == 1:
            _require_columns(list(raw), PICKAPIC_COLUMNS, file)
        images = [_image_value(raw[c]) for c in ("jpg_0", "jpg_1")]
        sizes = [len(im) if isinstance(im, bytes) else None for im in images]
        if check.keep(f"{file} row {local}", raw["caption"], raw["label_0"], raw["label_1"], *sizes):
            yield PreferenceRecord(raw["caption"], images[0], images[1], float(raw["label_0"]), file, local)
    if n == 0:
        raise DataError(f"{files[0][0]}: empty (no rows)")


def load_preferences(
    source: str, *, split: str = "train", streaming: bool = False, drop_ties: bool = True, skip_bad_rows: bool = False
) -> PreferenceRows | PreferenceStream:
    """Open a preference source (see the module docstring) as map-style rows, or as a stream if `streaming`.

    Streaming never materialises the dataset (Pick-a-Pic v2 is ~335 GB); its checks run as rows are read.
    """
    import datasets

    path = Path(source)
    check = _Checker(drop_ties, skip_bad_rows)
    options = {"source": source, "split": split, "drop_ties": drop_ties, "skip_bad_rows": skip_bad_rows}
    if path.suffix in (".jsonl", ".parquet") and not path.exists():
        raise DataError(f"{source}: no such file")

    if path.suffix == ".jsonl":
        options["files"] = [[str(path.resolve()), path.stat().st_size]]
        if streaming:
            return PreferenceStream(_jsonl_rows, (path, check), check.counts, options)
        return _nonempty(PreferenceRows(list(_jsonl_rows(path, check)), None, None, None, check.counts, options))

    is_saved = path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())
    if path.exists() and not is_saved and (path.is_file() or any(path.rglob("*.parquet"))):
        parquet = _parquet_files(path, split)
        files = _parquet_offsets(parquet)
        options["files"] = [[str(f.resolve()), f.stat().st_size] for f in parquet]
        try:
            ds = datasets.load_dataset(
                "parquet", data_files=[str(f) for f in parquet], split="train", streaming=streaming
            )
        except Exception as err:  # a corrupt page behind an intact footer
            raise DataError(
                f"{path}: cannot read parquet ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from None
    else:
        files = [(f"{source}[{split}]", 0)]
        if is_saved:
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            ds = ds.to_iterable_dataset() if streaming else ds
        else:
            ds = datasets.load_dataset(source, split=split, streaming=streaming)
        if ds.column_names is not None:
            _require_columns(ds.column_names, PICKAPIC_COLUMNS, files[0][0])
        ds = _image_columns_undecoded(ds)

    if streaming:
        return PreferenceStream(_stream_rows, (ds, files, check), check.counts, options)
    if len(ds) == 0:
        raise DataError(f"{files[0][0]}: empty (no rows)")
    keep = _check_table(ds, files, check)
    return _nonempty(PreferenceRows(None, ds, keep, files, check.counts, options))


def _nonempty(rows: PreferenceRows) -> PreferenceRows:
    if len(rows) == 0:
        raise DataError(f"{rows.options['source']}: no pairs left ({dict(rows.counts)})")
    return rows
