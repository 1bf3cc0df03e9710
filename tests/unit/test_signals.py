"""Engine load signals: one scrape in, one EngineLoad out.

The fixtures under ``tests/fixtures/scrapes/`` are reconstructed, not captured from live servers:
each engine's own metric definitions replayed through the exposition code it uses, so names, types,
HELP strings, label sets, label order and number formatting are what the server prints.

* ``vllm_0_12.prom``: vLLM 0.12, V1 engine, ``--data-parallel-size 2`` (vllm/v1/metrics/loggers.py,
  prometheus_client default registry: python_gc/process families first, ``_created`` series).
* ``vllm_0_8.prom``: vLLM 0.8, V1 engine: the old names ``vllm:gpu_cache_usage_perc`` and
  ``vllm:gpu_prefix_cache_queries/hits``.
* ``vllm_0_6.prom``: vLLM 0.6, V0 engine (vllm/engine/metrics.py) behind the multiprocessing
  frontend (MultiProcessCollector); no prefix-cache counters exist in that version.
* ``sglang.prom``: SGLang 0.5 ``--enable-metrics`` (python/sglang/srt/metrics/collector.py, always a
  MultiProcessCollector registry).
* ``llamacpp.prom``: current llama-server ``--metrics`` (tools/server/server-context.cpp), without
  ``llamacpp:kv_cache_usage_ratio``; ``llamacpp_kv.prom``: a build before ggml-org/llama.cpp#13660,
  which still printed it.
* ``llamacpp_slots.json``: current ``GET /slots`` (``is_processing``; compact, sorted keys as
  nlohmann::json dumps them); ``llamacpp_slots_legacy.json``: the 2024 form with ``state``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backburner.backends.signals import (
    ENGINES,
    EngineLoad,
    parse_llamacpp_metrics,
    parse_llamacpp_slots,
    parse_sglang,
    parse_signals,
    parse_vllm,
)

SCRAPES = Path(__file__).resolve().parent.parent / "fixtures" / "scrapes"


def scrape(name: str) -> str:
    return (SCRAPES / name).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ EngineLoad


def test_engine_load_is_immutable_and_unknown_by_default() -> None:
    load = EngineLoad()
    assert all(getattr(load, f.name) is None for f in dataclasses.fields(EngineLoad))
    with pytest.raises(dataclasses.FrozenInstanceError):
        load.waiting = 1  # type: ignore[misc]
    assert not hasattr(load, "__dict__")  # slots
    assert EngineLoad(waiting=1, running=2) == EngineLoad(waiting=1, running=2)


# ------------------------------------------------------------------- what the parser gives


def test_prometheus_client_strips_total_from_counter_families_but_not_samples() -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape("vllm_0_12.prom"))}
    # the colon is legal in metric names; the counter family loses its _total ...
    assert "vllm:num_preemptions" in families
    assert "vllm:num_preemptions_total" not in families
    assert families["vllm:num_preemptions"].type == "counter"
    # ... while its samples keep it, and _created comes back as a gauge family of its own
    assert {s.name for s in families["vllm:num_preemptions"].samples} == {
        "vllm:num_preemptions_total"
    }
    assert families["vllm:num_preemptions_created"].type == "gauge"
    # a histogram named ..._total keeps its name
    assert families["vllm:iteration_tokens_total"].type == "histogram"
    # integral values come back as int, not float
    running = families["vllm:num_requests_running"].samples[0]
    assert running.labels == {"engine": "0", "model_name": "Qwen/Qwen3-8B"}
    assert running.value == 7


# ------------------------------------------------------------------------------------- vLLM


def test_vllm_0_12() -> None:
    # engine 0: 7 running, 3 waiting, kv 0.4183; engine 1: 5 running, 0 waiting, kv 0.2961
    assert parse_vllm(scrape("vllm_0_12.prom")) == EngineLoad(
        waiting=3,
        running=12,
        kv_usage=0.4183,
        preemptions=3.0,
        prefix_cache_queries=918234.0 + 877410.0,
        prefix_cache_hits=402112.0 + 390880.0,
    )


def test_vllm_0_8_old_names() -> None:
    assert parse_vllm(scrape("vllm_0_8.prom")) == EngineLoad(
        waiting=6,
        running=14,
        kv_usage=0.9217,
        preemptions=11.0,
        prefix_cache_queries=52817.0,
        prefix_cache_hits=20113.0,
    )


def test_vllm_0_6_v0_engine() -> None:
    assert parse_vllm(scrape("vllm_0_6.prom")) == EngineLoad(
        waiting=2, running=9, kv_usage=0.6732, preemptions=4.0
    )


@pytest.mark.parametrize("fixture", ["vllm_0_6.prom", "vllm_0_8.prom", "vllm_0_12.prom"])
def test_vllm_versions_give_the_same_shape(fixture: str) -> None:
    load = parse_vllm(scrape(fixture))
    assert type(load.waiting) is int
    assert type(load.running) is int
    assert type(load.kv_usage) is float
    assert load.kv_usage is not None and 0.0 <= load.kv_usage <= 1.0
    assert type(load.preemptions) is float
    assert load.idle_slots is None
    if fixture != "vllm_0_6.prom":  # 0.6 has only a hit-rate gauge, no counters
        assert type(load.prefix_cache_queries) is float
        assert type(load.prefix_cache_hits) is float


def test_vllm_0_8_and_0_12_fill_the_same_fields() -> None:
    def filled(load: EngineLoad) -> set[str]:
        return {f.name for f in dataclasses.fields(load) if getattr(load, f.name) is not None}

    old, new = parse_vllm(scrape("vllm_0_8.prom")), parse_vllm(scrape("vllm_0_12.prom"))
    assert (
        filled(old)
        == filled(new)
        == {
            "waiting",
            "running",
            "kv_usage",
            "preemptions",
            "prefix_cache_queries",
            "prefix_cache_hits",
        }
    )


MULTI = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="a"} 4.0
vllm:num_requests_waiting{engine="1",model_name="a"} 1.0
vllm:num_requests_waiting{engine="0",model_name="b"} 2.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a"} 8.0
vllm:num_requests_running{engine="1",model_name="a"} 6.0
vllm:num_requests_running{engine="0",model_name="b"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="a"} 0.75
vllm:kv_cache_usage_perc{engine="0",model_name="b"} 0.5
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="a"} 10.0
vllm:num_preemptions_total{engine="1",model_name="a"} 5.0
vllm:num_preemptions_total{engine="0",model_name="b"} 1.0
# HELP vllm:num_preemptions_created Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_created gauge
vllm:num_preemptions_created{engine="0",model_name="a"} 1.7651912138e+09
vllm:num_preemptions_created{engine="1",model_name="a"} 1.7651912138e+09
vllm:num_preemptions_created{engine="0",model_name="b"} 1.7651912139e+09
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="a"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="a"} 500.0
vllm:prefix_cache_queries_total{engine="0",model_name="b"} 20.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="a"} 300.0
vllm:prefix_cache_hits_total{engine="1",model_name="a"} 200.0
vllm:prefix_cache_hits_total{engine="0",model_name="b"} 7.0
"""


