"""Probe URLs and the HTTP probe against a mock transport."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from backburner.backends.probe import HttpProbe, default_metrics_url

SCRAPES = Path(__file__).resolve().parent.parent / "fixtures" / "scrapes"


@pytest.mark.parametrize(
    ("engine", "base", "url"),
    [
        ("vllm", "http://10.0.0.5:8000/v1", "http://10.0.0.5:8000/metrics"),
        ("vllm", "http://10.0.0.5:8000/v1/", "http://10.0.0.5:8000/metrics"),
        ("sglang", "http://gpu:30000", "http://gpu:30000/metrics"),
        ("llamacpp", "http://gpu:8080/v1", "http://gpu:8080/slots"),
    ],
)
def test_default_metrics_url(engine: str, base: str, url: str) -> None:
    assert default_metrics_url(engine, base) == url


async def test_http_probe_reads_and_parses() -> None:
    text = (SCRAPES / "vllm_0_12.prom").read_text()
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text=text)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        probe = HttpProbe("vllm", "http://gpu:8000/metrics", client)
        load = await probe.read()
    assert seen == ["http://gpu:8000/metrics"]
    assert load.waiting is not None and load.running is not None and load.kv_usage is not None


async def test_http_probe_fails_on_error_status_and_foreign_text() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/down":
            return httpx.Response(503, text="busy")
        return httpx.Response(200, text="# nothing here\nfoo 1\n")

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(ValueError, match="503"):
            await HttpProbe("vllm", "http://gpu/down", client).read()
        with pytest.raises(ValueError):
            await HttpProbe("vllm", "http://gpu/metrics", client).read()


def test_no_http_probe_for_generic() -> None:
    with pytest.raises(ValueError):
        HttpProbe("generic", "http://x/metrics", httpx.AsyncClient())
