"""The command line as a client of any backburner, over HTTP: submit, watch, results, cancel, ls,
usage.

Built on :mod:`backburner.client`; nothing here touches a database. The base URL and API key come
from ``--base-url`` / ``--api-key`` or ``BACKBURNER_BASE_URL`` / ``BACKBURNER_API_KEY``. Standard
output carries what scripts read (the new id alone on the last line, ``--json`` objects, tables);
progress and messages go to standard error. Bad input prints one line per problem, no traceback,
and exits 1 (docs/cli.md).
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:  # imported when a command runs: serve, worker and keys never need the client
    from backburner.client import BackburnerAPIError, Client, Snapshot
    from backburner.schemas.tenants import UsageReport, UsageRow

P = ParamSpec("P")
R = TypeVar("R")

BaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        envvar="BACKBURNER_BASE_URL",
        help="The backburner to talk to (default http://127.0.0.1:8000).",
        show_default=False,
    ),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="BACKBURNER_API_KEY", help="API key.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
MaxWaitOpt = Annotated[
    float | None, typer.Option("--timeout", help="Give up waiting after this many seconds.")
]

err = Console(stderr=True, highlight=False)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _one_line(exc: BackburnerAPIError) -> str:
    text = " ".join(str(exc).split())
    if exc.status == 401:
        text += "; check --api-key or BACKBURNER_API_KEY"
    return text


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can cause into one line each on standard error, and exit 1."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        from backburner.client import BackburnerAPIError, WaitTimeout, inputs

        try:
            return fn(*args, **kwargs)
        except inputs.InputError as exc:
            for problem in exc.problems:
                err.print(f"{exc.path}: {problem}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except BackburnerAPIError as exc:
            raise _fail(_one_line(exc)) from None
        except WaitTimeout as exc:
            raise _fail(str(exc)) from None
        except OSError as exc:
            what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            raise _fail(what) from None
        except KeyboardInterrupt:
            raise _fail("interrupted (the work on the server goes on)", 130) from None

    return run


def _client(base_url: str | None, api_key: str | None) -> Client:
    from backburner.client import Client

    return Client(base_url, api_key)


# ---------------------------------------------------------------- submit


def _submit(bb: Client, file: Path, *, group: bool, batch: bool) -> str:
    from backburner.client import inputs

    if not file.is_file():
        raise FileNotFoundError(2, "no such file", str(file))
    found = inputs.scan(file)
    if found.problems:
        raise inputs.InputError(file, found.problems)
    how = inputs.choose(found, group=group, batch=batch)
    assert found.kind is not None
    if how == "group":
        submitted = bb.submit_group(inputs.group_requests(file), kind=found.kind)
        err.print(f"submitted {found.count} requests as group {submitted.groupId}")
        return submitted.groupId
    with tempfile.TemporaryDirectory(prefix="backburner-") as tmp:
        upload = Path(tmp) / f"{file.stem}.jsonl"
        with upload.open("wb") as out:
            inputs.write_batch_file(file, out)
        uploaded = bb.upload_file(upload)
    created = bb.create_batch(uploaded.id, found.kind)
    err.print(f"submitted {found.count} requests as batch {created.id} (file {uploaded.id})")
    return created.id


# ---------------------------------------------------------------- watch


def _states(snap: Snapshot) -> str:
    parts = [f"[green]{snap.succeeded} ok[/green]", f"[red]{snap.failed} failed[/red]"]
    if snap.queued is None:
        parts.append(f"{snap.total - snap.finished} pending")
    else:
        parts += [f"{snap.queued} queued", f"{snap.running} running"]
    return " ".join(parts)


def _watch(
    bb: Client, object_id: str, *, as_json: bool, max_wait: float | None, interval: float
) -> Snapshot:
    from backburner.client import Backoff

    kind = bb.resolve(object_id)
    backoff = Backoff(initial=min(0.25, interval), maximum=interval)
    started = time.monotonic()
    if as_json:
        return bb.wait(object_id, kind, max_wait=max_wait, backoff=backoff)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[states]}"),
        TextColumn("{task.fields[rate]}/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    task = progress.add_task(f"{kind} {object_id}", total=None, states="", rate="-")

    def show(snap: Snapshot) -> None:
        elapsed = max(time.monotonic() - started, 1e-6)
        progress.update(
            task,
            total=snap.total or None,
            completed=snap.finished,
            description=f"{kind} {object_id} [bold]{snap.status}[/bold]",
            states=_states(snap),
            rate=f"{snap.finished / elapsed:.1f}",
        )

    with progress:
        snap = bb.wait(object_id, kind, max_wait=max_wait, backoff=backoff, on_update=show)
    return snap


def _verdict(snap: Snapshot, started: float) -> dict[str, Any]:
    return {**snap.to_json(), "elapsed_seconds": round(time.monotonic() - started, 3)}


# ---------------------------------------------------------------- results


@contextmanager
def _output(path: Path) -> Iterator[IO[bytes]]:
    if str(path) == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with path.open("wb") as out:
        yield out


def _results(bb: Client, object_id: str, out_path: Path) -> tuple[int, int]:
    """Stream the results to ``out_path``; returns (lines, failed lines)."""
    lines = failed = 0
    with _output(out_path) as out:
        for line in bb.iter_results(object_id):
            out.write(line)
            lines += 1
            try:
                failed += json.loads(line).get("error") is not None
            except (ValueError, AttributeError):
                failed += 1
    where = "standard output" if str(out_path) == "-" else str(out_path)
    err.print(f"wrote {lines} results ({failed} failed) to {where}")
    return lines, failed


# ---------------------------------------------------------------- commands


def submit(
    file: Annotated[Path, typer.Argument(help="JSONL (or JSON) file of requests.")],
    group: Annotated[bool, typer.Option("--group", help="Submit as a group (<= 50).")] = False,
    batch: Annotated[bool, typer.Option("--batch", help="Submit as a batch.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Watch it, then write results.")] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="With --wait: results file (default ID.jsonl)."),
    ] = None,
    base_url: BaseUrlOpt = None,
    api_key: ApiKeyOpt = None,
    max_wait: MaxWaitOpt = None,
) -> None:
    """Check FILE locally, submit it as a group (<= 50) or a batch, and print the id."""
    with _client(base_url, api_key) as bb:
        object_id = _submit(bb, file, group=group, batch=batch)
        ok = True
        if wait:
            snap = _watch(bb, object_id, as_json=False, max_wait=max_wait, interval=2.0)
            _results(bb, object_id, output or Path(f"{object_id}.jsonl"))
            ok = snap.ok
        typer.echo(object_id)
        if not ok:
            raise typer.Exit(1)


def watch(
    object_id: Annotated[str, typer.Argument(metavar="ID", help="A batch, group or generation.")],
    as_json: JsonOpt = False,
    interval: Annotated[float, typer.Option(help="Longest wait between polls (s).")] = 2.0,
    max_wait: MaxWaitOpt = None,
    base_url: BaseUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Show live progress until ID finishes; exit 0 only if every request succeeded."""
    started = time.monotonic()
    with _client(base_url, api_key) as bb:
        snap = _watch(bb, object_id, as_json=as_json, max_wait=max_wait, interval=interval)
    if as_json:
        typer.echo(json.dumps(_verdict(snap, started)))
    else:
        err.print(f"{snap.kind} {snap.id}: {snap.status}, {_states(snap)}")
    if not snap.ok:
        raise typer.Exit(1)


