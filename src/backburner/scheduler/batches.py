"""The batch runner: validates input files, loads them as generations, writes result files.

Validation reads the whole file once (streamed; only an 8-byte hash of each custom_id is kept, to
find duplicates) and refuses the batch with line-numbered errors if any line is bad: nothing
runs. A line longer than ``max_line_bytes`` is one of them, found without holding it. A good file
is then loaded in chunks; each chunk is a compare-and-set on the batch's ``loaded`` count, so a
worker that dies mid-load is replaced by one that resumes where it stopped. When a batch's last
generation is terminal the batch is ``finalizing``: a runner writes the output and error files
from the store and completes it.

Poison: a batch whose handling raises is put back with a later next try (backoff), so the
runner claims the others meanwhile; after ``max_tries`` failed tries in a row it is failed with
an ``errors`` entry that says why (where its status allows failing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
from array import array
from collections.abc import AsyncIterator, Collection
from typing import Any

from backburner.core.clock import utcnow
from backburner.core.ids import lease_owner_id, new_id
from backburner.core.retry import Backoff
from backburner.core.states import BATCH_RUNNING, BatchStatus, FileStatus
from backburner.errors import BackburnerError
from backburner.schemas.batch import (
    MAX_REPORTED_ERRORS,
    BatchLine,
    BatchRecord,
    LineError,
    parse_line,
)
from backburner.store import Store
from backburner.store.blobs import BlobNotFound, BlobStore
from backburner.store.codec import printable

log = logging.getLogger("backburner.batches")

MAX_LINE_BYTES = 8 * 1024 * 1024


async def iter_lines(
    chunks: AsyncIterator[bytes], max_line_bytes: int = MAX_LINE_BYTES
) -> AsyncIterator[tuple[int, bytes | None]]:
    """(1-based line number, line without its newline) for each non-blank line; ``None`` for a
    line longer than ``max_line_bytes`` (without its newline), whose bytes are dropped as they
    stream. Holds at most ``max_line_bytes`` besides the chunk at hand, and looks at each byte
    once."""
    buf = bytearray()  # the line so far, from earlier chunks
    too_long = False  # the line so far is over the bound: its bytes are being dropped
    lineno = 0
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            lineno += 1
            if too_long or len(buf) + end - start > max_line_bytes:
                yield lineno, None
            else:
                line = bytes(buf) + chunk[start:end] if buf else chunk[start:end]
                if line.strip():
                    yield lineno, line
            buf.clear()
            too_long = False
            start = end + 1
        if too_long:
            continue
        if len(buf) + len(chunk) - start > max_line_bytes:
            buf.clear()
            too_long = True
        else:
            buf += chunk[start:]
    if too_long:
        yield lineno + 1, None
    elif buf.strip():
        yield lineno + 1, bytes(buf)


def _loaded_line(batch: BatchRecord, lineno: int, raw: bytes | None) -> BatchLine:
    """A line that passed validation: read it without validating it again."""
    try:
        if raw is None:
            raise ValueError("the line is too long")
        obj = json.loads(raw)
        return BatchLine(str(obj["custom_id"]), dict(obj["body"]))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # the file changed
        raise BackburnerError(
            f"batch {batch.id}: input line {lineno} changed after validation"
        ) from exc


def _h(custom_id: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little", signed=True
    )


def _described(exc: BaseException) -> str:
    said = (str(exc).splitlines() or [""])[0]
    return printable(f"{type(exc).__name__}: {said}" if said else type(exc).__name__, 300)


class BatchRunner:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        known_models: Collection[str],
        *,
        max_lines: int = 1_000_000,
        max_line_bytes: int = MAX_LINE_BYTES,
        lease_seconds: float = 120.0,
        poll_interval: float = 1.0,
        chunk_lines: int = 5000,
        max_tries: int = 5,
        retry_backoff: Backoff | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.models = frozenset(known_models)
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.chunk_lines = chunk_lines
        self.max_tries = max_tries
        self.retry_backoff = retry_backoff or Backoff(base_seconds=2.0, cap_seconds=300.0)
        self.id = worker_id or lease_owner_id("batches")
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        # failed tries in a row, per batch, by this runner (a success or a give-up forgets it)
        self._failures: dict[str, int] = {}

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self, *, burst: bool = False) -> None:
        while not self._stopping.is_set():
            try:
                batch = await self.store.batch_runs.claim(self.id, self.lease_seconds)
            except Exception:
                log.exception("claiming batch work failed")
                batch = None
            if batch is not None:
                await self._handle(batch)
                continue
            if burst:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _keep_lease(self, batch_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(Exception):
                await self.store.batch_runs.renew(self.id, batch_id, self.lease_seconds)

    async def _handle(self, batch: BatchRecord) -> None:
        keeper = asyncio.create_task(self._keep_lease(batch.id))
        retry_in: float | None = None
        try:
            if batch.status == BatchStatus.VALIDATING:
                total = await self.validate(batch)
                if total is not None and await self.store.batch_runs.start(
                    self.id, batch.id, total
                ):
                    batch = await self.store.batches.get(batch.tenant, batch.id)
                    await self.load(batch)
            elif batch.status in BATCH_RUNNING and batch.loaded < batch.total:
                await self.load(batch)
            elif batch.status == BatchStatus.FINALIZING or (
                batch.status == BatchStatus.CANCELLING and batch.pending <= 0
            ):
                await self.finalize(batch)
        except Exception as exc:
            retry_in = await self._failed(batch, exc)
        else:
            self._failures.pop(batch.id, None)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            with contextlib.suppress(Exception):
                await self.store.batch_runs.release(self.id, batch.id, retry_in=retry_in)

    async def _failed(self, batch: BatchRecord, exc: Exception) -> float:
        """Count a failed try of ``batch``: seconds until its next try; after ``max_tries`` in
        a row the batch is failed instead (when its status allows; otherwise it is tried again
        after the backoff's cap, or a lease if that is longer)."""
        tries = self._failures.get(batch.id, 0) + 1
        self._failures[batch.id] = tries
        if tries < self.max_tries:
            delay = self.retry_backoff.delay(tries)
            log.warning(
                "batch %s (%s): try %d of %d failed; next try in %.1f s",
                batch.id,
                batch.status,
                tries,
                self.max_tries,
                delay,
                exc_info=exc,
            )
            return delay
        error = {
            "code": "batch_failed",
            "line": None,
            "param": None,
            "message": f"the batch could not be processed ({batch.status}) after {tries} tries:"
            f" {_described(exc)}",
        }
        try:
            failed = await self.store.batch_runs.fail(self.id, batch.id, [error])
        except Exception:
            log.exception("batch %s: recording its failure failed", batch.id)
            failed = False
        if failed:
            self._failures.pop(batch.id, None)
            log.error("batch %s failed after %d tries", batch.id, tries, exc_info=exc)
            return 0.0
        delay = max(self.retry_backoff.cap_seconds, self.lease_seconds)
        log.error(
            "batch %s: try %d failed; a batch %s cannot be failed, next try in %.0f s",
            batch.id,
            tries,
            batch.status,
            delay,
            exc_info=exc,
        )
        return delay

    async def _lines(self, batch: BatchRecord) -> AsyncIterator[tuple[int, bytes | None]]:
        record = await self.store.files.get(batch.tenant, batch.input_file_id)
        if record.blob is None:
            raise BackburnerError(f"input file {batch.input_file_id} has no content")
        reader = await self.blobs.open(record.blob)
        try:
            async for item in iter_lines(reader, self.max_line_bytes):
                yield item
        finally:
            await reader.aclose()

    def _parse(
        self, batch: BatchRecord, lineno: int, raw: bytes | None
    ) -> BatchLine | list[LineError]:
        """One line checked; whatever it holds, a problem is a line error (never raised)."""
        if raw is None:
            return [
                LineError(
                    lineno,
                    f"line {lineno} is longer than {self.max_line_bytes} bytes, the most one"
                    " line may hold",
                )
            ]
        try:
            return parse_line(lineno, raw, batch.endpoint, self.models)
        except Exception as exc:  # a bug in checking, or a line that defeats it: not the batch's
            log.exception("batch %s: checking line %d raised", batch.id, lineno)
            return [LineError(lineno, f"line {lineno} could not be checked: {_described(exc)}")]

    async def validate(self, batch: BatchRecord) -> int | None:
        """Check every line; returns the number of requests, or None when the batch failed."""
        errors: list[LineError] = []
        bad_lines = 0
        hashes: array[int] = array("q")
        try:
            async for lineno, raw in self._lines(batch):
                if len(hashes) + bad_lines >= self.max_lines:
                    errors.append(
                        LineError(
                            lineno,
                            f"the file has more than {self.max_lines}"
                            " requests, the most one batch holds",
                        )
                    )
                    bad_lines += 1
                    break
                parsed = self._parse(batch, lineno, raw)
                if isinstance(parsed, list):
                    bad_lines += 1
                    if len(errors) < MAX_REPORTED_ERRORS:
                        errors.extend(parsed[: MAX_REPORTED_ERRORS - len(errors)])
                    continue
                hashes.append(_h(parsed.custom_id))
        except BackburnerError as exc:
            errors.append(LineError(0, f"input file cannot be read: {exc.message}"))
        except BlobNotFound:
            errors.append(LineError(0, "input file cannot be read: its content is gone"))
        if not errors and not hashes:
            errors.append(LineError(0, "the input file holds no requests"))
        if len(hashes) > 1:  # report duplicates in the same round as other errors
            errors.extend(await self._duplicates(batch, hashes))
            errors.sort(key=lambda e: e.line)
            del errors[MAX_REPORTED_ERRORS:]
        if errors:
            wire = [e.to_wire() for e in errors]
            if bad_lines > len(errors):
                wire.append(
                    {
                        "code": "too_many_errors",
                        "line": None,
                        "param": None,
                        "message": f"{bad_lines} lines are invalid; the first"
                        f" {len(errors)} are listed",
                    }
                )
            await self.store.batch_runs.fail(self.id, batch.id, wire)
            log.info("batch %s failed validation: %d bad lines", batch.id, max(bad_lines, 1))
            return None
        return len(hashes)

    async def _duplicates(self, batch: BatchRecord, hashes: array[int]) -> list[LineError]:
        ordered = sorted(hashes)
        suspects = {x for x, y in itertools.pairwise(ordered) if x == y}
        del ordered
        if not suspects:
            return []
        seen: dict[str, int] = {}
        out: list[LineError] = []
        async for lineno, raw in self._lines(batch):
            parsed = self._parse(batch, lineno, raw)
            if isinstance(parsed, list) or _h(parsed.custom_id) not in suspects:
                continue
            first = seen.setdefault(parsed.custom_id, lineno)
            if first != lineno and len(out) < MAX_REPORTED_ERRORS:
                out.append(
                    LineError(
                        lineno,
                        f"line {lineno}: custom_id '{parsed.custom_id}' is"
                        f" a duplicate of line {first}; custom_id must be unique",
                        "custom_id",
                        "duplicate_custom_id",
                    )
                )
        return out

    async def load(self, batch: BatchRecord) -> None:
        index = 0
        chunk: list[BatchLine] = []
        first = batch.loaded
        async for lineno, raw in self._lines(batch):
            if index < batch.loaded:
                index += 1
                continue
            chunk.append(_loaded_line(batch, lineno, raw))
            index += 1
            if len(chunk) >= self.chunk_lines:
                if not await self._load_chunk(batch, first, chunk):
                    return
                first += len(chunk)
                chunk = []
        if chunk:
            await self._load_chunk(batch, first, chunk)

    async def _load_chunk(self, batch: BatchRecord, first: int, chunk: list[BatchLine]) -> bool:
        return await self.store.batch_runs.load_chunk(self.id, batch, first, chunk, batch.kind)

    async def finalize(self, batch: BatchRecord) -> None:
        now = utcnow()
        made: dict[str, dict[str, Any] | None] = {"output": None, "error": None}
        for kind, count in (("output", batch.completed), ("error", batch.failed)):
            if count == 0:
                continue
            fid = new_id()
            info = await self.blobs.write(fid, self.store.batches.results(batch.id, kind))
            made[kind] = {
                "id": fid,
                "tenant": batch.tenant,
                "filename": f"batch_{batch.id}_{kind}.jsonl",
                "purpose": "batch_output" if kind == "output" else "batch_error",
                "bytes": info.bytes,
                "lines": info.lines,
                "sha256": info.sha256,
                "blob": fid,
                "batch_id": batch.id,
                "status": FileStatus.PROCESSED.value,
                "created_at": now,
                "expires_at": None,
                "deleted_at": None,
            }
        try:
            await self.store.batch_runs.finalize(self.id, batch, made["output"], made["error"])
        except Exception:
            for f in made.values():
                if f is not None:
                    await self.blobs.delete(str(f["id"]))
            raise
        log.info(
            "batch %s finalized: %d completed, %d failed", batch.id, batch.completed, batch.failed
        )
