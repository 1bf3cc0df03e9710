"""config: defaults, the TOML file, environment overrides and what is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from backburner.config import DEFAULT_LOCAL_MODEL, BackendSettings, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BACKBURNER_* variable from the outer environment leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("BACKBURNER_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "backburner.toml"
    path.write_text(text, encoding="utf-8")
    return path


TWO_BACKENDS = """
database_url = "postgresql://bb@db.internal/backburner"
port = 8081

[[backends]]
name = "gpu-pool"
type = "openai"
base_url = "http://10.0.0.5:8000/v1"
api_key = "sk-upstream"
models = ["meta-llama/llama-3.1-8b-instruct"]
max_concurrency = 64

[[backends]]
name = "local"
type = "llamacpp"
models = ["smollm2-135m-instruct"]
"""


def test_defaults() -> None:
    s = Settings()
    assert s.database_url == "sqlite:///./backburner.db"
    assert s.host == "127.0.0.1"
    assert s.port == 8000
    assert s.loopback_only
    assert len(s.backends) == 1
    (b,) = s.backends
    assert b.name == "local"
    assert b.type == "llamacpp"
    assert b.models == [DEFAULT_LOCAL_MODEL] == ["smollm2-135m-instruct"]
    assert b.model_map() == {"smollm2-135m-instruct": "smollm2-135m-instruct"}
    assert s.max_attempts == 3
    assert s.expiry_seconds == 72 * 3600
    assert s.idempotency_ttl_seconds == 24 * 3600


def test_load_settings_without_a_file_gives_defaults() -> None:
    assert load_settings() == Settings()


def test_toml_file_with_two_backends(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, TWO_BACKENDS))
    assert s.database_url == "postgresql://bb@db.internal/backburner"
    assert s.port == 8081
    assert [b.name for b in s.backends] == ["gpu-pool", "local"]
    gpu, local = s.backends
    assert gpu.type == "openai"
    assert gpu.base_url == "http://10.0.0.5:8000/v1"
    assert gpu.api_key is not None
    assert gpu.api_key.get_secret_value() == "sk-upstream"
    assert "sk-upstream" not in repr(gpu)  # a secret, never printed
    assert gpu.max_concurrency == 64
    assert gpu.model_map() == {
        "meta-llama/llama-3.1-8b-instruct": "meta-llama/llama-3.1-8b-instruct"
    }
    assert local.type == "llamacpp"
    assert local.model_map() == {"smollm2-135m-instruct": "smollm2-135m-instruct"}
    # load_settings does not leave its path behind in the environment
    assert "BACKBURNER_CONFIG" not in os.environ


def test_models_as_alias_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[backends]]
name = "up"
type = "openai"
base_url = "http://x/v1"
models = { "llama-8b" = "meta-llama/Llama-3.1-8B-Instruct", "qwen" = "Qwen/Qwen2.5-7B" }
""",
    )
    (b,) = load_settings(path).backends
    assert b.model_map() == {
        "llama-8b": "meta-llama/Llama-3.1-8B-Instruct",
        "qwen": "Qwen/Qwen2.5-7B",
    }


def test_models_as_mixed_list(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[backends]]
name = "up"
type = "openai"
models = ["plain", { "public" = "engine-name" }]
""",
    )
    (b,) = load_settings(path).backends
    assert b.model_map() == {"plain": "plain", "public": "engine-name"}


def test_models_mixed_list_refuses_other_entries() -> None:
    with pytest.raises(ValidationError, match="models entries"):
        BackendSettings(name="x", type="openai", models=["a", {"b": "c"}, 3])  # type: ignore[list-item]


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKBURNER_PORT", "9001")
    monkeypatch.setenv("BACKBURNER_DATABASE_URL", "sqlite:///./from-env.db")
    monkeypatch.setenv("BACKBURNER_MAX_ATTEMPTS", "5")
    s = load_settings(write(tmp_path, TWO_BACKENDS))
    assert s.port == 9001
    assert s.database_url == "sqlite:///./from-env.db"
    assert s.max_attempts == 5
    assert [b.name for b in s.backends] == ["gpu-pool", "local"]  # still from the file


def test_environment_backends_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "BACKBURNER_BACKENDS",
        '[{"name": "e", "type": "openai", "base_url": "http://e/v1", "models": ["m"]}]',
    )
    (b,) = Settings().backends
    assert (b.name, b.type, b.model_map()) == ("e", "openai", {"m": "m"})


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKBURNER_CONFIG", str(write(tmp_path, TWO_BACKENDS)))
    assert load_settings().port == 8081


def test_overrides_win_over_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKBURNER_PORT", "9001")
    assert load_settings(write(tmp_path, TWO_BACKENDS), port=7000).port == 7000


def test_duplicate_backend_names_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[backends]]
name = "same"
type = "openai"

[[backends]]
name = "same"
type = "llamacpp"
""",
    )
    with pytest.raises(ValidationError, match="unique; repeated: same"):
        load_settings(path)


def test_unknown_top_level_key_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="databse_url"):
        load_settings(write(tmp_path, 'databse_url = "sqlite:///x.db"\n'))


def test_unknown_backend_key_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[backends]]
name = "up"
type = "openai"
base_ulr = "http://x/v1"
""",
    )
    with pytest.raises(ValidationError, match="base_ulr"):
        load_settings(path)


@pytest.mark.parametrize(
    "text",
    [
        "port = 70000\n",
        "max_attempts = 0\n",
        'auth = "sometimes"\n',
        '[[backends]]\nname = "x"\ntype = "openai"\nmax_concurrency = 0\n',
        '[[backends]]\nname = ""\ntype = "openai"\n',
    ],
)
def test_out_of_range_values_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValidationError):
        load_settings(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        load_settings(tmp_path / "nope.toml")
    assert "BACKBURNER_CONFIG" not in os.environ


def test_loopback_only() -> None:
    assert Settings(host="127.0.0.2").loopback_only
    assert Settings(host="localhost").loopback_only
    assert not Settings(host="0.0.0.0").loopback_only


def test_missing_file_named_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKBURNER_CONFIG", str(tmp_path / "typo.toml"))
    with pytest.raises(FileNotFoundError, match=r"typo\.toml"):
        load_settings()


ENGINE_BACKEND = """
[[backends]]
name = "gpu-pool"
type = "openai"
base_url = "http://10.0.0.5:8000/v1"
models = ["llama"]
engine = "vllm"
background_priority = 10
"""


def test_engine_and_metrics_url(tmp_path: Path) -> None:
    (b,) = load_settings(write(tmp_path, ENGINE_BACKEND)).backends
    assert b.engine == "vllm" and b.metrics_url is None and b.background_priority == 10
    assert b.background_gate and b.preempt is None
    text = ENGINE_BACKEND + 'metrics_url = "http://10.0.0.5:9000/metrics"\n'
    (b,) = load_settings(write(tmp_path, text)).backends
    assert b.metrics_url == "http://10.0.0.5:9000/metrics"
    assert Settings().backends[0].engine == "generic"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (ENGINE_BACKEND.replace('"vllm"', '"triton"'), "engine"),
        ('[[backends]]\nname = "l"\ntype = "llamacpp"\nengine = "vllm"\n', "embedded"),
        ('[[backends]]\nname = "o"\ntype = "openai"\nengine = "sglang"\n', "base_url"),
        (ENGINE_BACKEND + "idle_kv_threshold = 1.5\n", "idle_kv_threshold"),
    ],
)
def test_engine_settings_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        load_settings(write(tmp_path, text))
