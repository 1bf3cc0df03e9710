"""The deployment files agree with the code: Dockerfile, deploy/compose.yaml, deploy/k8s and
docs/deploy.md.

Every ``BACKBURNER_*`` variable they name is a setting, every ``backburner ...`` command they run
parses against the real CLI, the TOML they mount loads into :class:`Settings` (with the
environment they give it), the Kubernetes manifests validate against the bundled Kubernetes
schemas (kubernetes-validate, offline), and the services run the commands the fleet runs.
No network, no Docker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import typer.main
import yaml

from backburner.cli import app
from backburner.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_TOML = DEPLOY / "backburner.toml"
ENV_EXAMPLE = DEPLOY / ".env.example"
K8S = DEPLOY / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
DOC = ROOT / "docs" / "deploy.md"

# Kubernetes versions the manifests must be valid for (kubernetes-validate bundles the schemas)
K8S_VERSIONS = ("1.30", "1.34")
# what the fleet runs (README "Scaling out"): a command and the flags it is given
FLEET_COMMANDS = {("serve", "--no-worker"), ("worker",), ("db", "upgrade")}
# the image that compose and the manifests run backburner from
K8S_IMAGE = "backburner"
# object storage for batch files: the deployment files set these
OBJECT_STORAGE_FIELDS = ("files_url", "files_endpoint_url")

ENV_NAME = re.compile(r"\bBACKBURNER_([A-Z0-9_]+)")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")

Doc = dict[str, Any]


# ------------------------------------------------------------------------------- helpers


def deployment_files() -> list[Path]:
    """Every file that deploys backburner or documents it."""
    files = [DOCKERFILE, DOC, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]
    return [p for p in files if p.is_file()]


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def load_yaml_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def k8s_docs() -> Iterator[tuple[Path, Doc]]:
    """Every Kubernetes object in deploy/k8s (the kustomization is kustomize's, not the API's)."""
    for path in sorted(K8S.glob("*.yaml")):
        if path == KUSTOMIZATION:
            continue
        for doc in load_yaml_all(path):
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            yield path, doc


def k8s_objects(kind: str) -> list[Doc]:
    return [doc for _, doc in k8s_docs() if doc["kind"] == kind]


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    if doc["kind"] == "CronJob":
        cron: Doc = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return cron
    return None


def containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def cli_root() -> Any:
    """The CLI as the command objects Typer builds (click's, or the copy newer Typer vendors:
    both have ``commands``, ``params`` and ``make_context``)."""
    return typer.main.get_command(app)


def subcommands(cmd: Any) -> dict[str, Any] | None:
    commands = getattr(cmd, "commands", None)
    return commands if isinstance(commands, dict) else None


def cli_envvars() -> set[str]:
    """Variables the CLI reads itself (e.g. BACKBURNER_BASE_URL for the client commands)."""
    found: set[str] = set()

    def walk(cmd: Any) -> None:
        for param in cmd.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                found.add(envvar)
            elif envvar:
                found.update(envvar)
        for sub in (subcommands(cmd) or {}).values():
            walk(sub)

    walk(cli_root())
    return found


def known_env_names() -> set[str]:
    """``BACKBURNER_*`` names that mean something: a Settings field (nested ones with ``__``),
    ``BACKBURNER_CONFIG`` (config.py reads the TOML path from it) and the CLI's own."""
    fields = {f"BACKBURNER_{name.upper()}" for name in Settings.model_fields}
    return fields | {"BACKBURNER_CONFIG"} | cli_envvars()