def test_vllm_sums_over_models_and_engines_and_takes_the_largest_kv() -> None:
    assert parse_vllm(MULTI) == EngineLoad(
        waiting=7,
        running=15,
        kv_usage=0.75,
        preemptions=16.0,  # the _created timestamps are not preemptions
        prefix_cache_queries=1520.0,
        prefix_cache_hits=507.0,
    )


def test_vllm_without_help_and_type_lines() -> None:
    bare = "\n".join(line for line in MULTI.splitlines() if not line.startswith("#"))
    assert parse_vllm(bare) == parse_vllm(MULTI)


def test_vllm_prefers_the_new_names_when_both_are_printed() -> None:
    # vLLM 0.9/0.10 print the deprecated names beside the new ones; they must not add up
    text = """\
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.4
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 999.0
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 99.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 10.0
"""
    load = parse_vllm(text)
    assert (load.kv_usage, load.prefix_cache_queries, load.prefix_cache_hits) == (0.4, 100.0, 10.0)


def test_vllm_absent_metrics_are_none_not_zero() -> None:
    load = parse_vllm('vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n')
    assert load == EngineLoad(waiting=0)
    assert load.running is None
    assert load.kv_usage is None
    assert load.preemptions is None
    assert load.prefix_cache_queries is None


def test_vllm_nan_is_treated_as_absent() -> None:
    text = """\
vllm:num_requests_waiting{engine="0",model_name="m"} NaN
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
vllm:num_requests_running{engine="0",model_name="m"} NaN
vllm:kv_cache_usage_perc{engine="0",model_name="m"} NaN
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.3
vllm:num_preemptions_total{engine="0",model_name="m"} +Inf
"""
    assert parse_vllm(text) == EngineLoad(waiting=2, running=None, kv_usage=0.3, preemptions=None)


