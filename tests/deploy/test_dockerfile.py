"""The Dockerfile, checked statically (no Docker engine here): stages, base images, user,
healthcheck, volumes, port, and every file the build copies exists and is in the context."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    cmd: str
    args: str
    stage: int  # index of the FROM it belongs to (-1: before the first FROM)


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        full = (buf + line).strip()
        buf = ""
        cmd, _, args = full.partition(" ")
        cmd = cmd.upper()
        if cmd == "FROM":
            stage += 1
        out.append(Instruction(cmd, args.strip(), stage))
    assert not buf, "dangling line continuation"
    return out


INSTR = parse_dockerfile(DOCKERFILE)


def of(cmd: str, stage: int | None = None) -> list[Instruction]:
    return [i for i in INSTR if i.cmd == cmd and (stage is None or i.stage == stage)]


def final_stage() -> int:
    return max(i.stage for i in INSTR)


def stage_names() -> dict[str, int]:
    names = {}
    for i in of("FROM"):
        parts = i.args.split()
        if len(parts) == 3 and parts[1].upper() == "AS":
            names[parts[2]] = i.stage
    return names


def arg_defaults() -> dict[str, str]:
    out = {}
    for i in of("ARG"):
        name, _, default = i.args.partition("=")
        out[name] = default
    return out


def dockerignore_allows(rel: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; ``!`` re-includes."""
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    included = True
    parts = Path(rel).parts
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        # a pattern matches the path or any of its parent directories
        prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        if p.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, p[3:]) for part in parts) or fnmatch.fnmatch(rel, p[3:])
        else:
            hit = any(fnmatch.fnmatch(pre, p) for pre in prefixes)
        if hit:
            included = neg
    return included


