"""docker-compose.yml (and the scale-out override), checked statically: services, profiles,
healthchecks, volumes, GPU reservation, port, limits, env file. No Docker engine needed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_dockerfile import arg_defaults, dockerignore_allows, installs_cuda_twice

REPO = Path(__file__).resolve().parents[2]
API = ("api-gpu", "api-cpu")


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's ``!reset`` / ``!override`` tags."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return {"__tag__": node.tag, "value": loader.construct_sequence(node)}
    if isinstance(node, yaml.MappingNode):
        return {"__tag__": node.tag, "value": loader.construct_mapping(node)}
    return {"__tag__": node.tag, "value": loader.construct_scalar(node)}  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)


COMPOSE = load(REPO / "docker-compose.yml")
SERVICES: dict[str, Any] = COMPOSE["services"]


def variables(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)(?::?-[^}]*)?\}", text))


def env_example() -> dict[str, str]:
    out = {}
    for line in (REPO / "docker/env.example").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("# ") and "=" in line and line[2:].split("=")[0].isupper():
            line = line[2:]  # documented but commented out
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        out[key] = value
    return out


def test_services_and_profiles() -> None:
    assert {"redis", "api-gpu", "api-cpu", "weights"} <= set(SERVICES)
    assert "profiles" not in SERVICES["redis"]  # always on
    assert SERVICES["api-gpu"]["profiles"] == ["gpu"]
    assert SERVICES["api-cpu"]["profiles"] == ["cpu"]
    assert SERVICES["weights"]["profiles"] == ["tools"]  # only with `docker compose run`


def test_redis_healthcheck_persistence_and_no_public_port() -> None:
    r = SERVICES["redis"]
    assert r["image"].startswith("redis:")
    assert r["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    cmd = r["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert "--save" in cmd and "--maxmemory" in cmd
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "volatile-lru"  # never evicts references
    assert "redis-data:/data" in r["volumes"]
    assert "ports" not in r
    assert r["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", API)
def test_api_service(name: str) -> None:
    s = SERVICES[name]
    # port 8000 in the container, published (host side configurable)
    assert any(str(p).endswith(":8000") for p in s["ports"])
    assert "--port" in s["command"] and s["command"][s["command"].index("--port") + 1] == "8000"
    assert s["command"][s["command"].index("--host") + 1] == "0.0.0.0"
    # healthcheck on /health
    hc = s["healthcheck"]
    assert hc["test"][0] == "CMD" and "http://127.0.0.1:8000/health" in " ".join(hc["test"])
    assert "start_period" in hc
    # weights read-only on a volume, data volume
    vols = s["volumes"]
    assert any(v.endswith(":/weights:ro") for v in vols)
    assert "data:/data" in vols
    # Redis shared, started first and healthy
    assert s["depends_on"]["redis"]["condition"] == "service_healthy"
    env = s["environment"]
    assert env["ZSI_REDIS_URL"] == "${ZSI_REDIS_URL:-redis://redis:6379/0}"
    assert env["ZSI_WEIGHTS_DIR"] == "/weights"
    assert s["restart"] == "unless-stopped"
    limits = s["deploy"]["resources"]["limits"]
    assert "cpus" in limits and "memory" in limits
    assert "api" in s["networks"]["default"]["aliases"]


def test_gpu_reservation_only_on_the_gpu_service() -> None:
    gpu = SERVICES["api-gpu"]
    (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"] and dev["count"] == 1
    assert gpu["environment"]["ZSI_DEVICE"] == "cuda"
    cpu = SERVICES["api-cpu"]
    assert "reservations" not in cpu["deploy"]["resources"]
    assert cpu["environment"]["ZSI_DEVICE"] == "cpu"


def test_build_arguments_match_the_dockerfile() -> None:
    declared = arg_defaults()
    gpu, cpu = SERVICES["api-gpu"]["build"], SERVICES["api-cpu"]["build"]
    for b in (gpu, cpu):
        assert (REPO / b["context"] / b["dockerfile"]).is_file()
        assert set(b["args"]) <= set(declared)
    assert gpu["args"]["BASE_IMAGE"] == declared["BASE_IMAGE"]
    assert cpu["args"]["BASE_IMAGE"].startswith("python:3.11-slim")
    assert cpu["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "onnx-gpu" not in cpu["args"]["EXTRAS"] and "onnx" in cpu["args"]["EXTRAS"].split(",")
    assert SERVICES["api-gpu"]["image"] != SERVICES["api-cpu"]["image"]
    for b in (gpu, cpu):  # CUDA once: never a CUDA base image together with CUDA torch wheels
        full = {**declared, **b["args"]}
        assert not installs_cuda_twice(full["BASE_IMAGE"], full["TORCH_INDEX_URL"]), b["args"]


def default_of(value: object) -> str | None:
    """What Compose makes of ``value`` with nothing set in the environment (``${VAR:-default}``)."""
    if value is None:
        return None
    text = str(value)
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)


def all_services() -> dict[str, Any]:
    out = dict(SERVICES)
    out.update({f"scale:{k}": v for k, v in load(REPO / "docker/compose.scale.yml")["services"].items()})
    return out


@pytest.mark.parametrize("name", sorted(all_services()))
def test_default_limits_fit_any_host(name: str) -> None:
    """Docker refuses to start a container whose CPU limit exceeds the host's CPUs: by default no
    service may ask for more than 1 CPU, and the API has no cap at all unless ZSI_API_CPUS says so."""
    limits = (all_services()[name].get("deploy") or {}).get("resources", {}).get("limits", {})
    cpus = default_of(limits.get("cpus"))
    if cpus is not None:
        assert float(cpus) <= 1.0, f"{name}: default cpus limit {cpus} can exceed a small host"


@pytest.mark.parametrize("name", API)
def test_api_limits_are_opt_in(name: str) -> None:
    limits = SERVICES[name]["deploy"]["resources"]["limits"]
    assert limits["cpus"] == "${ZSI_API_CPUS:-0}"  # 0 = no limit (Compose sets none)
    assert default_of(limits["memory"]) == "0" and str(limits["memory"]).startswith("${ZSI_API_MEMORY")
    documented = env_example()
    for var in ("ZSI_API_CPUS", "ZSI_API_MEMORY_CPU", "ZSI_API_MEMORY_GPU"):
        # docker/env.example copied to .env must not bring a cap back
        assert documented[var] in ("", "0"), f"{var}={documented[var]} in docker/env.example"
    doc = (REPO / "docs/deploy.md").read_text(encoding="utf-8")
    assert "ZSI_API_CPUS" in doc and "no limit" in doc


def test_weights_tool_writes_the_volume_the_api_reads() -> None:
    w = SERVICES["weights"]
    assert w["entrypoint"] == ["anomaly-inspect", "weights"]
    assert "${ZSI_WEIGHTS_VOLUME:-weights}:/weights" in w["volumes"]  # read-write
    for name in API:
        assert "${ZSI_WEIGHTS_VOLUME:-weights}:/weights:ro" in SERVICES[name]["volumes"]
    assert {"weights", "data", "redis-data"} <= set(COMPOSE["volumes"])


def test_env_file_is_optional_and_example_documents_every_variable() -> None:
    for name in API:
        (ef,) = SERVICES[name]["env_file"]
        assert ef == {"path": ".env", "required": False}
    documented = env_example()
    text = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    text += (REPO / "docker/compose.scale.yml").read_text(encoding="utf-8")
    missing = variables(text) - set(documented)
    assert not missing, f"variables used in compose but not in docker/env.example: {sorted(missing)}"
    assert documented["COMPOSE_PROFILES"] in ("cpu", "gpu")
    assert all(k.startswith(("ZSI_", "COMPOSE_", "REDIS_")) for k in documented)


def test_env_example_is_not_in_the_image_context_and_dotenv_is_ignored() -> None:
    assert not dockerignore_allows(".env") and not dockerignore_allows("docker/env.example")
    assert ".env" in (REPO / ".gitignore").read_text(encoding="utf-8").split()


def test_scale_override_puts_replicas_behind_a_load_balancer() -> None:
    scale = load(REPO / "docker/compose.scale.yml")["services"]
    for name in API:
        assert scale[name]["ports"] == {"__tag__": "!reset", "value": []}  # replicas publish no port
        assert "replicas" in scale[name]["deploy"]
    lb = scale["lb"]
    assert any(str(p).endswith(":8000") for p in lb["ports"])
    conf_mount = next(v for v in lb["volumes"] if "nginx.conf" in v)
    assert (REPO / conf_mount.split(":")[0].removeprefix("./")).is_file()
    conf = (REPO / "docker/nginx.conf").read_text(encoding="utf-8")
    assert "server api:8000" in conf and "listen 8000" in conf
    assert "healthcheck" in lb


def test_one_command_bring_up_is_documented() -> None:
    doc = (REPO / "docs/deploy.md").read_text(encoding="utf-8")
    assert "docker compose --profile gpu up -d" in doc
    assert "docker compose --profile cpu up -d" in doc
    assert "docker compose run --rm weights fetch" in doc