def results(
    object_id: Annotated[str, typer.Argument(metavar="ID", help="A batch, group or generation.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="JSONL file to write ('-': standard output).")
    ],
    base_url: BaseUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Stream results and errors to a JSONL file in submission order, with the custom ids."""
    with _client(base_url, api_key) as bb:
        _results(bb, object_id, output)


def cancel(
    object_id: Annotated[str, typer.Argument(metavar="ID", help="A batch, group or generation.")],
    base_url: BaseUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Cancel what has not started yet."""
    with _client(base_url, api_key) as bb:
        snap = bb.cancel(object_id)
    typer.echo(f"{snap.kind} {snap.id}: {snap.status}")


def _when(epoch: int | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ls(
    limit: Annotated[int, typer.Option(help="How many, newest first.", min=1, max=100)] = 20,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """List recent batches and their status (the API has no route that lists groups)."""
    with _client(base_url, api_key) as bb:
        page = bb.list_batches(limit=limit)
    if as_json:
        typer.echo(json.dumps([b.model_dump(mode="json") for b in page.data]))
        return
    table = Table("id", "status", "endpoint", "done", "failed", "total", "created")
    table.columns[0].no_wrap = True
    for b in page.data:
        c = b.request_counts
        table.add_row(
            b.id,
            b.status.value,
            b.endpoint,
            str(c.completed),
            str(c.failed),
            str(c.total),
            _when(b.created_at),
        )
    Console(width=max(120, Console().width)).print(table)
    err.print("groups are not listed: the API has no route that lists groups")


USAGE_COUNTS = ("requests", "failed", "prompt_tokens", "completion_tokens", "total_tokens")


def usage_table(report: UsageReport) -> Table:
    """One row per combination of the ``group_by`` keys, then the total."""
    keys: list[str] = list(report.group_by)
    label_columns = keys or [""]  # no keys: one row, the total
    table = Table(
        *label_columns,
        *(c.replace("_", " ") for c in USAGE_COUNTS),
        title=f"usage {report.start} to {report.end} (UTC days)",
    )
    for column in table.columns[: len(label_columns)]:
        column.overflow = "fold"  # a narrow terminal folds a long model name, never cuts it
    for column in table.columns[len(label_columns) :]:
        column.justify = "right"
        column.no_wrap = True

    def cells(row: UsageRow) -> list[str]:
        return [f"{getattr(row, c):,}" for c in USAGE_COUNTS]

    for i, row in enumerate(report.data):
        labels = ["" if getattr(row, k) is None else str(getattr(row, k)) for k in keys]
        table.add_row(*labels, *cells(row), end_section=i == len(report.data) - 1)
    blank = [""] * (len(label_columns) - 1)
    table.add_row("total", *blank, *cells(report.total), style="bold")
    return table


def usage(
    start: Annotated[
        str | None, typer.Option(help="First UTC day, YYYY-MM-DD (default: 6 days before end).")
    ] = None,
    end: Annotated[
        str | None, typer.Option(help="Last UTC day, YYYY-MM-DD, included (default: today).")
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option(
            "--group-by",
            help="Comma-separated keys: day, tenant, model, lane (default day,model,lane;"
            " '' for one total).",
        ),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Only this tenant (an admin key; default: every tenant).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    lane: Annotated[
        str | None, typer.Option(help="Only this lane: realtime, slow, group or batch.")
    ] = None,
    as_json: JsonOpt = False,
    base_url: BaseUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Requests and tokens per day, model and lane (a tenant's key: its own; an admin key: all)."""
    with _client(base_url, api_key) as bb:
        report = bb.usage(
            start=start, end=end, group_by=group_by, tenant=tenant, model=model, lane=lane
        )
    if as_json:
        typer.echo(json.dumps(report.model_dump(mode="json")))
        return
    Console(width=max(120, Console().width)).print(usage_table(report))


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``backburner`` command line."""
    for command in (submit, watch, results, cancel, ls, usage):
        app.command(name=command.__name__)(friendly(command))
