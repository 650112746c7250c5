"""The Parquet file of offline teacher scores: its columns, its metadata, writing row groups, reading rows.

Written by `opd score` (the application layer), read by the trainer's
`OfflineScoreSource`. One row per scored sequence:

| column | type | holds |
| --- | --- | --- |
| `id` | string | the sequence's id (the rollout id it trains as) |
| `token_ids` | list<int32> | the whole sequence |
| `score_from` | int32 | first scored position (the first response token) |
| `token_logprobs` | list<float> [P] | the teacher's log-prob of each scored token |
| `topk_ids` | list<int32> [P * k] | top-k ids per position, row-major, by rank |
| `topk_logprobs` | list<float> [P * k] | their log-probs |
| `tail_logprobs` | list<float> [P] | log of the mass outside the top-k |

P = len(token_ids) - score_from; float is float32 or float16 (`dtype`).
The schema metadata key `opd.scores` holds `ScoreFileMeta` as JSON (format
version, teacher model and backend, tokenizer fingerprint, k, dtype,
temperature, vocabulary size), which the trainer checks against the student
and its loss. Rows are written one row group per batch, so a reader holds
one row group at a time: memory stays bounded by the batch, not the file.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from teacher_server.client import TeacherScores

FORMAT_VERSION = 1
META_KEY = b"opd.scores"
DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


class ScoreFileError(ValueError):
    """A score file is missing, unreadable, of another format, or does not hold what it is asked for."""


@dataclass(frozen=True)
class ScoreFileMeta:
    teacher_model: str
    tokenizer_fingerprint: str
    top_k: int
    dtype: str  # log-prob storage: float32 | float16
    temperature: float = 1.0
    teacher_backend: str = ""
    vocab_size: int = 0
    format: int = FORMAT_VERSION

    def schema(self) -> pa.Schema:
        lp = pa.list_(DTYPES[self.dtype])
        fields = [
            pa.field("id", pa.string(), nullable=False),
            pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("score_from", pa.int32(), nullable=False),
            pa.field("token_logprobs", lp, nullable=False),
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_logprobs", lp, nullable=False),
            pa.field("tail_logprobs", lp, nullable=False),
        ]
        return pa.schema(fields, metadata={META_KEY: json.dumps(asdict(self), sort_keys=True).encode()})

    @classmethod
    def of(cls, schema: pa.Schema, where: str) -> ScoreFileMeta:
        raw = (schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise ScoreFileError(f"{where} is a Parquet file without opd score metadata; write it with `opd score`")
        meta = cls(**json.loads(raw))
        if meta.format != FORMAT_VERSION:
            raise ScoreFileError(f"{where} has score file format {meta.format}; this build reads {FORMAT_VERSION}")
        return meta


Row = tuple[str, np.ndarray, TeacherScores]  # (id, token_ids int32 [L], scores of positions [score_from, L))


def rows_table(rows: Sequence[Row], meta: ScoreFileMeta) -> pa.Table:
    """One batch of scored sequences as a table of the file's schema (one row group when written)."""
    dtype = np.dtype(meta.dtype)

    def lp(values: list[np.ndarray]) -> pa.Array:
        return pa.array([v.astype(dtype).ravel() for v in values], type=pa.list_(DTYPES[meta.dtype]))

    for rid, _, s in rows:
        if s.topk_ids.shape[1] != meta.top_k:
            raise ScoreFileError(f"row {rid!r}: top-{s.topk_ids.shape[1]} scores in a top-{meta.top_k} file")
    columns = {
        "id": pa.array([r[0] for r in rows], pa.string()),
        "token_ids": pa.array([np.asarray(r[1], np.int32) for r in rows], pa.list_(pa.int32())),
        "score_from": pa.array([r[2].score_from for r in rows], pa.int32()),
        "token_logprobs": lp([r[2].token_logprobs for r in rows]),
        "topk_ids": pa.array([r[2].topk_ids.astype(np.int32).ravel() for r in rows], pa.list_(pa.int32())),
        "topk_logprobs": lp([r[2].topk_logprobs for r in rows]),
        "tail_logprobs": lp([r[2].tail_logprobs for r in rows]),
    }
    return pa.Table.from_pydict(columns, schema=meta.schema())


def _row(table: pa.Table, i: int, k: int) -> Row:
    def col(name: str) -> np.ndarray:
        return table.column(name)[i].values.to_numpy(zero_copy_only=False)

    score_from = int(table.column("score_from")[i].as_py())
    scores = TeacherScores(
        request_id="",
        score_from=score_from,
        token_logprobs=col("token_logprobs").astype(np.float32),
        topk_ids=col("topk_ids").astype(np.int32).reshape(-1, k),
        topk_logprobs=col("topk_logprobs").astype(np.float32).reshape(-1, k),
        tail_logprobs=col("tail_logprobs").astype(np.float32),
    )
    return table.column("id")[i].as_py(), col("token_ids").astype(np.int32), scores


class ScoreFileReader:
    """Random access by id to a score file, one row group in memory at a time (plus a small cache)."""

    def __init__(self, path: str | Path, cached_row_groups: int = 4) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ScoreFileError(f"score file {str(self.path)!r} does not exist; write it with `opd score`")
        try:
            self._file = pq.ParquetFile(self.path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ScoreFileError(f"{self.path} is not a readable Parquet file ({exc})") from None
        self.meta = ScoreFileMeta.of(self._file.schema_arrow, str(self.path))
        self._where: dict[str, tuple[int, int]] = {}
        for group in range(self._file.num_row_groups):
            ids = self._file.read_row_group(group, columns=["id"]).column("id").to_pylist()
            self._where.update({rid: (group, i) for i, rid in enumerate(ids)})
        self._cache: collections.OrderedDict[int, pa.Table] = collections.OrderedDict()
        self._cached = cached_row_groups

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, rid: str) -> bool:
        return rid in self._where

    def _group(self, group: int) -> pa.Table:
        if group in self._cache:
            self._cache.move_to_end(group)
        else:
            self._cache[group] = self._file.read_row_group(group)
            while len(self._cache) > self._cached:
                self._cache.popitem(last=False)
        return self._cache[group]

    def get(self, rid: str) -> Row:
        if rid not in self._where:
            raise ScoreFileError(f"{self.path} holds no row with id {rid!r}")
        group, i = self._where[rid]
        return _row(self._group(group), i, self.meta.top_k)

    def sequences(self) -> Iterator[tuple[str, np.ndarray, int]]:
        """(id, token_ids, score_from) of every row in file order, one row group read at a time."""
        for group in range(self._file.num_row_groups):
            table = self._file.read_row_group(group, columns=["id", "token_ids", "score_from"])
            for rid, ids, score_from in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
                yield rid, np.asarray(ids, np.int32), int(score_from)
