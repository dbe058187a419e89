"""Sources whose images are records of a database or a table rather than files of a folder.

- lmdb: an LMDB folder (`data.mdb`) whose values are encoded images, keyed by id, as LSUN ships.
  One class, named after the folder; keys sorted, then taken in a seeded random order.
  Needs the `lmdb` package (`pip install 'ddpm-engine[lmdb]'`).
- hf: a folder written by Hugging Face `datasets`' `save_to_disk` (`*.arrow` files, `state.json`,
  `dataset_info.json`); parquet: a `.parquet` file or a folder of them. Both are read with pyarrow
  (`pip install 'ddpm-engine[hf]'`), not with `datasets`: nothing is downloaded. The image column
  (`--image-column`, default `image`, else the only binary or struct column) holds encoded bytes,
  or an HF Image struct {bytes, path}. Labels come from `--label-column` (default: a column named
  `label` when it holds integers): integers, named by the column's ClassLabel feature when the
  metadata has one; or strings, mapped to their sorted names. Without a label column: one class,
  named after the source. Tables are read one record batch at a time: the blocks (record batches
  of an arrow file, row groups of a parquet file) come in a seeded random order, and so do the
  rows within each batch, so that a table sorted by class still gives every shard a mix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from engine.data import DataError
from engine.data.source_sample import Source, SourceSample, safe_key

_PARQUET_BATCH_ROWS = 256  # rows read at a time from a parquet row group


def _missing(package: str, extra: str, path: Path):
    return DataError(f"{path} needs the {package} package to be read: pip install 'ddpm-engine[{extra}]' "
                     f"(or pip install {package})")


# ----------------------------------------------------------------------------- LMDB


def lmdb_source(path: Path, num: int | None, seed: int) -> Source:
    """The encoded images of an LMDB folder (see the module doc)."""
    try:
        import lmdb
    except ImportError:
        raise _missing("lmdb", "lmdb", path) from None
    try:
        # lock=False: read-only use of a database no one writes to; readahead=False: random reads
        environment = lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=1)
        with environment.begin() as transaction:
            keys = sorted(transaction.cursor().iternext(keys=True, values=False))
    except lmdb.Error as exn:
        raise DataError(f"cannot read {path} as an LMDB database: {exn}") from exn
    if not keys:
        raise DataError(f"{path} is an empty LMDB database")
    order = np.random.default_rng(seed).permutation(len(keys))[:num]

    def samples() -> Iterator[SourceSample]:
        taken: set[str] = set()
        with environment.begin() as transaction:
            for index in order:
                name = keys[index].decode("utf-8", "replace")
                yield SourceSample(safe_key(name, taken), transaction.get(keys[index]) or b"", "", 0,
                                   f"{path}[{name}]")

    return Source("lmdb", [path.resolve().name], samples(), len(order))


# ----------------------------------------------------------------------------- Arrow and Parquet


class _Block(NamedTuple):
    """A part of a table read at once: an arrow record batch or a parquet row group."""

    read: Callable[[list[str]], Iterator]  # columns -> record batches holding them
    rows: int
    file: Path
    first_row: int  # in its file


def _arrow_blocks(path: Path, pa) -> tuple[list[_Block], object]:
    """A save_to_disk folder's record batches (memory-mapped: nothing is read until used) and schema."""
    state = path / "state.json"
    names = ([entry["filename"] for entry in json.loads(state.read_text()).get("_data_files", [])]
             if state.is_file() else [])
    blocks, schema = [], None
    for file in [path / name for name in names] or sorted(path.glob("*.arrow")):
        mapped = pa.memory_map(str(file))
        try:
            reader = pa.ipc.open_stream(mapped)  # what `datasets` writes
            batches = list(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(mapped)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        schema, first_row = reader.schema, 0
        for batch in batches:
            blocks.append(_Block(lambda columns, batch=batch: iter([batch.select(columns)]), batch.num_rows, file,
                                 first_row))
            first_row += batch.num_rows
    return blocks, schema


def _parquet_blocks(path: Path, pq) -> tuple[list[_Block], object]:
    """The row groups of a parquet file (or of a folder of them), each read in batches when used, and
    the schema."""
    blocks, schema = [], None
    for file in [path] if path.is_file() else sorted(path.glob("*.parquet")):
        parquet = pq.ParquetFile(file)
        schema, first_row = parquet.schema_arrow, 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            blocks.append(_Block(lambda columns, parquet=parquet, group=group: parquet.iter_batches(
                batch_size=_PARQUET_BATCH_ROWS, row_groups=[group], columns=columns), rows, file, first_row))
            first_row += rows
    return blocks, schema


def _features(path: Path, schema) -> dict:
    """The `datasets` features (column -> description) from the schema's metadata or dataset_info.json."""
    metadata = (schema.metadata or {}).get(b"huggingface")
    if metadata:
        return json.loads(metadata).get("info", {}).get("features", {}) or {}
    info = path / "dataset_info.json" if path.is_dir() else None
    return json.loads(info.read_text()).get("features", {}) if info and info.is_file() else {}


def _image_column(schema, requested: str | None, where: Path, pa) -> str:
    names = schema.names
    if requested is not None:
        if requested not in names:
            raise DataError(f"{where} has no column {requested!r} (it has {', '.join(names)}); fix --image-column")
        return requested
    if "image" in names:
        return "image"
    candidates = [field.name for field in schema if pa.types.is_binary(field.type) or pa.types.is_large_binary(
        field.type) or (pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0)]
    if len(candidates) != 1:
        raise DataError(f"{where}: no column named 'image' and {len(candidates) or 'no'} binary columns "
                        f"({', '.join(names)}); name the one with the images with --image-column")
    return candidates[0]


def _label_column(schema, requested: str | None, where: Path) -> str | None:
    if requested is not None:
        if requested not in schema.names:
            raise DataError(f"{where} has no column {requested!r} (it has {', '.join(schema.names)}); "
                            "fix --label-column")
        return requested
    if "label" in schema.names and str(schema.field("label").type).startswith(("int", "uint")):
        return "label"
    return None


def _classes(blocks: list[_Block], column: str, features: dict, where: Path) -> tuple[list[str], dict | None]:
    """Class names, and for string labels their index; reads the label column alone, block by block."""
    values = set()
    for block in blocks:
        for batch in block.read([column]):
            values.update(batch.column(0).to_pylist())
    if None in values:
        raise DataError(f"{where}: column {column!r} has empty labels; pick another --label-column or none")
    if all(isinstance(value, str) for value in values):
        classes = sorted(values)
        return classes, {name: index for index, name in enumerate(classes)}
    if not all(isinstance(value, int) for value in values):
        raise DataError(f"{where}: column {column!r} holds neither integers nor strings; it cannot be a label")
    names = features.get(column, {}).get("names")
    classes = list(names) if names else [str(index) for index in range(max(values) + 1)]
    if min(values) < 0 or max(values) >= len(classes):
        raise DataError(f"{where}: column {column!r} holds labels from {min(values)} to {max(values)}, "
                        f"but there are {len(classes)} classes; labels must be 0..{len(classes) - 1}")
    return classes, None


def _image_bytes(cell) -> bytes:
    """An image cell: bytes, or an HF Image struct {bytes, path} (the path read when bytes are absent)."""
    if isinstance(cell, dict):
        data, file = cell.get("bytes"), cell.get("path")
        if data is None and file and Path(file).is_file():
            return Path(file).read_bytes()
        cell = data
    return cell or b""  # a missing image is counted as undecodable


def table_source(path: Path, kind: str, num: int | None, seed: int, image_column: str | None,
                 label_column: str | None) -> Source:
    """The images of an HF save_to_disk folder (kind "hf") or of parquet files (see the module doc)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", "hf", path) from None
    try:
        blocks, schema = _arrow_blocks(path, pa) if kind == "hf" else _parquet_blocks(path, pq)
    except (pa.ArrowException, OSError, ValueError) as exn:
        raise DataError(f"cannot read {path} as {'Arrow' if kind == 'hf' else 'Parquet'} files: {exn}") from exn
    if not blocks:
        raise DataError(f"{path} holds no rows in {'*.arrow' if kind == 'hf' else '*.parquet'} files")
    features = _features(path, schema)
    image = _image_column(schema, image_column, path, pa)
    label = _label_column(schema, label_column, path)
    classes, index_of = _classes(blocks, label, features, path) if label else ([path.resolve().stem], None)
    rows = sum(block.rows for block in blocks)
    total = rows if num is None else min(num, rows)
    rng = np.random.default_rng(seed)
    columns = [image] + ([label] if label else [])

    def samples() -> Iterator[SourceSample]:
        count, taken = 0, set()
        for block in (blocks[i] for i in rng.permutation(len(blocks))):
            row = block.first_row
            for batch in block.read(columns):
                cells = batch.column(0).to_pylist()
                labels = batch.column(1).to_pylist() if label else [0] * len(cells)
                for i in rng.permutation(len(cells)):
                    if count == total:
                        return
                    value = labels[i] if index_of is None else index_of[labels[i]]
                    key = safe_key(f"{block.file.stem}_{row + i}", taken)
                    yield SourceSample(key, _image_bytes(cells[i]), "", value, f"{block.file}[row {row + i}]")
                    count += 1
                row += len(cells)

    return Source("hf-arrow" if kind == "hf" else "parquet", classes, samples(), total)
