"""An S3-compatible server on loopback for tests and benchmarks: moto's ``moto_server`` as a
subprocess (moto[server] from PyPI), with buckets created over its REST API."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support import procs

# moto accepts any credentials; these are what the processes under test sign with
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    proc: procs.Proc
    endpoint_url: str

    def create_bucket(self, name: str) -> str:
        r = httpx.put(f"{self.endpoint_url}/{name}", timeout=10)
        assert r.status_code in (200, 409), r.text
        return name

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys in the bucket (ListObjectsV2, first 1,000)."""
        r = httpx.get(
            f"{self.endpoint_url}/{bucket}",
            params={"list-type": "2", "prefix": prefix},
            timeout=10,
        )
        r.raise_for_status()
        text = r.text
        keys = []
        for part in text.split("<Key>")[1:]:
            keys.append(part.split("</Key>", 1)[0])
        return keys


def moto_argv(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    return [str(script), "-H", procs.LOOPBACK, "-p", str(port)]


@contextmanager
def running_s3(log_dir: Path, timeout: float = 30.0) -> Iterator[S3Server]:
    """``moto_server`` on a free loopback port, killed on the way out."""
    port = procs.free_port()
    log = Path(log_dir) / f"moto-{port}.log"
    proc = procs.Proc(
        procs._spawn(moto_argv(port), log, None), f"http://{procs.LOOPBACK}:{port}", log
    )
    try:
        procs.wait_http(proc, "/moto-api/", timeout)
        yield S3Server(proc, proc.base_url)
    finally:
        procs.kill(proc)
