"""The prefix key and the prefix-run claim order."""

from __future__ import annotations

from typing import Any

from backburner.core.prefix import PREFIX_CHARS, Candidate, prefix_key, prompt_head
from backburner.scheduler.prefix_runs import PrefixRuns

SYSTEM = "You are a careful annotator. " * 40  # ~1,100 characters


def chat(system: str | None, user: Any, **extra: Any) -> dict[str, Any]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    return {"messages": [*messages, {"role": "user", "content": user}], **extra}


def test_same_system_prompt_same_key_whatever_the_question() -> None:
    assert prefix_key("m", chat(SYSTEM, "a")) == prefix_key("m", chat(SYSTEM, "b" * 5000))


def test_another_system_prompt_or_model_or_tools_is_another_key() -> None:
    base = prefix_key("m", chat(SYSTEM, "a"))
    assert prefix_key("m", chat(SYSTEM.upper(), "a")) != base
    assert prefix_key("m2", chat(SYSTEM, "a")) != base
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert prefix_key("m", chat(SYSTEM, "a", tools=tools)) != base


def test_a_short_stable_part_keys_on_the_whole_beginning() -> None:
    """One message, or a one-line system prompt: the leading characters decide."""
    template = "Classify the sentiment of the review below. " * 30
    assert prefix_key("m", chat(None, template + "great")) == prefix_key(
        "m", chat(None, template + "awful")
    )
    assert prefix_key("m", chat("Be brief.", "what is 2+2?")) != prefix_key(
        "m", chat("Be brief.", "what is 3+3?")
    )


def test_completions_and_content_parts_are_keyed_too() -> None:
    assert prefix_key("m", {"prompt": SYSTEM + "x"}) == prefix_key("m", {"prompt": SYSTEM + "y"})
    parts = [{"type": "text", "text": SYSTEM}]
    assert prompt_head(chat(None, "")) == "<user>"
    assert prefix_key("m", chat(None, parts)) == prefix_key("m", chat(None, [*parts, {"x": 1}]))


def test_the_key_reads_a_bounded_part_of_any_request() -> None:
    huge = chat("s" * 10_000_000, "q", tools=[{"t": "x" * 1_000_000}])
    assert len(prompt_head(huge)) == PREFIX_CHARS
    assert len(prefix_key("m", huge)) == 24
    assert prompt_head({"messages": "not a list"}) == ""


def window(*prefixes: str | None, start: int = 0) -> list[Candidate]:
    return [Candidate(f"g{start + i}", p, start + i) for i, p in enumerate(prefixes)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_new_prefix_starts_alone_then_its_siblings_follow_as_a_run() -> None:
    clock = Clock()
    runs = PrefixRuns(clock=clock)
    w = window("a", "b", "a", "b", "a", "b")
    first = runs.choose(w, 6)
    assert [c.prefix_key for c in first] == ["a", "b"]  # one of each: the rest wait
    runs.finished("a")
    rest = [c for c in w if c not in first]
    assert [c.prefix_key for c in runs.choose(rest, 2)] == ["a", "a"]  # a's run
    runs.finished("b")
    assert [c.prefix_key for c in runs.choose([w[3], w[5]], 2)] == ["b", "b"]


def test_warming_ends_after_the_warmup_even_if_the_first_never_finishes() -> None:
    clock = Clock()
    runs = PrefixRuns(clock=clock, warmup_seconds=2.0)
    w = window("a", "a", "a")
    assert len(runs.choose(w, 3)) == 1
    assert runs.choose(w[1:], 3) == []
    clock.now = 2.5
    assert [c.id for c in runs.choose(w[1:], 3)] == ["g1", "g2"]


def test_the_fair_head_is_passed_over_at_most_fair_every_times() -> None:
    """Tenant B's lone request (prefix "b") at the head of the fair order, behind it tenant A's
    long run of prefix "a": B is taken within one round of ``fair_every`` picks."""
    runs = PrefixRuns(fair_every=4, clock=Clock())
    runs.choose(window("a"), 1)
    runs.finished("a")
    queue = window("b", *["a"] * 50, start=1)
    order: list[str | None] = []
    for _ in range(10):  # one slot at a time, as a busy lane frees them
        (c,) = runs.choose(queue, 1)
        queue.remove(c)
        order.append(c.prefix_key)
    assert order.index("b") <= 4


def test_runs_stay_within_the_fair_window_and_keep_the_fair_order_inside() -> None:
    runs = PrefixRuns(clock=Clock())
    w = window(None, "x", None)
    assert [c.id for c in runs.choose(w, 3)] == ["g0", "g1", "g2"]  # no prefix: fair order
    assert runs.choose([], 3) == []


def test_at_most_max_runs_run_once_warm() -> None:
    runs = PrefixRuns(max_runs=2, clock=Clock())
    runs.choose(window("a", "b", "c"), 3)
    for p in "abc":
        runs.finished(p)
    w = window("c", "b", "a", "a", start=10)
    runs.choose(w, 1)
    assert len(runs.runs) <= 3 and set(runs.runs) <= {"a", "b", "c"}
