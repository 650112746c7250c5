"""`opd score`: a teacher's scores of a file of sequences, once, into Parquet — for training with no teacher running.

    opd score --teacher HOST:50051 --input data.jsonl --output scores.parquet --top-k 20

The teacher is an opd teacher over gRPC (`host:port`) or any OpenAI-compatible
server (`http(s)://...`: vLLM's, or an opd teacher's --openai-port; needs
--tokenizer for the tokenizer fingerprint). Input rows are token ids or chat
turns (`opd_apps/score/input.py`); the output is the score file the trainer
reads with `teacher.scores_file` (`student_trainer/score_sources/score_file.py`:
per-token top-k ids, log-probs and tail mass, with the metadata the trainer
checks). Batches of `batch_size` sequences are scored concurrently and written
as one row group each.

Resumable: finished rows go to part files beside the output
(`OUTPUT.parts/part-NNNNN.parquet`, each closed — valid — every
`rows_per_part` rows, and on Ctrl-C or an error); a new run with the same
output skips the ids already there (refusing parts made with another teacher
or settings), and when the input is done the parts are merged into OUTPUT one
row group at a time. A completed OUTPUT given again is extended with the rows
it lacks. Memory holds one batch and the ids done, never the file.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
from pydantic import Field

from opd.config import ConfigError, ConfigModel, load_config
from opd.logs import setup_logging
from opd.redaction import SECRET
from opd_apps.progress import Progress
from opd_apps.score.input import InputError, count_rows, read_sequences
from opd_apps.score.teacher import ScoringError, open_scorer
from student_trainer.score_sources.score_file import ScoreFileError, ScoreFileMeta, rows_table

log = logging.getLogger("opd_apps.score")
DESCRIPTION = "Score a file of sequences with a teacher once and store the top-k log-probs as Parquet."


class ScoreConfig(ConfigModel):
    teacher: list[str] = Field(
        ..., description="teacher address(es): gRPC host:port, or http(s)://host:port of an OpenAI-compatible server"
    )
    input: str = Field(..., description="JSONL or Parquet rows: token_ids (+ score_from), prompt_ids + response_ids, "
                                        "messages, or prompt + response")  # fmt: skip
    output: str = Field(..., description="the Parquet score file to write (or to resume or extend)")
    top_k: int = Field(default=20, ge=0, le=1024, description="top-k log-probs stored per token")
    dtype: Literal["float32", "float16"] = Field(default="float32", description="storage dtype of the log-probs")
    temperature: float = Field(default=1.0, gt=0, description="teacher temperature (exact on an opd hf teacher only)")
    tokenizer: str | None = Field(
        default=None,
        description="the teacher's tokenizer directory: chat rows are rendered with its template; required for "
        "an http(s):// teacher (its tokenizer fingerprint goes into the file)",
    )
    served_model: str | None = Field(
        default=None, description="http(s):// teacher: model id (default: the first served)"
    )
    token: str | None = Field(
        default=None, description="bearer token (prefer OPD_SCORE__TOKEN)", json_schema_extra=SECRET
    )
    client_name: str = Field(default="score", description="client name for the teacher's fair share and metrics")
    tls_ca_file: str | None = Field(
        default=None, description="TLS: PEM CA bundle that issued the teacher's certificate"
    )
    timeout_s: float = Field(default=300.0, gt=0, description="deadline of one scoring request, retries included")
    id_field: str = Field(default="id", description="row field with the sequence id (else FILE_STEM:ROW)")
    input_format: Literal["auto", "jsonl", "parquet"] = Field(
        default="auto", description="input format (auto: extension)"
    )
    batch_size: int = Field(default=32, ge=1, description="sequences scored concurrently and written as one row group")
    rows_per_part: int = Field(
        default=1024, ge=1, description="rows per part file (what an interruption can lose at most)"
    )
    progress: bool = Field(default=True, description="draw a progress bar on stderr")
    log_level: str = Field(default="INFO", description="logging level")


class PartWriter:
    """Row groups into `OUTPUT.parts/part-NNNNN.parquet`, each part closed (valid) when full or interrupted."""

    def __init__(self, parts: Path, meta: ScoreFileMeta, rows_per_part: int, first: int) -> None:
        self._parts, self._meta, self._rows_per_part, self._next = parts, meta, rows_per_part, first
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._rows = 0

    def write(self, rows) -> None:
        if self._writer is None:
            self._path = self._parts / f"part-{self._next:05d}.parquet"
            self._next += 1
            self._writer = pq.ParquetWriter(self._path.with_suffix(".tmp"), self._meta.schema())
        self._writer.write_table(rows_table(rows, self._meta))
        self._rows += len(rows)
        if self._rows >= self._rows_per_part:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            assert self._path is not None  # set with the writer
            self._writer.close()
            self._path.with_suffix(".tmp").rename(self._path)  # a part is whole or absent
            self._writer, self._rows = None, 0


def _part_number(path: Path) -> int:
    digits = path.name[len("part-") : len("part-") + 5]
    return int(digits) if digits.isdigit() else 0


def _check_meta(path: Path, meta: ScoreFileMeta, parts: Path, output: Path) -> None:
    try:
        found = ScoreFileMeta.of(pq.read_schema(path), str(path))
    except ScoreFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - a file that cannot be read cannot be resumed
        raise ScoreFileError(f"{path} cannot be read ({exc}); delete it to score its rows again") from None
    if found != meta:
        raise ScoreFileError(
            f"{path} was scored with other settings ({found}) than this run ({meta}); run with the same teacher, "
            f"--top-k, --dtype and --temperature, or delete {output} and {parts} to start over"
        )


def _done_ids(parts: Path, output: Path, meta: ScoreFileMeta) -> tuple[set[str], int]:
    """Ids already scored (in finished parts, and a completed output, which becomes the first part) and the
    next part number; parts of an unfinished write (`.tmp`) are removed, files of other settings refused."""
    if output.exists():
        _check_meta(output, meta, parts, output)
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob("*.tmp"):
        stale.unlink()
    if output.exists():
        output.rename(parts / "part-00000-previous.parquet")
    done: set[str] = set()
    files = sorted(parts.glob("part-*.parquet"))
    for path in files:
        _check_meta(path, meta, parts, output)
        done.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return done, 1 + max((_part_number(f) for f in files), default=0)


def merge_parts(parts: Path, output: Path, meta: ScoreFileMeta) -> int:
    """Copy every part's row groups into `output` (one row group in memory at a time); returns the rows."""
    tmp = output.with_name(output.name + ".tmp")
    rows = 0
    writer = pq.ParquetWriter(tmp, meta.schema())
    try:
        for path in sorted(parts.glob("part-*.parquet")):
            part = pq.ParquetFile(path)
            for group in range(part.num_row_groups):
                table = part.read_row_group(group)
                writer.write_table(table)
                rows += table.num_rows
    finally:
        writer.close()
    tmp.rename(output)
    shutil.rmtree(parts)
    return rows


