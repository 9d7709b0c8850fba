"""Client data: the registry of client references and the one loading path used by training,
statistics and evaluation alike.

A :class:`ClientRef` is what the server knows about a client: its id and where its data lives.
Rows are only ever materialised by :func:`open_client`, which runs inside the client's own task.

Sources:

- ``synthetic``: ``y = X @ true_coef + true_intercept + noise * eps`` with ``X ~ N(0, 1)``;
  pooled, then split among clients by ``data.partition``; a held-out set from the same
  distribution serves central evaluation.
- ``diabetes``: scikit-learn's bundled diabetes data in raw units, ``data.holdout_fraction``
  held out centrally, the rest partitioned among clients.
- ``files``: a directory with one CSV or Parquet file per client (file stem = client id), read
  in chunks so that a client's file need not fit in memory.

Every client splits off ``data.test_fraction`` of its rows as a local test split, seeded, with a
per-row draw that does not depend on the chunk size.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from fedtune.fl import partition
from fedtune.fl.config import DataConfig
from pydantic import BaseModel, ConfigDict

Split = Literal["train", "test"]
FILE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

# Independent random streams, keyed so that changing one use never shifts another.
_STREAM_POOL, _STREAM_PARTITION, _STREAM_SPLIT, _STREAM_HOLDOUT = 11, 12, 13, 14


class ClientDataError(ValueError):
    """A problem with one client's data; the message names the client and the file.

    ``public`` is the problem without any value from the data (a cell, a constant target, a
    reader's message quoting the file): what the client may tell a server it does not trust
    with its data, as under secure aggregation. It says what and where, as the message does;
    it defaults to the whole problem, for problems that quote no data."""

    def __init__(self, client_id: str, where: str, problem: str, public: str | None = None):
        self.client_id = client_id
        self.public = f"client {client_id!r} ({where}): {problem if public is None else public}"
        super().__init__(f"client {client_id!r} ({where}): {problem}")


class ClientRef(BaseModel):
    """What the server holds about a client: an id and a reference to its data, never rows."""

    model_config = ConfigDict(frozen=True)

    client_id: str
    index: int
    """Position in the registry (the shard index of simulated sources)."""
    data: DataConfig
    seed: int
    path: str | None = None
    """The client's file (``files`` source)."""


def registry(data: DataConfig, seed: int) -> list[ClientRef]:
    """The clients of a data source, in a stable order. Files whose stems collide are left
    out (no one can tell which is the client); :func:`duplicate_clients` names them."""
    if data.source != "files":
        return [
            ClientRef(client_id=f"site-{i}", index=i, data=data, seed=seed)
            for i in range(data.num_clients)
        ]
    duplicates = {cid for cid, _ in duplicate_clients(data)}
    files = [p for p in _client_files(data) if p.stem not in duplicates]
    if not files:
        raise _no_client_files(
            data.path, "no client files with a unique id (each is claimed by two or more files)"
        )
    return [
        ClientRef(client_id=p.stem, index=i, data=data, seed=seed, path=str(p))
        for i, p in enumerate(files)
    ]


def _client_files(data: DataConfig) -> list[Path]:
    directory = Path(data.path)
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise _no_client_files(str(directory), "no .csv or .parquet client files")
    return files


def _no_client_files(directory: str, problem: str) -> ClientDataError:
    """A directory without usable client files: a data reference problem, not a client's, so
    the message names ``data.path`` rather than a client."""
    error = ClientDataError("*", directory, problem)
    error.args = (f"data.path {directory}: {problem}",)
    return error


def duplicate_clients(data: DataConfig) -> list[tuple[str, str]]:
    """``(client_id, reason)`` for every id that more than one file claims."""
    if data.source != "files":
        return []
    by_id: dict[str, list[str]] = {}
    for p in _client_files(data):
        by_id.setdefault(p.stem, []).append(p.name)
    return [
        (cid, f"client {cid!r} ({data.path}): duplicate client id: {', '.join(names)}")
        for cid, names in by_id.items()
        if len(names) > 1
    ]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


@functools.lru_cache(maxsize=8)
def _pooled(data: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The simulation's pooled rows and held-out set. Cached per process: a simulated client
    regenerates the same pool instead of receiving rows."""
    if data.source == "synthetic":
        coef = np.asarray(data.true_coef or [2.0] * data.num_features, dtype=np.float64)

        def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
            X = rng.standard_normal((n, data.num_features))
            y = X @ coef + data.true_intercept + data.noise * rng.standard_normal(n)
            return X, y

        X, y = draw(_rng(seed, _STREAM_POOL, 0), data.num_clients * data.samples_per_client)
        X_test, y_test = draw(_rng(seed, _STREAM_POOL, 1), data.central_test_size)
        return X, y, X_test, y_test
    if data.source == "diabetes":
        from sklearn.datasets import load_diabetes

        X, y = load_diabetes(return_X_y=True, scaled=False)
        order = _rng(seed, _STREAM_HOLDOUT).permutation(y.shape[0])
        n_test = int(round(data.holdout_fraction * y.shape[0]))
        test, train = order[:n_test], np.sort(order[n_test:])
        return X[train], y[train], X[test], y[test]
    raise ValueError(f"data.source: {data.source!r} has no pooled data")


@functools.lru_cache(maxsize=8)
def _shards(data: DataConfig, seed: int) -> tuple[np.ndarray, ...]:
    _, y, _, _ = _pooled(data, seed)
    return tuple(
        partition.partition(
            y,
            data.num_clients,
            data.partition,
            _rng(seed, _STREAM_PARTITION),
            alpha=data.alpha,
            strictness=data.strictness,
        )
    )


def central_test_set(data: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The server's held-out set, where the source has one (simulated sources)."""
    if data.source == "files":
        return None
    _, _, X_test, y_test = _pooled(data, seed)
    if y_test.shape[0] == 0:
        return None
    return X_test, y_test


@dataclass
class ClientData:
    """A client's rows, loaded on the client. Iterate with :meth:`chunks`."""

    ref: ClientRef

    @property
    def where(self) -> str:
        return self.ref.path or f"{self.ref.data.source} shard {self.ref.index}"

    def chunks(self, split: Split, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(X, y)`` chunks of the ``train`` or ``test`` split, float64, at most
        ``chunk_size`` rows each (fewer at chunk boundaries of a file)."""
        want_test = split == "test"
        if self.ref.data.source != "files":
            X, y = self._simulated_split(want_test)
            for start in range(0, y.shape[0], chunk_size):
                yield X[start : start + chunk_size], y[start : start + chunk_size]
            return
        for _, X, y in self._file_splits(chunk_size, (split,)):
            yield X, y

    def pass_chunks(self, chunk_size: int) -> Iterator[tuple[Split, np.ndarray, np.ndarray]]:
        """Both splits in one pass over the data: ``(split, X, y)``, where each split's chunks
        come in the order :meth:`chunks` gives them. For files, a chunk of the file yields its
        test rows, then its train rows (one read serves a round's evaluation and training);
        in-memory sources give the test split, then the train split."""
        if self.ref.data.source != "files":
            for split in ("test", "train"):
                for X, y in self.chunks(split, chunk_size):
                    yield split, X, y
            return
        yield from self._file_splits(chunk_size, ("test", "train"))

    def _file_splits(
        self, chunk_size: int, splits: tuple[Split, ...]
    ) -> Iterator[tuple[Split, np.ndarray, np.ndarray]]:
        """Each file chunk's rows of ``splits``, test first; the rows of a split not asked for
        are not copied out."""
        rng = _rng(self.ref.seed, _STREAM_SPLIT, zlib.crc32(self.ref.client_id.encode()))
        for X, y in self._file_chunks(chunk_size):
            test = rng.random(y.shape[0]) < self.ref.data.test_fraction
            if "test" in splits and test.any():
                yield "test", X[test], y[test]
            if "train" in splits and not test.all():
                train = ~test
                yield "train", X[train], y[train]

    def _simulated_split(self, want_test: bool) -> tuple[np.ndarray, np.ndarray]:
        return _simulated_client(self.ref)[2 * int(want_test) : 2 * int(want_test) + 2]

    def feature_names(self) -> list[str]:
        if self.ref.data.source == "synthetic":
            return [f"x{i}" for i in range(self.ref.data.num_features)]
        if self.ref.data.source == "diabetes":
            from sklearn.datasets import load_diabetes

            return list(load_diabetes().feature_names)
        return self._file_columns()[0]

    # -- files ------------------------------------------------------------------------------

    def _file_columns(self) -> tuple[list[str], str]:
        import pandas as pd

        path = Path(self.ref.path)
        target = self.ref.data.target
        try:
            if FILE_SUFFIXES[path.suffix.lower()] == "parquet":
                import pyarrow.parquet as pq

                columns = list(pq.ParquetFile(path).schema_arrow.names)
            else:
                columns = list(pd.read_csv(path, nrows=0).columns)
        except pd.errors.EmptyDataError:
            columns = []
        except Exception as exc:  # noqa: BLE001 -- any reader failure is this client's problem
            raise ClientDataError(
                self.ref.client_id, str(path), f"unreadable: {exc}", "unreadable"
            ) from None
        if not columns:
            raise ClientDataError(self.ref.client_id, str(path), "empty file")
        if target not in columns:
            raise ClientDataError(
                self.ref.client_id, str(path), f"missing target column {target!r}"
            )
        return [c for c in columns if c != target], target

    def _file_chunks(self, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        path = Path(self.ref.path)
        features, target = self._file_columns()
        client, where = self.ref.client_id, str(path)
        if FILE_SUFFIXES[path.suffix.lower()] == "parquet":
            import pyarrow.parquet as pq

            columns = [*features, target]
            batches = pq.ParquetFile(path).iter_batches(batch_size=chunk_size, columns=columns)
            frames = (_numeric_arrays(batch, columns) for batch in batches)
        else:
            import pandas as pd

            frames = pd.read_csv(path, chunksize=chunk_size)
        first_row = 0
        rows = 0
        try:
            for frame in frames:
                yield _validated(frame, features, target, first_row, client, where)
                first_row += len(frame)
                rows += len(frame)
        except ClientDataError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a truncated or corrupt file
            raise ClientDataError(
                client,
                where,
                f"unreadable near row {first_row}: {exc}",
                f"unreadable near row {first_row}",
            ) from None
        if rows == 0:
            raise ClientDataError(client, where, "no rows")


def _numeric_arrays(batch, columns: list[str]):
    """A Parquet record batch as one float64 array, straight from Arrow, when every column is
    a numeric type without nulls (the common case: no pandas frame per chunk); otherwise the
    batch as a pandas frame, for :func:`_validated` to convert or to name the bad value."""
    import pyarrow.types as pat

    arrays = [batch.column(name) for name in columns]
    if not all(
        (pat.is_floating(a.type) or pat.is_integer(a.type)) and a.null_count == 0 for a in arrays
    ):
        return batch.to_pandas()
    values = np.empty((batch.num_rows, len(columns)), dtype=np.float64)
    for j, a in enumerate(arrays):
        values[:, j] = a.to_numpy(zero_copy_only=False)
    return values


def _validated(frame, features, target, first_row, client, where):
    if isinstance(frame, np.ndarray):
        return _finite(frame, [*features, target], first_row, client, where)
    import pandas as pd

    for column in [*features, target]:
        col = frame[column]
        if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            converted = pd.to_numeric(col, errors="coerce")
            bad = converted.isna() & col.notna()
            if bad.any():
                row = first_row + int(np.flatnonzero(bad.to_numpy())[0])
                raise ClientDataError(
                    client,
                    where,
                    f"column {column!r} row {row}: non-numeric value {col.iloc[row - first_row]!r}",
                    f"column {column!r} row {row}: a non-numeric value",
                )
            frame[column] = converted
    values = frame[[*features, target]].to_numpy(dtype=np.float64)
    return _finite(values, [*features, target], first_row, client, where)


def _finite(values, columns, first_row, client, where):
    """``(X, y)`` of a chunk's float64 values, or the first NaN or infinity, named."""
    finite = np.isfinite(values)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        column = columns[c]
        raise ClientDataError(
            client,
            where,
            f"column {column!r} row {first_row + int(r)}: {values[r, c]} (NaN or inf)",
            f"column {column!r} row {first_row + int(r)}: NaN or inf",
        )
    return values[:, :-1], values[:, -1]


@functools.lru_cache(maxsize=4096)
def _simulated_client(ref: ClientRef) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y, _, _ = _pooled(ref.data, ref.seed)
    rows = _shards(ref.data, ref.seed)[ref.index]
    # Simulated shards are in memory, so the split can be exact (files split row by row).
    n = rows.shape[0]
    n_test = min(int(round(ref.data.test_fraction * n)), n - 1)
    test = np.zeros(n, dtype=bool)
    test[_rng(ref.seed, _STREAM_SPLIT, ref.index).permutation(n)[:n_test]] = True
    Xc, yc = X[rows], y[rows]
    return Xc[~test], yc[~test], Xc[test], yc[test]


def open_client(ref: ClientRef) -> ClientData:
    return ClientData(ref)


def pooled_train(data: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The union of all clients' training splits. Simulation-only: used for the pooled-data
    baseline that shows the gap a federated model has to close."""
    parts = [_simulated_client(ref)[:2] for ref in registry(data, seed)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
