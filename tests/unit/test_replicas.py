"""Replicas of one engine: settings, owner hashing with bounded loads, realtime placement and
the claim filter, and a burst drain over two replicas."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from backburner.backends.engines import Engines
from backburner.config import BackendSettings
from backburner.core.prefix import prefix_key
from backburner.core.states import Kind
from backburner.schemas.generation import NewGeneration
from tests.support.fake_backend import FakeBackend
from tests.support.services import burst_services

URLS = ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1", "http://10.0.0.3:8000/v1"]
M = "m"


def replicated(n: int = 3, **extra: Any) -> BackendSettings:
    return BackendSettings(name="b", type="openai", base_urls=URLS[:n], models=[M], **extra)


def engines(n: int = 3, **extra: Any) -> tuple[Engines, dict[str, FakeBackend]]:
    fakes = {f"b[{i}]": FakeBackend(f"b[{i}]") for i in range(n)}
    return Engines([replicated(n, **extra)], dict(fakes)), fakes


def chat(system: str, user: str = "q") -> dict[str, Any]:
    return {
        "model": M,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }


def prompt(i: int) -> str:
    return f"System prompt number {i}. " + "Answer in the house style. " * 20


def test_base_urls_make_one_replica_each() -> None:
    s = replicated()
    assert [(r.name, r.base_url) for r in s.replicas()] == [
        (f"b[{i}]", u) for i, u in enumerate(URLS)
    ]
    one = BackendSettings(name="b", type="openai", base_urls=URLS[:1], models=[M])
    assert [(r.name, r.base_url) for r in one.replicas()] == [("b", URLS[0])]


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"base_urls": [URLS[0], URLS[0]]}, "twice"),
        ({"base_urls": URLS[:2], "base_url": "http://other/v1"}, "one of base_urls"),
        ({"base_urls": URLS[:2], "metrics_url": "http://x/metrics"}, "metrics_url"),
    ],
)
def test_replica_settings_are_checked(extra: dict[str, Any], said: str) -> None:
    with pytest.raises(ValidationError, match=said):
        BackendSettings(name="b", type="openai", models=[M], **extra)


def test_each_prefix_has_one_owner_and_keys_spread_over_the_replicas() -> None:
    e, _ = engines()
    route = e.route(M)
    owners = Counter(route.owner(prefix_key(M, chat(prompt(i)))).lane.name for i in range(300))
    assert set(owners) == {"b[0]", "b[1]", "b[2]"}
    assert min(owners.values()) > 60  # roughly even
    # the same prefix, whatever the question: the same replica, every time
    picks = {e.pick(chat(prompt(7), f"question {k}"))[0].lane.name for k in range(20)}
    assert len(picks) == 1


def test_an_overloaded_owner_spills_to_the_least_loaded() -> None:
    e, _ = engines()
    route = e.route(M)
    body = chat(prompt(1))
    owner = route.owner(prefix_key(M, body))
    assert e.pick(body)[0] is owner
    owner.lane.controller.background_started(8)  # 8 running there, none elsewhere
    spilled = e.pick(body)[0]
    assert spilled is not owner and spilled.load() == 0
    for r in route.replicas:  # everyone equally busy: back to the owner
        if r is not owner:
            r.lane.controller.background_started(8)
    assert e.pick(body)[0] is owner


def test_a_claim_on_a_replica_takes_its_own_prefixes_and_spilled_ones() -> None:
    e, _ = engines(2)
    route = e.route(M)
    keys = [prefix_key(M, chat(prompt(i))) for i in range(40)]
    mine = {k for k in keys if route.owner(k).lane.name == "b[0]"}
    allowed = e.affinity("b[0]")
    assert allowed is not None and allowed(None)
    assert {k for k in keys if allowed(k)} == mine
    other = route.by_lane["b[1]"]
    other.lane.controller.background_started(6)
    allowed = e.affinity("b[0]")
    assert allowed is not None and all(allowed(k) for k in keys)


def test_a_single_server_has_no_affinity_filter() -> None:
    s = BackendSettings(name="b", type="openai", base_url=URLS[0], models=[M])
    e = Engines([s], {"b": FakeBackend("b")})
    assert e.affinity("b") is None
    assert e.pick(chat(prompt(1)))[0].lane.name == "b"


async def test_a_drain_over_two_replicas_keeps_prefixes_together(
    sqlite_url: str, tmp_path: Any
) -> None:
    """Six prefixes over two replicas, three owned by each: every request of a prefix runs on
    its owner, and nothing runs twice."""
    probe, _ = engines(2)
    route = probe.route(M)
    by_owner: dict[str, list[int]] = {"b[0]": [], "b[1]": []}
    i = 0
    while min(len(v) for v in by_owner.values()) < 3:
        name = route.owner(prefix_key(M, chat(prompt(i)))).lane.name
        if len(by_owner[name]) < 3:
            by_owner[name].append(i)
        i += 1
    prompts = sorted(by_owner["b[0]"] + by_owner["b[1]"])
    fakes = {"b[0]": FakeBackend("b[0]", delay=0.01), "b[1]": FakeBackend("b[1]", delay=0.01)}
    overrides = {
        "backends": [
            {
                "name": "b",
                "type": "openai",
                "base_urls": URLS[:2],
                "models": [M],
                "max_concurrency": 4,
            }
        ]
    }
    async with burst_services(sqlite_url, tmp_path / "files", fakes, **overrides) as s:
        assert s.worker is not None
        for k in range(10):  # interleaved: one request of each prefix per round
            for p in prompts:
                body = chat(prompt(p), f"question {k}")
                await s.store.generations.submit(
                    "default", NewGeneration(Kind.CHAT, M, body), expiry_seconds=3600
                )
        await s.worker.run(burst=True)
    seen: dict[str, Counter[str]] = {}
    for name, fake in fakes.items():
        for _, body in fake.calls:
            seen.setdefault(body["messages"][0]["content"], Counter())[name] += 1
    assert sum(sum(c.values()) for c in seen.values()) == 60
    placed = sum(c.most_common(1)[0][1] for c in seen.values())
    assert placed >= 54  # at least 90 % on one replica per prefix (spill only at the tail)