def command_shape(argv: list[str]) -> tuple[str, ...]:
    """Parse ``backburner <argv>`` with the real CLI (unknown commands, unknown options and bad
    values fail) and return the command path and the flags given, e.g. ``("serve",
    "--no-worker")``."""
    cmd = cli_root()
    path: list[str] = []
    rest = list(argv)
    while (commands := subcommands(cmd)) is not None:
        assert rest, f"backburner {shlex.join(argv)}: names a group, not a command"
        name = rest.pop(0)
        assert name in commands, f"backburner {shlex.join(argv)}: there is no command {name!r}"
        path.append(name)
        cmd = commands[name]
    try:
        cmd.make_context(" ".join(["backburner", *path]), list(rest))
    except Exception as exc:  # click's UsageError, BadParameter (Typer's copies in new Typer)
        raise AssertionError(f"backburner {shlex.join(argv)}: {exc}") from exc
    flags = {
        opt
        for param in cmd.params
        if getattr(param, "is_flag", False)
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]
    }
    return (*path, *sorted(tok for tok in rest if tok in flags))


def option_value(argv: list[str], name: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_env() -> dict[str, str]:
    """The variables the image sets (its ENV instructions, ``KEY=value`` form)."""
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for tok in shlex.split(rest):
                key, sep, value = tok.partition("=")
                assert sep, f"ENV {rest}: write KEY=value"
                env[key] = value
    return env


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg or ""
        raise AssertionError(f"${{{name}}} is required and deploy/.env.example does not set it")

    return INTERPOLATION.sub(sub, value).replace("$$", "$")


def compose() -> Doc:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def backburner_services(doc: Doc) -> dict[str, Doc]:
    """The compose services that run the backburner image."""
    return {
        name: svc
        for name, svc in doc["services"].items()
        if "build" in svc or str(svc.get("image", "")).startswith("${BB_IMAGE")
    }


def compose_env(svc: Doc) -> dict[str, str]:
    env = svc.get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping"
    values = env_example()
    return {str(k): interpolate(str(v), values) for k, v in env.items()}


def settings_with(env: dict[str, str], toml: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("BACKBURNER_"):
            monkeypatch.delenv(name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(toml)


def k8s_container_argvs() -> list[tuple[str, list[str]]]:
    """(where, argv after ``backburner``) for every container that runs the backburner image."""
    found: list[tuple[str, list[str]]] = []
    for path, doc in k8s_docs():
        spec = pod_spec(doc)
        if spec is None:
            continue
        for c in containers(spec):
            if c["image"].split(":")[0] != K8S_IMAGE:
                continue
            argv = [*c.get("command", []), *c.get("args", [])]
            where = f"{path.name} {doc['kind']}/{doc['metadata']['name']} {c['name']}"
            assert argv[:1] == ["backburner"], f"{where}: command must start with backburner"
            found.append((where, argv[1:]))
    return found


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BACKBURNER_"):
            monkeypatch.delenv(name)


# ------------------------------------------------------------------------------- every file


def test_the_files_exist() -> None:
    for path in (DOCKERFILE, DOCKERIGNORE, COMPOSE, COMPOSE_TOML, ENV_EXAMPLE, KUSTOMIZATION, DOC):
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_yaml_all(path)
    assert docs, f"{path.name} holds no document"
    assert all(isinstance(d, dict) for d in docs)


def test_object_storage_settings_exist() -> None:
    """The deployment files configure batch files on S3 through these two settings."""
    missing = [f for f in OBJECT_STORAGE_FIELDS if f not in Settings.model_fields]
    assert not missing, f"Settings has no {missing} (object storage for batch files)"


@pytest.mark.parametrize("path", deployment_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_backburner_variable_is_a_setting(path: Path) -> None:
    known = known_env_names()
    text = path.read_text(encoding="utf-8")
    unknown = set()
    for m in ENV_NAME.finditer(text):
        name = "BACKBURNER_" + m.group(1).split("__")[0]
        if name not in known:
            unknown.add(m.group(0))
    assert not unknown, f"{path.name}: no such setting: {sorted(unknown)}"


def test_the_doc_describes_every_variable_the_deployments_set() -> None:
    doc = DOC.read_text(encoding="utf-8")
    names: set[str] = set()
    for svc in backburner_services(compose()).values():
        names.update(compose_env(svc))
    for cm in k8s_objects("ConfigMap"):
        names.update(k for k in cm.get("data", {}) if "." not in k)
    for secret in k8s_objects("Secret"):
        names.update(secret.get("stringData", {}))
    names.update(m.group(0) for m in ENV_NAME.finditer(DOCKERFILE.read_text(encoding="utf-8")))
    missing = sorted(n for n in names if n not in doc)
    assert not missing, f"docs/deploy.md does not mention {missing}"


def test_commands_in_the_doc_parse() -> None:
    """Lines of docs/deploy.md's code blocks that run ``backburner ...`` name real commands
    and options."""
    seen = 0
    in_code = False
    for raw in DOC.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code or not line.startswith("backburner "):
            continue
        argv = shlex.split(line, comments=True)
        command_shape(argv[1:])
        seen += 1
    assert seen, "docs/deploy.md shows no backburner command"


# ------------------------------------------------------------------------------- Dockerfile


def test_dockerfile() -> None:
    ins = dockerfile_instructions()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in ins if word == "ARG"}
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        assert resolved == "python:3.11-slim", f"FROM {image} -> {resolved}"
    assert args.get("WITH_EMBEDDED") == "false", "the embedded engine is off by default"

    text = DOCKERFILE.read_text(encoding="utf-8")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    assert {"local", "postgres"} <= set(extras)
    assert 'extras="postgres"' in text and 'extras="local,postgres"' in text
    # compilers only where llama-cpp-python is built: the builder stage
    runtime = text.split("AS runtime", 1)[1]
    assert "build-essential" in text.split("AS runtime", 1)[0]
    assert "build-essential" not in runtime and "cmake" not in runtime

    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as non-root"
    assert ("EXPOSE", "8000") in ins
    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and '"python"' in health[0]
    assert "curl" not in health[0] and "wget" not in health[0]

    entry = [json.loads(rest) for word, rest in ins if word == "ENTRYPOINT"]
    cmd = [json.loads(rest) for word, rest in ins if word == "CMD"]
    assert entry == [["backburner"]]
    assert len(cmd) == 1
    assert command_shape(cmd[0]) in FLEET_COMMANDS
    assert option_value(cmd[0], "--host") == "0.0.0.0"


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    copied = [
        src
        for word, rest in dockerfile_instructions()
        if word == "COPY" and not rest.startswith("--from")
        for src in rest.split()[:-1]
    ]
    assert copied
    if "*" in lines:  # an allow list: each copied path is let back in
        for src in copied:
            assert f"!{src}" in lines or f"!{src}/" in lines, f".dockerignore drops {src}"
    assert any(".venv" in ln for ln in lines) or "*" in lines


# ------------------------------------------------------------------------------- compose


def test_compose_services() -> None:
    doc = compose()
    services: dict[str, Doc] = doc["services"]
    pg = services["postgres"]
    assert str(pg["image"]).startswith("postgres:16") and "healthcheck" in pg
    assert str(services["minio"]["image"]).startswith("minio/minio")
    init = [s for s in services.values() if str(s.get("image", "")).startswith("minio/mc")]
    assert len(init) == 1 and "mc mb" in json.dumps(init[0]["command"])
    assert init[0].get("restart") == "no"

    shapes: dict[str, tuple[str, ...]] = {}
    replicas: dict[str, int] = {}
    for name, svc in backburner_services(doc).items():
        argv = svc["command"]
        assert isinstance(argv, list), f"{name}: write command as a list (exec form)"
        shapes[name] = command_shape([str(a) for a in argv])
        replicas[name] = int(svc.get("deploy", {}).get("replicas", 1))
    assert set(shapes.values()) == FLEET_COMMANDS, shapes

    def count(shape: tuple[str, ...]) -> int:
        return sum(replicas[n] for n, s in shapes.items() if s == shape)

    assert count(("serve", "--no-worker")) >= 2, "two API replicas"
    assert count(("worker",)) >= 2, "several workers"
    assert count(("db", "upgrade")) == 1

    host_ports = [
        str(p).rsplit(":", 1)[0]
        for n, s in shapes.items()
        if s[0] == "serve"
        for p in backburner_services(doc)[n].get("ports", [])
    ]
    assert len(host_ports) == len(set(host_ports)), f"API host ports collide: {host_ports}"

    for name, svc in backburner_services(doc).items():
        deps = svc.get("depends_on", {})
        if shapes[name][0] == "db":
            assert deps["postgres"]["condition"] == "service_healthy"
            assert svc.get("restart") == "no"
        else:
            migrate = next(n for n, s in shapes.items() if s == ("db", "upgrade"))
            assert deps[migrate]["condition"] == "service_completed_successfully"
            listens = shapes[name][0] == "serve"
            assert svc.get("healthcheck", {}).get("disable", False) is not listens, name


def test_compose_mounts_the_config_it_names() -> None:
    for name, svc in backburner_services(compose()).items():
        config = option_value([str(a) for a in svc["command"]], "--config")
        assert config, f"{name}: no --config"
        mounts = {}
        for vol in svc.get("volumes", []):
            src, dst, *_ = str(vol).split(":")
            mounts[dst] = src
        assert config in mounts, f"{name}: {config} is not mounted"
        assert (COMPOSE.parent / mounts[config]).resolve() == COMPOSE_TOML.resolve()


def test_compose_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a compose container sees: the mounted TOML and its environment (filled from
    .env.example, as Compose fills it from .env)."""
    services = backburner_services(compose())
    assert services
    for name, svc in services.items():
        env = compose_env(svc)
        container_env = {k: v for k, v in image_env().items() if k.startswith("BACKBURNER_")}
        settings = settings_with(container_env | env, COMPOSE_TOML, monkeypatch)
        assert settings.database_url.startswith("postgresql://"), name
        assert str(getattr(settings, "files_url", "")).startswith("s3://"), name
        assert getattr(settings, "files_endpoint_url", None) == "http://minio:9000", name
        assert settings.ops_token is not None and settings.ops_token.get_secret_value()
        assert settings.host == "0.0.0.0", name  # the image's BACKBURNER_HOST
        assert settings.auth == "required"
        assert [b.name for b in settings.backends] == ["vllm"]
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(env)


def test_compose_toml_alone_loads() -> None:
    settings = load_settings(COMPOSE_TOML)
    (backend,) = settings.backends
    assert backend.type == "openai" and backend.base_url == "http://vllm:8000/v1"


# ------------------------------------------------------------------------------- Kubernetes


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    assert kust["kind"] == "Kustomization"
    assert "namespace" not in kust, "namespace-free: apply into any namespace"
    listed = sorted(kust["resources"])
    present = sorted(p.name for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)
    assert listed == present
    assert [i["name"] for i in kust.get("images", [])] == [K8S_IMAGE]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    seen = 0
    for path, doc in k8s_docs():
        assert "namespace" not in doc["metadata"], f"{path.name}: namespace-free"
        where = f"{path.name} {doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            loc = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{where} (Kubernetes {version}): {loc}: {exc.message}") from exc
        seen += 1
    assert seen >= 7


def test_k8s_commands_are_the_fleet_commands() -> None:
    shapes = {}
    for where, argv in k8s_container_argvs():
        shapes[where] = command_shape(argv)
    assert set(shapes.values()) == FLEET_COMMANDS, shapes
    job = k8s_objects("Job")
    assert len(job) == 1
    (c,) = job[0]["spec"]["template"]["spec"]["containers"]
    assert command_shape(c["command"][1:]) == ("db", "upgrade")


def test_k8s_pods_are_locked_down() -> None:
    for path, doc in k8s_docs():
        spec = pod_spec(doc)
        if spec is None:
            continue
        where = f"{path.name} {doc['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), where
            assert {"cpu", "memory"} <= set(res["limits"]), where
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


def test_k8s_api_deployment_and_service() -> None:
    api = [d for d in k8s_objects("Deployment") if command_shape(pod_argv(d))[0] == "serve"]
    assert len(api) == 1
    (dep,) = api
    assert dep["spec"]["replicas"] == 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] in ("/healthz", "/readyz")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    argv = c["command"][1:]
    assert ports["http"] == int(option_value(argv, "--port") or 8000)
    assert option_value(argv, "--host") == "0.0.0.0"

    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = [
        s for s in k8s_objects("Service") if s["spec"]["selector"].items() <= labels.items()
    ]
    assert len(services) == 1
    assert all(p["targetPort"] in ports for p in services[0]["spec"]["ports"])

    workers = [d for d in k8s_objects("Deployment") if command_shape(pod_argv(d)) == ("worker",)]
    assert len(workers) == 1
    worker_labels = workers[0]["spec"]["template"]["metadata"]["labels"]
    assert not services[0]["spec"]["selector"].items() <= worker_labels.items()


def pod_argv(doc: Doc) -> list[str]:
    spec = pod_spec(doc)
    assert spec is not None
    (c,) = spec["containers"]
    return [*c.get("command", []), *c.get("args", [])][1:]


def test_k8s_references_resolve() -> None:
    """ConfigMaps and Secrets that pods read are defined here; --config is a mounted key."""
    configmaps = {cm["metadata"]["name"]: cm for cm in k8s_objects("ConfigMap")}
    secrets = {s["metadata"]["name"] for s in k8s_objects("Secret")}
    for path, doc in k8s_docs():
        spec = pod_spec(doc)
        if spec is None:
            continue
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, path.name
        for c in containers(spec):
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in configmaps, path.name
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets, path.name
            argv = [*c.get("command", []), *c.get("args", [])]
            config = option_value(argv, "--config")
            if config is None:
                continue
            mount = next(
                m for m in c["volumeMounts"] if config.startswith(m["mountPath"].rstrip("/") + "/")
            )
            volume = volumes[mount["name"]]
            key = config[len(mount["mountPath"].rstrip("/")) + 1 :]
            assert key in configmaps[volume["configMap"]["name"]]["data"], f"{path.name}: {key}"


def test_k8s_settings_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a pod sees: the ConfigMap's TOML and the env from the ConfigMap and the Secret."""
    configmaps = {cm["metadata"]["name"]: cm for cm in k8s_objects("ConfigMap")}
    secrets = {s["metadata"]["name"]: s for s in k8s_objects("Secret")}
    toml = tmp_path / "backburner.toml"
    toml.write_text(configmaps["backburner-config"]["data"]["backburner.toml"], encoding="utf-8")
    env: dict[str, str] = {}
    for _, doc in k8s_docs():
        spec = pod_spec(doc)
        if spec is None:
            continue
        for c in containers(spec):
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    env.update(configmaps[ref["configMapRef"]["name"]]["data"])
                if "secretRef" in ref:
                    env.update(secrets[ref["secretRef"]["name"]]["stringData"])
    assert all(isinstance(v, str) for v in env.values())
    settings = settings_with(env, toml, monkeypatch)
    assert settings.host == "0.0.0.0" and settings.auth == "required"
    assert settings.database_url.startswith("postgresql://")
    assert str(getattr(settings, "files_url", "")).startswith("s3://")
    assert settings.ops_token is not None
    assert [b.name for b in settings.backends] == ["vllm"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(env)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_valid_objects() -> None:
    """``kubectl kustomize`` (offline) renders the directory; what it renders validates too."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)],
        check=True,
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert len(docs) == len(list(k8s_docs()))
    images: set[str] = set()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
        spec = pod_spec(doc)
        if spec is not None:
            images.update(c["image"] for c in containers(spec))
    kust = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    (image,) = kust["images"]
    assert images == {f"{image['newName']}:{image['newTag']}"}
