"""Valid request bodies of every route the fuzz tests drive (``tests/integration/test_fuzz.py``):
hypothesis strategies of bodies that must be accepted, and one full body per route (every field
backburner reads) for the sweeps. Ids come from the :class:`~tests.support.fuzz_world.World`."""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from backburner.schemas.tenants import LIMIT_NAMES, MAX_WEIGHT, MIN_WEIGHT
from backburner.schemas.webhook import ALL_EVENTS
from tests.conftest import FAKE_MODEL
from tests.support.fuzz import json_values
from tests.support.fuzz_world import HOOK_URL, World

# ---------------------------------------------------------------------------- strategies

TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
LABELS = st.text(string.ascii_letters + string.digits + "-_ .", min_size=1, max_size=20)


def request_metadata(world: World) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "custom_id": LABELS,
            "webhook_id": st.just(world.ids["hook"]),
            "tags": json_values(4),
        },
    )


def common(world: World, *, realtime: bool) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "metadata": request_metadata(world),
        "user": TEXT,
        "stream": st.booleans() if realtime else st.just(False),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "extra_field": json_values(4),  # unknown fields pass through to the engine
    }


def chat(world: World, *, realtime: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}
    )
    return st.fixed_dictionaries(
        {"model": st.just(FAKE_MODEL), "messages": st.lists(message, min_size=1, max_size=3)},
        optional={
            **common(world, realtime=realtime),
            "max_tokens": st.integers(1, 4096),
            "temperature": st.floats(0, 2),
            "stop": st.lists(TEXT, max_size=4),
        },
    )


def completion(world: World, *, realtime: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "model": st.just(FAKE_MODEL),
            "prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3)),
        },
        optional={**common(world, realtime=realtime), "n": st.integers(1, 128)},
    )


def embedding(world: World, *, realtime: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    extra = common(world, realtime=False)
    if not realtime:
        extra.pop("stream")
    return st.fixed_dictionaries(
        {
            "model": st.just(FAKE_MODEL),
            "input": st.one_of(
                TEXT.filter(bool), st.lists(TEXT, min_size=1, max_size=3), st.just([1, 2, 3])
            ),
        },
        optional={**extra, "encoding_format": st.sampled_from(["float", "base64"])},
    )


def group(
    request: Callable[[World], st.SearchStrategy[dict[str, Any]]],
) -> Callable[[World], st.SearchStrategy[dict[str, Any]]]:
    def bodies_of(world: World) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {"requests": st.lists(request(world), min_size=1, max_size=3)},
            optional={
                "webhook_id": st.just(world.ids["hook"]),
                "metadata": st.dictionaries(TEXT, json_values(4), max_size=4),
            },
        )

    return bodies_of


WEBHOOK_FIELDS = {
    "events": st.lists(st.sampled_from(ALL_EVENTS), unique=True),
    "enabled": st.booleans(),
}


def webhook_create(world: World) -> st.SearchStrategy[dict[str, Any]]:
    urls = st.sampled_from([HOOK_URL, "https://127.0.0.1:8443/in?x=1", "http://[::1]:9/h"])
    return st.fixed_dictionaries({"url": urls, "name": TEXT}, optional=WEBHOOK_FIELDS)


def webhook_update(world: World) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"name": st.one_of(st.none(), TEXT)},
        optional={"url": st.just(HOOK_URL + "/2"), **WEBHOOK_FIELDS},
    )


LIMITS = st.dictionaries(
    st.sampled_from(LIMIT_NAMES), st.one_of(st.none(), st.integers(0, 10**9)), max_size=5
)
WEIGHTS = st.floats(MIN_WEIGHT, MAX_WEIGHT, allow_nan=False)
TENANT_IDS = st.from_regex(r"\A[a-z][a-z0-9._-]{0,30}\Z")


def tenant_create(world: World) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"id": TENANT_IDS},
        optional={"weight": WEIGHTS, "limits": LIMITS, "disabled": st.booleans()},
    )


def tenant_update(world: World) -> st.SearchStrategy[dict[str, Any]]:
    own = st.one_of(st.none(), st.integers(0, 10**9), st.just("default"))
    return st.fixed_dictionaries(
        {},
        optional={
            "weight": st.one_of(st.none(), WEIGHTS),
            "limits": st.dictionaries(st.sampled_from(LIMIT_NAMES), own, max_size=5),
            "disabled": st.one_of(st.none(), st.booleans()),
        },
    )


def full_tenant(world: World) -> dict[str, Any]:
    return {
        "id": "full-tenant",
        "weight": 2.5,
        "limits": {"max_queued_generations": 10, "tokens_per_day": None},
        "disabled": False,
    }


def full_tenant_update(world: World) -> dict[str, Any]:
    return {"weight": 0.5, "limits": {"requests_per_minute": 5}, "disabled": False}


def batch_create(world: World) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "input_file_id": st.just(world.ids["file"]),
            "endpoint": st.just("/v1/chat/completions"),
            "completion_window": st.just("24h"),
        },
        optional={
            "metadata": st.dictionaries(LABELS, TEXT, max_size=16),
            "webhook_url": st.just("http://127.0.0.1:9/batch"),
        },
    )


def full(kind: str) -> Callable[[World], dict[str, Any]]:
    """A valid request with every field backburner reads, and more."""

    def body(world: World) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": FAKE_MODEL,
            "metadata": {"custom_id": "c-1", "webhook_id": world.ids["hook"], "tag": "t"},
            "user": "u",
            "seed": 7,
            "extra_field": {"k": "v"},
        }
        if kind == "chat":
            out.update(messages=[{"role": "user", "content": "hi"}], max_tokens=5, stop=["x"])
        elif kind == "completion":
            out.update(prompt="hi", temperature=0.5, n=1)
        else:
            out.update(input=["a", "b"], encoding_format="float")
        return out

    return body


def full_group(world: World) -> dict[str, Any]:
    """A valid group: the fields of its own, and a request with those it reads (the request's
    other fields are the single route's, swept there)."""
    request = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": {"custom_id": "c-1", "webhook_id": world.ids["hook"]},
    }
    return {"requests": [request], "webhook_id": world.ids["hook"], "metadata": {"k": "v"}}


def full_webhook(world: World) -> dict[str, Any]:
    return {"url": HOOK_URL, "name": "n", "events": ["generation.completed"], "enabled": True}


def full_batch(world: World) -> dict[str, Any]:
    return {
        "input_file_id": world.ids["file"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"k": "v"},
        "webhook_url": "http://127.0.0.1:9/batch",
    }
