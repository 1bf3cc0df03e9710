"""Contract tests (issue #13): schemathesis drives every operation of the OpenAPI document.

The app runs in-process on SQLite with the fake engine serving the README's model, so the
examples the document shows in /docs (the README's tour) are sent as they are and must be
accepted. Schemathesis's engine runs its examples, coverage and fuzzing phases per group of
tags, and its stateful phase (ids from one answer fed to the next call) over the whole API. The
bar: no generated case gets a 5xx, and every answer conforms to the status, content type and
schema that its operation declares. Generation is derandomized and seeded, and small enough that
each test stays well within the suite's timeout.

The engine is used rather than ``schemathesis.pytest.from_fixture`` because the latter reads a
private attribute that pytest 9.2 no longer has. No background worker runs (``run_worker``
off): nothing is sent to an engine or to a webhook URL, and what is accepted stays queued.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis import engine
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Ok
from schemathesis.engine import events
from schemathesis.python import asgi
from schemathesis.schemas import BaseSchema

from backburner.api.app import create_app
from backburner.config import BackendSettings
from backburner.schemas.openai import TOUR_MODEL
from tests.conftest import make_settings
from tests.support.fake_backend import FakeBackend

CHECKS = (
    "not_a_server_error",
    "response_schema_conformance",
    "status_code_conformance",
    "content_type_conformance",
    "negative_data_rejection",
)
"""The acceptance bar is the first two; the others hold today and keep the document honest."""

PHASES = ("examples", "coverage", "fuzzing", "stateful")

TAG_GROUPS = {
    "slow": ("slow", "generations"),
    "groups": ("groups",),
    "realtime": ("realtime", "operations"),
    "batches": ("files", "batches"),
    "webhooks": ("webhooks",),
    "tenants": ("tenants", "usage"),
}
"""Each test runs the operations of these tags (every operation has one tag)."""

EXAMPLES_ACCEPTED = {
    f"POST {path}"
    for path in (
        "/v1/slow/chat/completions",
        "/v1/slow/completions",
        "/v1/slow/embeddings",
        "/v1/async/chat/completions",
        "/v1/async/completions",
        "/v1/async/embeddings",
        "/v1/slow/group/chat/completions",
        "/v1/slow/group/completions",
        "/v1/async/group/chat/completions",
        "/v1/async/group/completions",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/webhooks",
    )
}
"""Operations whose documented example stands alone (POST /v1/batches needs a file of yours)."""


def config(*phases: str) -> dict[str, Any]:
    return {
        "seed": 13,
        "generation": {"max-examples": 8, "deterministic": True, "database": "none"},
        "phases": {name: {"enabled": name in phases} for name in PHASES},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    }


@pytest.fixture(scope="module")
def app(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One app for the module; schemathesis starts its lifespan on first use."""
    tmp = tmp_path_factory.mktemp("contract")
    shutil.copyfile(sqlite_template, tmp / "bb.db")
    settings = make_settings(
        f"sqlite:///{tmp / 'bb.db'}",
        files_dir=str(tmp / "files"),
        run_worker=False,
        backends=[
            BackendSettings(
                name="fake",
                type="openai",
                base_url="http://fake.invalid/v1",
                models=[TOUR_MODEL],
                max_concurrency=4,
            )
        ],
    )
    yield create_app(settings, backends={"fake": FakeBackend("fake")}, migrate=False)
    asgi.shutdown_lifespans()


def load(app: Any, *phases: str) -> BaseSchema:
    return schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=SchemathesisConfig.from_dict(config(*phases))
    )


@dataclass
class Outcome:
    problems: list[str] = field(default_factory=list)
    answered: dict[str, set[tuple[str, int]]] = field(default_factory=lambda: defaultdict(set))
    """Operation label -> (phase, status) of every answer."""


def operations(schema: BaseSchema) -> list[Any]:
    """Every operation of ``schema``; one the document gets wrong fails the test."""
    found = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        found.append(result.ok())
    return found


def run(schema: BaseSchema) -> Outcome:
    """Run the engine; every failed check and every error, each with a curl to reproduce it."""
    out = Outcome()
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for case_id, interaction in recorder.interactions.items():
                if interaction.response is not None:
                    label = recorder.cases[case_id].value.operation.label
                    out.answered[label].add((event.phase.value, interaction.response.status_code))
            for nodes in recorder.checks.values():
                for node in nodes:
                    if node.failure_info is not None:
                        failure = node.failure_info.failure
                        out.problems.append(
                            f"{event.phase.value} {recorder.label} [{node.name}] {failure.title}:"
                            f" {failure.message}\n    {node.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            out.problems.append(f"error in {event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            out.problems.append(f"fatal: {event.exception!r}")
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("group", sorted(TAG_GROUPS))
def test_operations_keep_their_contract(app: Any, group: str) -> None:
    schema = load(app, "examples", "coverage", "fuzzing").include(tag=list(TAG_GROUPS[group]))
    labels = {op.label for op in operations(schema)}
    assert labels, group
    outcome = run(schema)
    assert not outcome.problems, "\n".join(outcome.problems)
    assert set(outcome.answered) == labels  # every operation was called
    unaccepted = {
        label
        for label in EXAMPLES_ACCEPTED & labels
        if not any(ph == "examples" and 200 <= st < 300 for ph, st in outcome.answered[label])
    }
    assert unaccepted == set(), "the documented example was refused"


def test_tag_groups_cover_every_operation(app: Any) -> None:
    schema = load(app)
    tagged = {tag for group in TAG_GROUPS.values() for tag in group}
    for operation in operations(schema):
        assert set(operation.tags or ()) & tagged, operation.label


@pytest.mark.timeout(60)
def test_stateful_sequences_keep_the_contract(app: Any) -> None:
    outcome = run(load(app, "stateful"))
    assert not outcome.problems, "\n".join(outcome.problems)
    assert any(ph == "stateful" for seen in outcome.answered.values() for ph, _ in seen)