def copy_sources() -> list[str]:
    """Sources of every COPY/ADD from the build context (not --from=stage)."""
    out = []
    for i in of("COPY") + of("ADD"):
        words = shlex.split(i.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.extend(words[:-1])
    return out


def test_multi_stage_build_with_builder_and_runtime() -> None:
    names = stage_names()
    assert {"base", "builder", "runtime"} <= set(names)
    assert names["runtime"] == final_stage()
    # the runtime gets the installed venv from the builder, not the compilers
    assert any("--from=builder" in i.args and "/opt/venv" in i.args for i in of("COPY", final_stage()))
    assert not any("build-essential" in i.args for i in of("RUN", final_stage()))


def torch_wheels_bring_cuda(index_url: str) -> bool:
    """PyPI's Linux torch wheels (empty index) and the ``/whl/cuXXX`` indexes ship CUDA libraries."""
    return index_url == "" or bool(re.search(r"/whl/cu\d+", index_url))


def installs_cuda_twice(base_image: str, torch_index_url: str) -> bool:
    return base_image.startswith("nvidia/cuda:") and torch_wheels_bring_cuda(torch_index_url)


def test_gpu_flavour_by_default_with_one_copy_of_cuda() -> None:
    """Default build = GPU: CUDA comes once, from torch's PyPI wheels, not also from the base image."""
    args = arg_defaults()
    assert of("FROM")[0].args.startswith("${BASE_IMAGE}")
    assert args["BASE_IMAGE"].startswith("python:3.11-slim")  # no CUDA in the base image
    assert args["TORCH_INDEX_URL"] == ""  # PyPI: CUDA wheels (they bring the CUDA runtime and cuDNN)
    assert torch_wheels_bring_cuda(args["TORCH_INDEX_URL"])
    assert not installs_cuda_twice(args["BASE_IMAGE"], args["TORCH_INDEX_URL"])
    assert "onnx-gpu" in args["EXTRAS"]
    # the GPU runtime hook gets what it needs without a CUDA base image
    env = " ".join(i.args for i in of("ENV", final_stage()))
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "download.pytorch.org/whl/cpu" in text and "python:3.11-slim" in text  # documented CPU build


def test_cuda_twice_is_recognised() -> None:
    assert installs_cuda_twice("nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04", "")
    assert installs_cuda_twice(
        "nvidia/cuda:12.8.1-runtime-ubuntu24.04", "https://download.pytorch.org/whl/cu128"
    )
    assert not installs_cuda_twice(
        "nvidia/cuda:13.0.1-runtime-ubuntu24.04", "https://download.pytorch.org/whl/cpu"
    )
    assert not installs_cuda_twice("python:3.11-slim-bookworm", "")


def test_torch_pinned_like_the_install_script() -> None:
    args = arg_defaults()
    install = (REPO / "scripts/install.sh").read_text(encoding="utf-8")
    assert f"torch=={args['TORCH_VERSION']}" in install
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in install
    runs = " ".join(i.args for i in of("RUN"))
    assert "torch==${TORCH_VERSION}" in runs and "${TORCH_INDEX_URL:+--index-url" in runs


def test_project_installed_with_extras_that_exist() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    default = arg_defaults()["EXTRAS"]
    assert set(default.split(",")) <= extras
    assert "saa" in default and "onnx-gpu" in default
    install = [i.args for i in of("RUN") if ".[${EXTRAS}]" in i.args]
    assert install and "--no-build-isolation" in install[0]


def test_non_root_user_in_the_final_stage() -> None:
    users = of("USER", final_stage())
    assert users, "the runtime stage must switch user"
    assert users[-1].args not in ("root", "0", "0:0")
    assert any("useradd" in i.args for i in of("RUN", final_stage()))


def test_healthcheck_uses_health_on_port_8000() -> None:
    (hc,) = of("HEALTHCHECK")
    assert hc.stage == final_stage()
    assert "--start-period" in hc.args and "CMD" in hc.args
    assert "http://127.0.0.1:8000/health" in hc.args
    # exec form, parseable JSON after CMD
    assert json.loads(hc.args.split("CMD", 1)[1].strip())[0] == "python"


def test_port_volumes_env_and_command() -> None:
    assert [i.args for i in of("EXPOSE")] == ["8000"]
    (vol,) = of("VOLUME")
    assert "/weights" in json.loads(vol.args) and "/data" in json.loads(vol.args)
    env = " ".join(i.args for i in of("ENV", final_stage()))
    assert "ZSI_WEIGHTS_DIR=/weights" in env
    assert json.loads(of("ENTRYPOINT")[-1].args) == ["anomaly-inspect"]
    cmd = json.loads(of("CMD")[-1].args)
    assert (
        cmd[0] == "serve"
        and cmd[cmd.index("--host") + 1] == "0.0.0.0"
        and cmd[cmd.index("--port") + 1] == "8000"
    )


def test_no_weights_baked_in_by_default() -> None:
    assert arg_defaults()["BAKE_WEIGHTS"] == ""
    bake = [i for i in of("RUN") if "BAKE_WEIGHTS" in i.args]
    assert bake and 'if [ -n "${BAKE_WEIGHTS}" ]' in bake[0].args
    # the VOLUME comes after the optional bake step (changes after VOLUME would be dropped)
    assert INSTR.index(bake[0]) < INSTR.index(of("VOLUME")[0])
    for src in copy_sources():
        assert not re.search(r"weights($|/)|\.pt$|\.pth$|\.safetensors$", src), src


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    sources = copy_sources()
    assert {"pyproject.toml", "README.md", "models", "service", "prompts"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
        assert dockerignore_allows(src), f"COPY {src}: excluded by .dockerignore"


def test_dockerignore_keeps_weights_and_junk_out() -> None:
    for rel in (
        "weights/sam/sam_vit_h_4b8939.pth",
        ".venv/bin/python",
        ".git/HEAD",
        "models/__pycache__/x.pyc",
        "models/tower.onnx",
        "tests/deploy/test_fetch.py",
    ):
        assert not dockerignore_allows(rel), rel
    for rel in ("models/weights_manifest.json", "models/configs/tiny-vit-test.json", "service/fetch.py"):
        assert dockerignore_allows(rel), rel


def test_python_packages_needed_by_the_image_are_copied() -> None:
    """Every top-level package pyproject installs is copied into the builder."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = cfg["tool"]["setuptools"]["packages"]["find"]["include"]
    sources = set(copy_sources())
    for pattern in include:
        assert pattern.rstrip("*") in sources, pattern
