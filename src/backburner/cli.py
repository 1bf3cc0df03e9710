"""The command line: the composition root for serve, worker, keys, tenants and db."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from backburner import __version__
from backburner.cli_client import register as register_client_commands
from backburner.cli_tenants import register as register_tenant_commands
from backburner.config import Settings, load_settings

app = typer.Typer(help="backburner: the slow lane for LLM inference.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys and tenants.", no_args_is_help=True)
db_app = typer.Typer(help="The database.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
register_tenant_commands(app)  # backburner tenants ...: cli_tenants.py
hooks_app = typer.Typer(help="Webhooks (per tenant).", no_args_is_help=True)
app.add_typer(hooks_app, name="webhooks")
TenantOpt = Annotated[str, typer.Option(help="Tenant that owns the webhook.")]

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (or set BACKBURNER_CONFIG)."),
]


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived service loop on uvloop where it is installed (as uvicorn does)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return load_settings(config, **clean)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # one line per upstream call and webhook attempt is noise (and costs CPU at volume);
    # backburner logs failures itself
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Serve the API only; run workers elsewhere.")
    ] = False,
) -> None:
    """Serve the API (and, by default, a worker in the same process)."""
    import uvicorn

    from backburner.api.app import create_app
    from backburner.dashboard import mount
    from backburner.store.migrate import upgrade

    settings = _settings(config, host=host, port=port, run_worker=False if no_worker else None)
    _logging(settings.log_level)
    upgrade(settings.database_url)
    app = create_app(settings, migrate=False)
    if settings.dashboard:
        mount(app)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=15,
    )


@app.command()
def worker(
    config: ConfigOpt = None,
    burst: Annotated[bool, typer.Option(help="Drain what is queued now, then exit.")] = False,
) -> None:
    """Run a worker against the configured database (on this or another machine)."""
    from backburner.services import Services
    from backburner.store.migrate import upgrade

    settings = _settings(config)
    _logging(settings.log_level)
    upgrade(settings.database_url)

    async def main() -> None:
        services = Services.from_settings(settings, run_worker=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await services.start()
            if burst:
                await services.run_burst()
            else:
                services.start_background()
                await stopping.wait()
        finally:
            await services.close()

    _run_loop(main())


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
    admin: Annotated[
        bool, typer.Option(help="The dashboard shows every tenant and its keys page to it.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from backburner.store import Store
    from backburner.store.migrate import upgrade

    settings = _settings(config)
    upgrade(settings.database_url)

    async def main() -> str:
        store = Store(settings.database_url)
        try:
            _, key = await store.keys.create(tenant, name, admin=admin)
        finally:
            await store.close()
        return key

    typer.echo(asyncio.run(main()))


@keys_app.command("list")
def keys_list(config: ConfigOpt = None) -> None:
    """List API keys (prefixes only)."""
    from backburner.store import Store
    from backburner.store.migrate import upgrade

    settings = _settings(config)
    upgrade(settings.database_url)

    async def main() -> list[dict[str, Any]]:
        store = Store(settings.database_url)
        try:
            return await store.keys.list()
        finally:
            await store.close()

    table = Table("id", "tenant", "prefix", "name", "admin", "created", "revoked")
    for k in asyncio.run(main()):
        table.add_row(
            k["id"],
            k["tenant"],
            k["prefix"] + "...",
            k["name"] or "",
            "yes" if k["admin"] else "",
            str(k["created_at"]),
            str(k["revoked_at"] or ""),
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None) -> None:
    """Revoke an API key by its id."""
    from backburner.store import Store

    settings = _settings(config)

    async def main() -> bool:
        store = Store(settings.database_url)
        try:
            return await store.keys.revoke(key_id)
        finally:
            await store.close()

    if not asyncio.run(main()):
        typer.echo(f"no active key with id {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply database migrations."""
    from backburner.store.migrate import upgrade

    settings = _settings(config)
    upgrade(settings.database_url)
    typer.echo("database is at the newest schema")


