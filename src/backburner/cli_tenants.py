"""``backburner tenants``: weights, limits, disable and enable, on the database directly (like
``backburner keys``; the admin API at ``/v1/admin/tenants`` does the same over HTTP).

A limit is given as ``--limit NAME=VALUE``: a whole number, ``none`` (no limit for this tenant,
whatever the defaults say) or, with ``set``, ``default`` (drop the tenant's own limit: the
``[limits]`` table applies again). Bodies are checked with the API's own models
(:class:`~backburner.schemas.tenants.TenantCreate`, ``TenantUpdate``). Bad input prints one line
per problem on standard error, no traceback, and exits 1.

Servers see a change within a second (they cache keys and tenants that long); submissions read
the tenant in their own transaction and see it at once.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from backburner.schemas.tenants import LIMIT_NAMES, Tenant, TenantCreate, TenantUpdate

if TYPE_CHECKING:
    from backburner.store import Store

P = ParamSpec("P")
R = TypeVar("R")

tenants_app = typer.Typer(
    help="Tenants: weights, limits, disable and enable (on the database directly).",
    no_args_is_help=True,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (or set BACKBURNER_CONFIG)."),
]
NameArg = Annotated[
    str, typer.Argument(metavar="NAME", help="The tenant, as its API keys name it.")
]
WeightOpt = Annotated[
    str | None,
    typer.Option(
        "--weight", metavar="W", help="Share of background capacity, 0.01 to 100 (default 1)."
    ),
]
LimitOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--limit",
        metavar="NAME=VALUE",
        help=f"Repeat. NAME: {', '.join(LIMIT_NAMES)}. VALUE: a whole number or 'none'"
        " (no limit); with set also 'default' (drop its own limit).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


class InputProblems(Exception):
    """Bad input: each line is printed on standard error."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0] if lines else "")
        self.lines = lines


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Bad input and refusals from the store (no such tenant, exists already) become one line
    each on standard error and exit 1."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        from backburner.errors import BackburnerError, Conflict, NotFound

        try:
            return fn(*args, **kwargs)
        except InputProblems as exc:
            lines = exc.lines
        except NotFound as exc:
            lines = (f"{exc.message} Create it with: backburner tenants create NAME",)
        except Conflict as exc:
            what = exc.message.split(";")[0]  # the API's advice (PATCH ...) is not ours
            lines = (f"{what}; change it with: backburner tenants set NAME",)
        except BackburnerError as exc:
            lines = (exc.message,)
        except FileNotFoundError as exc:  # --config names no file
            lines = (str(exc),)
        for line in lines:
            typer.secho(f"error: {line}", err=True, fg="red")
        raise typer.Exit(1)

    return run