async def score_file(config: ScoreConfig) -> int:
    """Score the input's rows not yet in the output; returns the rows of the finished output."""
    output = Path(config.output)
    parts = output.with_name(output.name + ".parts")
    scorer = await open_scorer(config)
    try:
        meta = scorer.meta
        done, first_part = _done_ids(parts, output, meta)
        total = count_rows(config.input, config.input_format)
        writer = PartWriter(parts, meta, config.rows_per_part, first_part)
        bar = Progress(total, "scoring", enabled=config.progress)
        bar.update(min(len(done), total))
        try:
            batch: list = []
            for row in read_sequences(
                config.input, scorer.tokenizer, id_field=config.id_field, fmt=config.input_format
            ):
                if row[0] in done:
                    continue
                batch.append(row)
                if len(batch) >= config.batch_size:
                    writer.write(await scorer.score(batch))
                    bar.update(len(batch))
                    batch = []
            if batch:
                writer.write(await scorer.score(batch))
                bar.update(len(batch))
        finally:
            writer.close()  # what was scored stays, whatever stopped the run
            bar.close()
    finally:
        await scorer.close()
    return merge_parts(parts, output, meta)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(ScoreConfig, argv, prog="opd score", description=DESCRIPTION, env_prefix="OPD_SCORE__")
        setup_logging(config.log_level)
        rows = asyncio.run(score_file(config))
    except (ConfigError, InputError, ScoreFileError, ScoringError) as exc:
        print(f"opd score: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"opd score: interrupted; run the same command again to resume ({config.output}.parts)", file=sys.stderr)
        return 130
    print(f"opd score: {rows} rows in {config.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