def test_vllm_scrape_with_only_nan_values_is_still_a_vllm_scrape() -> None:
    assert parse_vllm('vllm:kv_cache_usage_perc{engine="0",model_name="m"} NaN\n') == EngineLoad()


def test_vllm_kv_falls_back_to_the_old_name_when_the_new_one_is_nan() -> None:
    text = 'vllm:kv_cache_usage_perc{engine="0"} NaN\nvllm:gpu_cache_usage_perc{engine="0"} 0.2\n'
    assert parse_vllm(text).kv_usage == 0.2


# ----------------------------------------------------------------------------------- SGLang


def test_sglang() -> None:
    # sglang:num_retracted_reqs (a per-step gauge, 1 in the fixture) is not the preemption count;
    # the counter sglang:num_retracted_requests_total (57) is
    assert parse_sglang(scrape("sglang.prom")) == EngineLoad(
        waiting=9, running=24, kv_usage=0.8712997436523438, preemptions=57.0
    )


def test_sglang_older_servers_count_preemptions_in_total_retracted_reqs() -> None:
    text = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="m",pid="82",pp_rank="0",tp_rank="0"} 2.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="m",pid="82",pp_rank="0",tp_rank="0"} 1.0
# HELP sglang:total_retracted_reqs The total number of retracted requests due to kvcache full.
# TYPE sglang:total_retracted_reqs gauge
sglang:total_retracted_reqs{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 12.0
# HELP sglang:num_retracted_reqs The number of retracted requests.
# TYPE sglang:num_retracted_reqs gauge
sglang:num_retracted_reqs{engine_type="unified",model_name="m",pid="82",pp_rank="0",tp_rank="0"} 3.0
"""
    assert parse_sglang(text) == EngineLoad(waiting=1, running=2, preemptions=12.0)


def test_sglang_without_any_retraction_metric_leaves_preemptions_unknown() -> None:
    text = 'sglang:num_retracted_reqs{model_name="m",pid="9",tp_rank="0"} 4.0\n'
    with pytest.raises(ValueError, match="no SGLang metrics in scrape"):
        parse_sglang(text)
    load = parse_sglang(text + 'sglang:num_queue_reqs{model_name="m",tp_rank="0"} 0.0\n')
    assert load == EngineLoad(waiting=0)


def test_sglang_counts_each_replica_once_and_sums_replicas() -> None:
    # --enable-metrics-for-all-schedulers: every TP rank of a replica reports the same queue;
    # data-parallel replicas (dp_rank) have queues of their own
    replicas = {"0": (3, 10, 0.5, 4), "1": (1, 7, 0.8, 2)}
    text = ""
    for dp, (queue, running, usage, retracted) in replicas.items():
        for tp in ("0", "1"):
            labels = f'dp_rank="{dp}",engine_type="unified",model_name="m",tp_rank="{tp}"'
            text += f"sglang:num_queue_reqs{{{labels}}} {queue}.0\n"
            text += f"sglang:num_running_reqs{{{labels}}} {running}.0\n"
            text += f"sglang:token_usage{{{labels}}} {usage}\n"
            text += f"sglang:num_retracted_requests_total{{{labels}}} {retracted}.0\n"
    assert parse_sglang(text) == EngineLoad(waiting=4, running=17, kv_usage=0.8, preemptions=6.0)


# -------------------------------------------------------------------------------- llama.cpp


def test_llamacpp_metrics_current_build_has_no_kv_usage() -> None:
    assert parse_llamacpp_metrics(scrape("llamacpp.prom")) == EngineLoad(waiting=1, running=2)


def test_llamacpp_metrics_older_build_with_kv_usage() -> None:
    assert parse_llamacpp_metrics(scrape("llamacpp_kv.prom")) == EngineLoad(
        waiting=0, running=1, kv_usage=0.602661
    )


def test_llamacpp_slots_is_processing() -> None:
    data = json.loads(scrape("llamacpp_slots.json"))
    assert [slot["is_processing"] for slot in data] == [True, False, True, False]
    assert parse_llamacpp_slots(data) == EngineLoad(waiting=None, running=2, idle_slots=2)


def test_llamacpp_slots_legacy_state() -> None:
    data = json.loads(scrape("llamacpp_slots_legacy.json"))
    assert [slot["state"] for slot in data] == [1, 0]
    assert parse_llamacpp_slots(data) == EngineLoad(running=1, idle_slots=1)


@pytest.mark.parametrize(
    ("slots", "running", "idle"),
    [
        ([{"id": 0, "is_processing": False}], 0, 1),
        ([{"id": 0, "is_processing": True}, {"id": 1, "is_processing": True}], 2, 0),
        ([{"id": 0, "state": 0}, {"id": 1, "state": 1}, {"id": 2, "state": 2}], 2, 1),
        ([{"id": 0, "state": "IDLE"}, {"id": 1, "state": "GENERATING"}], 1, 1),
        # is_processing wins over a stale state field
        ([{"id": 0, "is_processing": False, "state": 1}], 0, 1),
    ],
)
def test_llamacpp_slots_counting(slots: list[dict[str, object]], running: int, idle: int) -> None:
    assert parse_llamacpp_slots(slots) == EngineLoad(running=running, idle_slots=idle)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "no slots"),
        ({"slots": []}, "not a list"),
        (
            {
                "error": {
                    "code": 501,
                    "message": "This server does not support slots endpoint.",
                    "type": "not_supported_error",
                }
            },
            "does not support slots endpoint",
        ),
        ("[]", "not a list"),
        (None, "not a list"),
        ([1, 2], "not an object"),
        ([{"id": 0, "n_ctx": 4096}], "neither is_processing nor state"),
        ([{"id": 0, "is_processing": "yes"}], "not a boolean"),
        ([{"id": 0, "state": None}], "state"),
    ],
)
def test_llamacpp_slots_rejects_what_is_not_a_slot_list(data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_llamacpp_slots(data)


# --------------------------------------------------------------------------------- dispatch


def test_parse_signals_dispatches_by_engine() -> None:
    assert parse_signals("vllm", scrape("vllm_0_12.prom")) == parse_vllm(scrape("vllm_0_12.prom"))
    assert parse_signals("sglang", scrape("sglang.prom")) == parse_sglang(scrape("sglang.prom"))
    assert parse_signals("llamacpp", scrape("llamacpp.prom")) == EngineLoad(waiting=1, running=2)
    assert parse_signals("llamacpp", scrape("llamacpp_slots.json")) == EngineLoad(
        running=2, idle_slots=2
    )
    assert parse_signals("llamacpp", "\n  " + scrape("llamacpp_slots_legacy.json")) == EngineLoad(
        running=1, idle_slots=1
    )
    assert set(ENGINES) == {"vllm", "sglang", "llamacpp"}


def test_parse_signals_llamacpp_json_errors() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_signals("llamacpp", '[{"id": 0, ')
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_signals("llamacpp", "[" * 100_000)
    with pytest.raises(ValueError, match="does not support slots"):
        parse_signals(
            "llamacpp",
            '{"error":{"code":501,"message":"This server does not support slots endpoint. '
            'Start it with `--slots`","type":"not_supported_error"}}',
        )


@pytest.mark.parametrize("engine", ["generic", "VLLM", "llama.cpp", ""])
def test_parse_signals_unknown_engine(engine: str) -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        parse_signals(engine, scrape("vllm_0_12.prom"))


# ------------------------------------------------------------------ wrong server, bad text

PROM_PARSERS = {
    "vllm": (parse_vllm, "vLLM"),
    "sglang": (parse_sglang, "SGLang"),
    "llamacpp": (parse_llamacpp_metrics, "llama.cpp"),
}
FIXTURE_OF = {
    "vllm": "vllm_0_12.prom",
    "sglang": "sglang.prom",
    "llamacpp": "llamacpp.prom",
}


@pytest.mark.parametrize(
    ("parser", "server"),
    [(p, s) for p in PROM_PARSERS for s in FIXTURE_OF if p != s],
)
def test_a_scrape_from_another_engine_is_an_error(parser: str, server: str) -> None:
    parse, label = PROM_PARSERS[parser]
    with pytest.raises(ValueError, match=f"no {label} metrics in scrape") as err:
        parse(scrape(FIXTURE_OF[server]))
    assert PROM_PARSERS[server][1] in str(err.value)  # names the engine it looks like


def test_a_plain_python_app_is_not_an_engine() -> None:
    # a prometheus_client app that is not an engine: only the python_gc/process families
    head = scrape("vllm_0_12.prom").split("# HELP vllm:", 1)[0]
    assert "python_gc_objects_collected_total" in head
    for parse, label in PROM_PARSERS.values():
        with pytest.raises(ValueError, match=f"no {label} metrics in scrape"):
            parse(head)


GARBAGE = [
    "",
    "\n\n",
    "hello world",
    "<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>",
    '{"detail":"Not Found"}',
    "vllm:num_requests_waiting{engine=0} 1",
    "vllm:num_requests_waiting seven",
    "\x00\x01\x02",
    "# TYPE",
]


@pytest.mark.parametrize("text", GARBAGE)
@pytest.mark.parametrize("engine", sorted(PROM_PARSERS))
def test_garbage_is_an_error(engine: str, text: str) -> None:
    parse, _ = PROM_PARSERS[engine]
    with pytest.raises(ValueError):
        parse(text)
    with pytest.raises(ValueError):
        parse_signals(engine, text)


@pytest.mark.parametrize(
    "name",
    [
        "vllm_0_6.prom",
        "vllm_0_8.prom",
        "vllm_0_12.prom",
        "sglang.prom",
        "llamacpp.prom",
        "llamacpp_kv.prom",
    ],
)
def test_fixture_provenance_comments_are_ignored_by_the_parser(name: str) -> None:
    text = scrape(name)
    assert text.startswith("# Fixture")
    body = "\n".join(
        line
        for line in text.splitlines()
        if not line.startswith("#") or line.startswith(("# HELP ", "# TYPE "))
    )
    assert body != text

    def families(t: str) -> list[tuple[str, str, list[object]]]:
        return [(f.name, f.type, list(f.samples)) for f in text_string_to_metric_families(t)]

    assert families(text) == families(body)


def test_llamacpp_counters_as_the_parser_sees_them() -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape("llamacpp.prom"))}
    # C++ stream formatting: six significant digits, exponent for large counts
    assert families["llamacpp:prompt_tokens"].samples[0].value == 3.84121e06
    # a counter declared without _total gets it appended to its samples by the parser
    busy = families["llamacpp:n_busy_slots_per_decode"].samples[0]
    assert (busy.name, busy.value) == ("llamacpp:n_busy_slots_per_decode_total", 1.73843)