def _with_store(settings: Settings, fn: Any) -> Any:
    from backburner.store import Store
    from backburner.store.migrate import upgrade

    upgrade(settings.database_url)

    async def run() -> Any:
        store = Store(settings.database_url)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


@hooks_app.command("create")
def webhooks_create(
    url: str,
    tenant: TenantOpt = "default",
    name: Annotated[str | None, typer.Option(help="A label.")] = None,
    event: Annotated[
        list[str] | None, typer.Option(help="Subscribe to this event (repeat); default all.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Register a webhook and print it with its signing secret (shown once)."""
    from backburner.schemas.webhook import WebhookCreate
    from backburner.services import webhook_targets
    from backburner.webhooks.delivery import UrlGuard
    from backburner.webhooks.signing import new_secret

    settings = _settings(config)
    body = WebhookCreate.model_validate({"url": url, "name": name, "events": event})

    async def go(store: Any) -> Any:
        await UrlGuard(webhook_targets(settings, store)).check(body.url)
        return await store.webhooks.create(
            tenant, url=body.url, secret=new_secret(), name=body.name, events=body.events
        )

    rec = _with_store(settings, go)
    typer.echo(json.dumps(rec.to_wire(with_secret=True), indent=2))


@hooks_app.command("list")
def webhooks_list(tenant: TenantOpt = "default", config: ConfigOpt = None) -> None:
    """List a tenant's webhooks."""
    settings = _settings(config)
    recs = _with_store(settings, lambda store: store.webhooks.list(tenant))
    table = Table("id", "url", "name", "events", "enabled")
    table.columns[0].overflow = "fold"
    table.columns[0].no_wrap = True
    for w in recs:
        table.add_row(w.id, w.url, w.name or "", ", ".join(w.events), str(w.enabled))
    Console(width=200).print(table)


@hooks_app.command("delete")
def webhooks_delete(
    webhook_id: str, tenant: TenantOpt = "default", config: ConfigOpt = None
) -> None:
    """Delete a webhook."""
    settings = _settings(config)
    _with_store(settings, lambda store: store.webhooks.delete(tenant, webhook_id))
    typer.echo(f"deleted {webhook_id}")


@hooks_app.command("test")
def webhooks_test(webhook_id: str, tenant: TenantOpt = "default", config: ConfigOpt = None) -> None:
    """Queue a webhook.test event (a running worker delivers it)."""
    settings = _settings(config)
    event_id = _with_store(settings, lambda store: store.outbox.enqueue_test(tenant, webhook_id))
    typer.echo(f"queued {event_id}")


@hooks_app.command("deliveries")
def webhooks_deliveries(
    webhook_id: str, tenant: TenantOpt = "default", config: ConfigOpt = None
) -> None:
    """Show the delivery log of a webhook."""
    settings = _settings(config)
    attempts = _with_store(settings, lambda store: store.outbox.attempts(tenant, webhook_id))
    table = Table("time", "delivery", "event", "attempt", "status", "ms", "error")
    for a in attempts:
        table.add_row(
            str(a.created_at),
            a.event_id,
            a.event,
            str(a.attempt),
            str(a.status_code or ""),
            str(a.duration_ms),
            a.error or "",
        )
    Console().print(table)


register_client_commands(app)  # submit, watch, results, cancel, ls, usage: cli_client.py


def main() -> None:
    from pydantic import ValidationError

    from backburner.errors import BackburnerError
    from backburner.schemas.validation import problems_from

    try:
        app()
    except BackburnerError as exc:
        typer.secho(f"error: {exc.message}", err=True, fg="red")
        raise SystemExit(1) from None
    except ValidationError as exc:
        for problem in problems_from(exc.errors(include_url=False), root="input"):
            typer.secho(f"error: {problem}", err=True, fg="red")
        raise SystemExit(1) from None
