"""The world the API fuzz tests run in: the app in-process on one database (no background
loops), the objects a route's path can name, and burst-mode services over the same database
that run what was accepted (batches validated and loaded, generations run) on demand.

Checks shared by the fuzz tests are here too: an answer is never a 5xx and a refusal is the
OpenAI envelope; a refusal changes nothing (:meth:`World.snapshot`); what was accepted can be
read and announced (:meth:`World.events`, :func:`check_payload`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from backburner.api.app import create_app
from backburner.core.states import Kind
from backburner.errors import BackendRejected
from backburner.schemas.error import ErrorEnvelope
from backburner.schemas.events import headers_for
from backburner.services import Services
from backburner.store import Store
from backburner.store.tables import generations, metadata, webhook_events
from backburner.store.usage import RealtimeUsage
from tests.conftest import FAKE_MODEL, make_settings
from tests.support.fake_backend import FakeBackend
from tests.support.services import burst_services

TENANT = "default"  # the server runs open (no API key): every object is this tenant's
HOOK_URL = "http://127.0.0.1:9/hook"
REJECT = "REJECT"
MAX_MESSAGE = 1000


class RejectingBackend(FakeBackend):
    """Echoes, except that a request whose last message says REJECT is refused (a 4xx)."""

    async def run(
        self, kind: Kind, body: dict[str, Any], *, background: bool = False
    ) -> dict[str, Any]:
        messages = body.get("messages")
        if isinstance(messages, list) and messages and messages[-1].get("content") == REJECT:
            raise BackendRejected("upstream HTTP 400: rejected", upstream_status=400)
        return await super().run(kind, body, background=background)


def chat_line(custom_id: str, text: str = "hi") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": FAKE_MODEL, "messages": [{"role": "user", "content": text}]},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def envelope(r: httpx.Response, said: object) -> dict[str, Any]:
    """The error of a refusal, checked to be the OpenAI envelope."""
    assert r.headers.get("content-type", "").startswith("application/json"), (said, r.headers)
    body = r.json()
    assert set(body) == {"error"}, (said, body)
    err: dict[str, Any] = ErrorEnvelope.model_validate(body).error.model_dump()
    assert set(body["error"]) == {"message", "type", "param", "code"}, (said, body)
    assert err["message"].strip(), (said, body)
    return err


def check_answer(r: httpx.Response, said: object) -> dict[str, Any] | None:
    """Never a 5xx; a refusal is the envelope (returned), its message of a readable size
    (:data:`MAX_MESSAGE` characters besides the name of the field)."""
    assert r.status_code < 500, f"{said}\n-> {r.status_code} {r.text[:2000]}"
    if r.status_code < 400:
        return None
    err = envelope(r, said)
    # the field is named whatever its length; nothing else in the message grows with the input
    rest = err["message"].replace(err["param"], "") if err["param"] else err["message"]
    assert len(rest) <= MAX_MESSAGE, f"{said}: a {len(rest)}-character message: {rest[:300]}"
    return err


def check_payload(payload: dict[str, Any]) -> None:
    """An event body goes out as the dispatcher sends it: UTF-8 JSON and its headers."""
    json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    headers_for(payload)


def check_wire(value: Any) -> None:
    """What the API answers (or stores to answer) is strict UTF-8 JSON."""
    json.dumps(value, ensure_ascii=False, allow_nan=False).encode()


@dataclass
class World:
    client: httpx.AsyncClient
    services: Services
    files_dir: Path
    ids: dict[str, str] = field(default_factory=dict)
    # the app's realtime usage tally (its own services): written before each snapshot
    realtime_usage: RealtimeUsage | None = None
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def store(self) -> Store:
        return self.services.store

    @classmethod
    async def start(cls, db_url: str, tmp_path: Path, **overrides: Any) -> World:
        """``overrides``: settings of the burst-mode services (the batch runner's limits)."""
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            files_dir = tmp_path / "files"
            services = await stack.enter_async_context(
                burst_services(db_url, files_dir, RejectingBackend("fake"), **overrides)
            )
            if not services.store.sqlite:  # a database shared by the session: empty it
                async with services.store.engine.begin() as conn:
                    names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
                    await conn.execute(sa.text(f"TRUNCATE {names}"))
            settings = make_settings(db_url, run_worker=False, files_dir=str(files_dir))
            app = create_app(settings, backends={"fake": RejectingBackend("fake")}, migrate=False)
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://testserver"
                )
            )
            world = cls(client, services, files_dir, _stack=stack)
            world.realtime_usage = app.state.services.realtime_usage
            await world._populate()
        except BaseException:
            await stack.aclose()
            raise
        return world

    async def close(self) -> None:
        await self._stack.aclose()

    async def _ok(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        r = await self.client.request(method, url, **kwargs)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    async def _populate(self) -> None:
        """Objects for paths to name: a webhook (every event), another to change, an input
        file, a finished batch with a failed line (so it can be retried) and a new one (so it
        can be cancelled), a queued generation and group, and a webhook.test event."""
        hook = await self._ok("POST", "/v1/webhooks", json={"url": HOOK_URL})
        other = await self._ok("POST", "/v1/webhooks", json={"url": HOOK_URL, "name": "other"})
        data = jsonl([chat_line("good-1"), chat_line("good-2")])
        file = await self.upload(data)
        failing = await self.upload(jsonl([chat_line("ok"), chat_line("no", REJECT)]))
        batch = await self._ok(
            "POST",
            "/v1/batches",
            json={
                "input_file_id": failing["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        await self.drain()
        new_batch = await self._ok(
            "POST",
            "/v1/batches",
            json={
                "input_file_id": file["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        chat = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
        gen = await self._ok("POST", "/v1/slow/chat/completions", json=chat)
        group = await self._ok(
            "POST", "/v1/slow/group/chat/completions", json={"requests": [chat, chat]}
        )
        event = await self._ok("POST", f"/v1/webhooks/{hook['id']}/test")
        tenant = await self._ok("POST", "/v1/admin/tenants", json={"id": "fuzz-other"})
        self.ids = {
            "hook": hook["id"],
            "other_hook": other["id"],
            "file": file["id"],
            "batch": batch["id"],
            "new_batch": new_batch["id"],
            "generation": gen["id"],
            "group": group["groupId"],
            "delivery": event["id"],
            "other_tenant": tenant["id"],
        }

    async def upload(self, data: bytes, filename: str = "in.jsonl") -> dict[str, Any]:
        return await self._ok(
            "POST",
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": (filename, data, "application/jsonl")},
        )

    async def drain(self) -> None:
        """Run what is queued now: batches validated and loaded, generations run, batches
        finalized. Webhook events stay in the outbox (nothing is delivered)."""
        assert self.services.batches is not None and self.services.worker is not None
        await self.services.batches.run(burst=True)
        await self.services.worker.run(burst=True)
        await self.services.batches.run(burst=True)

    async def snapshot(self) -> dict[str, Any]:
        """Every row of every table, and the blobs on disk: a refusal changes none of it."""
        out: dict[str, Any] = {}
        if self.realtime_usage is not None:
            await self.realtime_usage.flush()  # what earlier examples ran, written now
        async with self.store.engine.connect() as conn:
            for table in metadata.sorted_tables:
                rows = (await conn.execute(sa.select(table))).all()
                out[table.name] = sorted((tuple(r) for r in rows), key=repr)
        blobs = self.files_dir.rglob("*") if self.files_dir.exists() else iter(())
        out["blobs"] = sorted(str(p) for p in blobs if p.is_file())
        return out

    async def batch_generations(self, batch_id: str) -> int:
        async with self.store.engine.connect() as conn:
            query = sa.select(sa.func.count()).where(generations.c.batch_id == batch_id)
            return int((await conn.execute(query)).scalar_one())

    async def events(self, **where: str) -> list[tuple[str, str, str | None, dict[str, Any]]]:
        """(id, event, url, payload) of each outbox event whose payload has the ``where`` keys;
        each payload checked to go out as the dispatcher sends it."""
        async with self.store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(
                        webhook_events.c.id,
                        webhook_events.c.event,
                        webhook_events.c.url,
                        webhook_events.c.payload,
                    ).where(webhook_events.c.tenant == TENANT)
                )
            ).all()
        found = []
        for event_id, event, url, text in rows:
            payload = json.loads(text)
            if all(payload.get(k) == v for k, v in where.items()):
                check_payload(payload)
                found.append((event_id, event, url, payload))
        return found