def parse_weight(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InputProblems(f"--weight: expected a number from 0.01 to 100, got '{raw}'") from None


def parse_limits(items: list[str] | None, *, allow_default: bool) -> dict[str, int | str | None]:
    """``NAME=VALUE`` options as the API's ``limits`` object (bounds are the model's to check)."""
    out: dict[str, int | str | None] = {}
    for item in items or []:
        name, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not name or not raw:
            raise InputProblems(
                f"--limit '{item}': expected NAME=VALUE, for example tokens_per_day=100000"
            )
        if name not in LIMIT_NAMES:
            raise InputProblems(f"--limit: unknown limit '{name}'; known: {', '.join(LIMIT_NAMES)}")
        if name in out:
            raise InputProblems(f"--limit: {name} is given twice")
        value: int | str | None
        if raw.lower() == "none":
            value = None
        elif raw.lower() == "default":
            if not allow_default:
                raise InputProblems(
                    f"--limit {name}=default: a new tenant takes the default for every limit it"
                    " does not set; leave it out"
                )
            value = "default"
        else:
            try:
                value = int(raw)
            except ValueError:
                words = "a whole number, 'none' or 'default'" if allow_default else ""
                words = words or "a whole number or 'none'"
                raise InputProblems(f"--limit {name}: expected {words}, got '{raw}'") from None
        out[name] = value
    return out


def checked(model: type[TenantCreate] | type[TenantUpdate], payload: dict[str, Any]) -> Any:
    from backburner.schemas.validation import check

    body, problems = check(model, payload, root="input")
    if body is None:
        raise InputProblems(*(str(p) for p in problems))
    return body


def with_store(config: Path | None, fn: Callable[[Store], Awaitable[R]]) -> R:
    """Run ``fn`` on a Store of the configured database (migrated first), with the configured
    ``[limits]`` as the defaults."""
    from backburner.config import load_settings
    from backburner.store import Store
    from backburner.store.migrate import upgrade

    settings = load_settings(config)
    upgrade(settings.database_url)

    async def run() -> R:
        store = Store(settings.database_url, limits=settings.limits)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _console() -> Console:
    return Console(width=max(120, Console().width))


def _limit(value: int | None) -> str:
    return "none" if value is None else f"{value:,}"


def _own_limits(t: Tenant) -> str:
    return ", ".join(f"{k}={'none' if v is None else v}" for k, v in t.limits.items())


def _status(t: Tenant) -> str:
    return f"disabled since {t.disabled_at:%Y-%m-%d %H:%M}" if t.disabled else "enabled"


def print_tenant(t: Tenant, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(t.model_dump(mode="json")))
        return
    created = f"{t.created_at:%Y-%m-%d %H:%M:%S}" if t.created_at else ""
    console = _console()
    console.print(
        f"tenant {t.id}: weight {t.weight:g}, {_status(t)},"
        f" {t.open_generations} open generations, created {created}",
        markup=False,
        highlight=False,
    )
    table = Table("limit", "own", "in effect")
    effective = t.effective_limits.model_dump()
    for name in LIMIT_NAMES:
        own = _limit(t.limits[name]) if name in t.limits else "(default)"
        table.add_row(name, own, _limit(effective[name]))
    console.print(table)


# ---------------------------------------------------------------- commands


@tenants_app.command("create")
@friendly
def tenants_create(
    name: NameArg,
    weight: WeightOpt = None,
    limit: LimitOpt = None,
    disabled: Annotated[
        bool, typer.Option("--disabled", help="Create it disabled: its keys are refused.")
    ] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Create a tenant with its own weight and limits (what it does not set takes the default)."""
    payload: dict[str, Any] = {"id": name, "limits": parse_limits(limit, allow_default=False)}
    w = parse_weight(weight)
    if w is not None:
        payload["weight"] = w
    body: TenantCreate = checked(TenantCreate, payload)

    async def go(store: Store) -> Tenant:
        made = await store.tenants.create(
            body.id, weight=body.weight, limits={str(k): v for k, v in body.limits.items()}
        )
        if disabled:
            made = await store.tenants.update(body.id, disabled=True)
        return made

    print_tenant(with_store(config, go), as_json)


@tenants_app.command("list")
@friendly
def tenants_list(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List every tenant: weight, status, open generations and its own limits."""

    async def go(store: Store) -> list[Tenant]:
        found: list[Tenant] = []
        while True:
            page = await store.tenants.list(after=found[-1].id if found else None, limit=500)
            found += page
            if len(page) < 500:
                return found

    tenants = with_store(config, go)
    if as_json:
        typer.echo(json.dumps([t.model_dump(mode="json") for t in tenants]))
        return
    table = Table("tenant", "weight", "status", "open", "own limits", "created")
    for i in (0, 2, 5):
        table.columns[i].no_wrap = True
    for t in tenants:
        table.add_row(
            t.id,
            f"{t.weight:g}",
            _status(t),
            str(t.open_generations),
            _own_limits(t),
            f"{t.created_at:%Y-%m-%d %H:%M:%S}" if t.created_at else "",
        )
    _console().print(table)


@tenants_app.command("show")
@friendly
def tenants_show(name: NameArg, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show a tenant: weight, status, open generations, its own limits and those in effect."""
    print_tenant(with_store(config, lambda store: store.tenants.get(name)), as_json)


@tenants_app.command("set")
@friendly
def tenants_set(
    name: NameArg,
    weight: WeightOpt = None,
    limit: LimitOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Change a tenant's weight or limits; what is not given stays as it is."""
    payload: dict[str, Any] = {"limits": parse_limits(limit, allow_default=True)}
    w = parse_weight(weight)
    if w is not None:
        payload["weight"] = w
    if w is None and not payload["limits"]:
        raise InputProblems("nothing to change: give --weight or --limit")
    body: TenantUpdate = checked(TenantUpdate, payload)
    limits: dict[str, int | str | None] = {str(k): v for k, v in body.limits.items()}
    changed = with_store(
        config, lambda store: store.tenants.update(name, weight=body.weight, limits=limits)
    )
    print_tenant(changed, as_json)


@tenants_app.command("disable")
@friendly
def tenants_disable(name: NameArg, config: ConfigOpt = None) -> None:
    """Disable a tenant: its keys are refused and its queued work is held."""
    with_store(config, lambda store: store.tenants.update(name, disabled=True))
    typer.echo(f"disabled {name}: its keys are refused and its queued work is held")


@tenants_app.command("enable")
@friendly
def tenants_enable(name: NameArg, config: ConfigOpt = None) -> None:
    """Enable a disabled tenant: its keys work again and its held work is queued again."""
    with_store(config, lambda store: store.tenants.update(name, disabled=False))
    typer.echo(f"enabled {name}")


@tenants_app.command("recount")
@friendly
def tenants_recount(
    name: Annotated[
        str | None, typer.Argument(metavar="[NAME]", help="One tenant (default: every tenant).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Recount open generations from the generations themselves (a repair)."""

    async def go(store: Store) -> int:
        if name is not None:
            await store.tenants.get(name)  # no such tenant: say so
        return await store.tenants.recount(name)

    fixed = with_store(config, go)
    which = f"tenant {name}" if name is not None else "every tenant"
    typer.echo(f"recounted open generations of {which}: {fixed} fixed")


def register(app: typer.Typer) -> None:
    """Add ``backburner tenants ...`` to the command line."""
    app.add_typer(tenants_app, name="tenants")
