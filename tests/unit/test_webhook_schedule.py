"""The webhook retry schedule: the delays, their jitter, Retry-After, the settings that configure
it, and the dispatcher spending it (on the real store, the receiver an ``httpx.MockTransport``).

Schedules here are compressed to zeros or fractions of a second; nothing is timed.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from backburner.config import WEBHOOK_RETRY_SCHEDULE, Settings, load_settings
from backburner.core.clock import utcnow
from backburner.services import dispatcher_options
from backburner.store import Store
from backburner.store.tables import webhook_events
from backburner.webhooks.delivery import Deliverer, UrlGuard, next_delay
from backburner.webhooks.dispatcher import Dispatcher, DispatcherOptions
from backburner.webhooks.signing import new_secret

TENANT = "t1"
HOUR = 3600.0


# --------------------------------------------------------------------------- next_delay


def test_default_schedule_is_standard_webhooks() -> None:
    # at once, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: 8 attempts over about 28 hours
    assert WEBHOOK_RETRY_SCHEDULE == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert 27 * HOUR < sum(WEBHOOK_RETRY_SCHEDULE) < 28 * HOUR
    assert DispatcherOptions().retry_schedule == WEBHOOK_RETRY_SCHEDULE
    assert Settings().webhook_retry_schedule_seconds == list(WEBHOOK_RETRY_SCHEDULE)


def test_delays_follow_the_schedule_then_stop() -> None:
    schedule = (0.05, 0.1, 0.2)
    delays = [next_delay(n, None, schedule, jitter=0.0) for n in range(1, 6)]
    assert delays == [0.05, 0.1, 0.2, None, None]  # len(schedule) + 1 attempts in all
    assert next_delay(0, None, schedule) is None
    assert next_delay(1, None, (), jitter=0.0) is None  # an empty schedule: one attempt only
    assert [next_delay(n, None, jitter=0.0) for n in range(1, 9)] == [
        *map(float, WEBHOOK_RETRY_SCHEDULE),
        None,
    ]


@pytest.mark.parametrize("jitter", [0.1, 0.2, 0.5])
def test_jitter_stays_within_bounds_on_both_sides(jitter: float) -> None:
    rng = random.Random(11)
    for n, planned in enumerate(WEBHOOK_RETRY_SCHEDULE, start=1):
        got = [next_delay(n, None, jitter=jitter, rng=rng) for _ in range(200)]
        values = [d for d in got if d is not None]
        assert len(values) == 200
        assert all(planned * (1 - jitter) <= d <= planned * (1 + jitter) for d in values)
        assert min(values) < planned < max(values)  # spread earlier and later


def test_retry_after_pushes_later_never_earlier() -> None:
    schedule = (5.0, 300.0, 1800.0)
    assert next_delay(1, 60.0, schedule, jitter=0.0) == 60.0  # later than the schedule's 5 s
    assert next_delay(2, 60.0, schedule, jitter=0.0) == 300.0  # sooner than 5 min: ignored
    assert next_delay(1, 0.0, schedule, jitter=0.0) == 5.0
    rng = random.Random(3)
    for _ in range(100):
        d = next_delay(1, 60.0, schedule, rng=rng)
        assert d is not None and 60.0 <= d <= 60.0 * 1.2


def test_retry_after_is_capped_at_the_longest_delay() -> None:
    assert next_delay(1, 30 * 24 * HOUR, (5.0, 300.0), jitter=0.0) == 300.0
    assert next_delay(1, 30 * 24 * HOUR, jitter=0.0) == 36000.0
    # it never revives a spent schedule
    assert next_delay(3, 10.0, (5.0, 300.0), jitter=0.0) is None


# --------------------------------------------------------------------------- settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BACKBURNER_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
def test_schedule_setting_reaches_the_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKBURNER_WEBHOOK_RETRY_SCHEDULE_SECONDS", "[0.05, 0.1, 0.2]")
    monkeypatch.setenv("BACKBURNER_WEBHOOK_RETRY_JITTER", "0.1")
    opts = dispatcher_options(Settings())
    assert opts.retry_schedule == (0.05, 0.1, 0.2)
    assert opts.retry_jitter == 0.1


@pytest.mark.usefixtures("clean_env")
def test_schedule_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "bb.toml"
    path.write_text("webhook_retry_schedule_seconds = [1, 60, 3600]\n", encoding="utf-8")
    assert load_settings(path).webhook_retry_schedule_seconds == [1.0, 60.0, 3600.0]


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    "schedule", [[-1.0], [float("nan")], [float("inf")], [8 * 24 * HOUR], [1.0] * 101]
)
def test_bad_schedules_are_refused(schedule: list[float]) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(webhook_retry_schedule_seconds=schedule)
    assert "webhook_retry_schedule_seconds" in str(info.value)


@pytest.mark.usefixtures("clean_env")
def test_old_keys_become_a_schedule(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="backburner.config"):
        s = Settings(webhook_retry_base_seconds=0.05)
    assert s.webhook_retry_schedule_seconds == [0.05, 0.1, 0.2]  # 3 retries, doubling
    assert "webhook_retry_schedule_seconds" in caplog.text
    s = Settings(webhook_max_retries=5, webhook_retry_base_seconds=10, webhook_retry_cap_seconds=30)
    assert s.webhook_retry_schedule_seconds == [10.0, 20.0, 30.0, 30.0, 30.0]
    assert Settings(webhook_max_retries=0).webhook_retry_schedule_seconds == []


@pytest.mark.usefixtures("clean_env")
def test_old_keys_with_the_new_one_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bb.toml"
    path.write_text(
        "webhook_max_retries = 3\nwebhook_retry_schedule_seconds = [5, 300]\n", encoding="utf-8"
    )
    with pytest.raises(ValidationError) as info:
        load_settings(path)
    message = str(info.value)
    assert "webhook_max_retries" in message
    assert "set only webhook_retry_schedule_seconds" in message


# --------------------------------------------------------------------------- the dispatcher


@dataclass
class Endpoint:
    """A MockTransport handler: OPTIONS 204; each POST answers the next scripted status (then
    200), with ``Retry-After`` when one is given."""

    statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None
    posts: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "OPTIONS":
            return httpx.Response(204)
        self.posts.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        return httpx.Response(status, headers=headers)

    def ids(self) -> list[str]:
        return [p.headers["webhook-id"] for p in self.posts]


@pytest.fixture
def endpoint() -> Endpoint:
    return Endpoint()


@pytest.fixture
async def client(endpoint: Endpoint) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as c:
        yield c


def dispatcher(store: Store, client: httpx.AsyncClient, schedule: tuple[float, ...]) -> Dispatcher:
    deliverer = Deliverer(client, UrlGuard(deny_private=False), timeout=5.0)
    opts = DispatcherOptions(retry_schedule=schedule, retry_jitter=0.0, poll_interval=0.01)
    return Dispatcher(store, deliverer, opts)


async def drain(d: Dispatcher, store: Store, rounds: int = 20) -> dict[str, int]:
    """Burst runs until nothing is pending (each round drains what is due now)."""
    counts: dict[str, int] = {}
    for _ in range(rounds):
        await d.run(burst=True)
        counts = await store.outbox.count_by_state(TENANT)
        if not counts.get("pending"):
            break
    return counts


async def one_event(store: Store) -> tuple[str, str]:
    hook = await store.webhooks.create(TENANT, url="http://127.0.0.1:9/hook", secret=new_secret())
    return hook.id, await store.outbox.enqueue_test(TENANT, hook.id)


async def test_spent_schedule_fails_after_len_plus_one_attempts(
    store: Store, client: httpx.AsyncClient, endpoint: Endpoint
) -> None:
    endpoint.statuses = [503] * 10
    hook_id, event_id = await one_event(store)
    counts = await drain(dispatcher(store, client, (0.0, 0.0, 0.0)), store)
    assert counts == {"failed": 1}
    assert endpoint.ids() == [event_id] * 4  # 3 delays: 4 attempts, one message id
    log = await store.outbox.attempts(TENANT, hook_id)
    assert sorted(a.attempt for a in log) == [1, 2, 3, 4]
    assert {(a.status_code, a.delivery_state) for a in log} == {(503, "failed")}


async def test_recovering_receiver_gets_the_event_once(
    store: Store, client: httpx.AsyncClient, endpoint: Endpoint
) -> None:
    endpoint.statuses = [503, 502, 500]
    _, event_id = await one_event(store)
    assert await drain(dispatcher(store, client, (0.0, 0.0, 0.0)), store) == {"delivered": 1}
    assert endpoint.ids() == [event_id] * 4


@pytest.mark.parametrize(("status", "disabled"), [(400, False), (404, False), (410, True)])
async def test_final_answers_are_not_retried(
    store: Store, client: httpx.AsyncClient, endpoint: Endpoint, status: int, disabled: bool
) -> None:
    endpoint.statuses = [status]
    hook_id, _ = await one_event(store)
    assert await drain(dispatcher(store, client, (0.0, 0.0)), store) == {"failed": 1}
    assert len(endpoint.posts) == 1
    assert (await store.webhooks.get(TENANT, hook_id)).enabled is not disabled


@pytest.mark.parametrize("status", [408, 429])
async def test_timeout_and_too_many_requests_are_retried(
    store: Store, client: httpx.AsyncClient, endpoint: Endpoint, status: int
) -> None:
    endpoint.statuses = [status]
    await one_event(store)
    assert await drain(dispatcher(store, client, (0.0,)), store) == {"delivered": 1}
    assert len(endpoint.posts) == 2


async def test_retry_after_sets_the_next_attempt(
    store: Store, client: httpx.AsyncClient, endpoint: Endpoint
) -> None:
    endpoint.statuses = [429]
    endpoint.retry_after = "120"
    _, event_id = await one_event(store)
    before = utcnow()
    await dispatcher(store, client, (1.0, 600.0)).run(burst=True)
    after = utcnow()
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(webhook_events.c.state, webhook_events.c.next_attempt_at).where(
                    webhook_events.c.id == event_id
                )
            )
        ).one()
    assert row.state == "pending"
    # 120 s, not the schedule's 1 s (and below the 600 s cap)
    assert before + timedelta(seconds=120) <= row.next_attempt_at <= after + timedelta(seconds=120)
    assert json.loads(endpoint.posts[0].content)["event"] == "webhook.test"
