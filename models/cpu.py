"""What this CPU can do, and the kernel paths and precisions chosen from it.

Nothing in the project may assume an instruction set: CI and plants run on
AVX2-only CPUs as well as on AVX-512 / AMX ones. This module answers, once per
process, what the running torch can use HERE, and turns that into decisions:

- :func:`resolve_precision`: a ``bf16`` request on a CPU without native bf16
  dot products (AVX512_BF16 or AMX-BF16, usable by oneDNN) runs in ``fp32``
  instead, with one logged warning and a note the detectors show in
  ``describe()`` and in each result's ``details``. Emulated bf16 there is
  3-6x SLOWER than fp32 (measured on an AVX2 EPYC: WinCLIP 6.3x, AnomalyCLIP
  5.5x) and less accurate, and oneDNN's prepacked bf16 weights do not exist
  without AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT (the reorder raises).
- :attr:`CpuCapabilities.prefer_onednn_fp32`: fp32 GEMMs with oneDNN-prepacked weights where
  the CPU has AVX-512 (measured faster than the BLAS call behind ``F.linear``
  on Zen 4 and on Sapphire Rapids), plain torch elsewhere (measured 15 %
  slower prepacked on an AVX2 EPYC, maps equal to 1.2e-7). The rule is the
  ISA, not a timing at load: deterministic, free, and a busy machine cannot
  make it pick the slow path; ``benchmarks/winclip_latency.py`` prints both
  paths so the choice can be checked on any machine.

The effective level is the LOWEST of: the CPU's flags, torch's ATen dispatch
level (``ATEN_CPU_CAPABILITY``), oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``) and
the operator's cap ``ZSI_CPU_ISA`` (or the ``max_isa`` argument). A cap can only
lower what is used, never claim an instruction the CPU lacks, so
``ZSI_CPU_ISA=avx2`` exercises the AVX2 paths on any x86 machine, and
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``
makes the libraries themselves behave as on an AVX2-only CPU.

Pure: no model code; the only torch calls are capability queries.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: instruction-set levels, lowest first. ``avx512`` = AVX-512 F/BW/VL/DQ (oneDNN's
#: ``avx512_core``); ``avx512_bf16`` adds native bf16 dot products; ``amx`` adds AMX-BF16.
ISA_LEVELS: tuple[str, ...] = ("generic", "avx2", "avx512", "avx512_bf16", "amx")
#: environment variable capping the level used (``avx2``, ``avx512``, ... or ``auto``)
ENV_MAX_ISA = "ZSI_CPU_ISA"

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) -> our level; names not listed (ALL, DEFAULT,
# newer AMX / AVX10 levels) do not lower anything.
_ONEDNN_CAPS = {
    "SSE41": "generic",
    "AVX": "generic",
    "AVX2": "avx2",
    "AVX2_VNNI": "avx2",
    "AVX2_VNNI_2": "avx2",
    "AVX512_CORE": "avx512",
    "AVX512_CORE_VNNI": "avx512",
    "AVX512_CORE_BF16": "avx512_bf16",
    "AVX512_CORE_FP16": "avx512_bf16",
    "AVX10_1_512": "avx512_bf16",
}
# torch.backends.cpu.get_cpu_capability() -> cap (AVX512 is ATen's highest x86 level)
_ATEN_CAPS = {"DEFAULT": "generic", "AVX2": "avx2"}


def _rank(level: str) -> int:
    return ISA_LEVELS.index(level)


def _lowest(levels: list[str]) -> str:
    return min(levels, key=_rank)


def parse_isa(value: str | None) -> str | None:
    """``ZSI_CPU_ISA`` / ``max_isa`` value -> a level of :data:`ISA_LEVELS`, or ``None`` (no cap).

    Case-insensitive; empty, ``auto`` and ``native`` mean no cap. Raises ``ValueError``
    on anything else, naming the accepted values.
    """
    v = (value or "").strip().lower().replace("-", "_")
    if v in ("", "auto", "native"):
        return None
    if v not in ISA_LEVELS:
        raise ValueError(
            f"{ENV_MAX_ISA} / max_isa must be one of auto, {', '.join(ISA_LEVELS)}; got {value!r}"
        )
    return v


@dataclass(frozen=True)
class CpuCapabilities:
    """What the running torch can use on this CPU (after every cap).

    Attributes:
        isa: effective level (one of :data:`ISA_LEVELS`).
        hardware_isa: level the CPU's own flags allow.
        limited_by: the caps that lowered ``isa`` below ``hardware_isa``, e.g.
            ``("ZSI_CPU_ISA=avx2",)``; empty when none did.
        aten_capability: torch's vector dispatch level (``AVX512``, ``AVX2``, ``DEFAULT``...).
        onednn_linear: this torch build has oneDNN's prepacked linear kernels.
        onednn_bf16: oneDNN's bf16 kernels run here (AVX-512 BW/VL/DQ or AVX-NE-CONVERT,
            as torch checks it, and not capped below ``avx512``).
    """

    isa: str
    hardware_isa: str
    limited_by: tuple[str, ...]
    aten_capability: str
    onednn_linear: bool
    onednn_bf16: bool

    @property
    def fast_bf16(self) -> bool:
        """bf16 is faster than fp32 here: native bf16 dot products that oneDNN uses."""
        return self.onednn_bf16 and _rank(self.isa) >= _rank("avx512_bf16")

    @property
    def prefer_onednn_fp32(self) -> bool:
        """fp32 GEMMs go through oneDNN with prepacked weights (AVX-512 CPUs) rather than ``F.linear``."""
        return self.onednn_linear and _rank(self.isa) >= _rank("avx512")

    def summary(self) -> str:
        """One line for logs and benchmark output."""
        caps = f" (limited by {', '.join(self.limited_by)})" if self.limited_by else ""
        return (
            f"cpu isa {self.isa}{caps}; hardware {self.hardware_isa}; ATen {self.aten_capability}; "
            f"oneDNN linear {'yes' if self.onednn_linear else 'no'}, bf16 {'yes' if self.onednn_bf16 else 'no'}; "
            f"fast bf16 {'yes' if self.fast_bf16 else 'no'}; "
            f"fp32 kernels {'onednn-prepacked' if self.prefer_onednn_fp32 else 'torch'}"
        )


_FLAG_ALIASES = {  # /proc/cpuinfo spelling -> torch.cpu.get_capabilities() spelling
    "fma": "fma3",
    "avx512f": "avx512_f",
    "avx512bw": "avx512_bw",
    "avx512vl": "avx512_vl",
    "avx512dq": "avx512_dq",
}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (torch's cpuinfo, else ``/proc/cpuinfo``), torch's spelling."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            return frozenset(k for k, v in get().items() if v is True)
        except Exception:  # an old or unusual build: fall back to the kernel's view
            log.debug("torch.cpu.get_capabilities() failed", exc_info=True)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(_FLAG_ALIASES.get(f, f) for f in line.split(":", 1)[1].split())
    return frozenset()


def hardware_level(flags: frozenset[str], machine: str | None = None) -> str:
    """Level the flags allow; ``generic`` off x86-64 (no x86 kernel assumption there)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return "generic"
    if not {"avx2", "fma3"} <= flags:
        return "generic"
    if not {"avx512_f", "avx512_bw", "avx512_vl", "avx512_dq"} <= flags:
        return "avx2"
    if "avx512_bf16" not in flags:
        return "avx512"
    return "amx" if "amx_bf16" in flags else "avx512_bf16"


def _onednn_linear_available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _onednn_bf16_runtime() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:
        return False


@functools.cache
def _detect(cap: str | None, onednn_env: str, aten: str) -> CpuCapabilities:
    hw = hardware_level(cpu_flags())
    limits: list[tuple[str, str]] = []
    if aten in _ATEN_CAPS:
        limits.append((f"ATen {aten}", _ATEN_CAPS[aten]))
    if onednn_env in _ONEDNN_CAPS:
        limits.append((f"ONEDNN_MAX_CPU_ISA={onednn_env}", _ONEDNN_CAPS[onednn_env]))
    if cap is not None:
        limits.append((f"{ENV_MAX_ISA}={cap}", cap))
    isa = _lowest([hw] + [level for _, level in limits])
    limited_by = tuple(name for name, level in limits if _rank(level) < _rank(hw))
    onednn_linear = _onednn_linear_available()
    onednn_bf16 = onednn_linear and _onednn_bf16_runtime() and _rank(isa) >= _rank("avx512")
    return CpuCapabilities(
        isa=isa,
        hardware_isa=hw,
        limited_by=limited_by,
        aten_capability=aten,
        onednn_linear=onednn_linear,
        onednn_bf16=onednn_bf16,
    )


def cpu_capabilities(max_isa: str | None = None) -> CpuCapabilities:
    """This process's :class:`CpuCapabilities`, detected once per cap (cached).

    Args:
        max_isa: cap on the level used (``avx2``, ``avx512``...); ``None`` = the
            ``ZSI_CPU_ISA`` environment variable (unset: no cap).
    """
    cap = parse_isa(os.environ.get(ENV_MAX_ISA) if max_isa is None else max_isa)
    onednn_env = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return _detect(cap, onednn_env, str(torch.backends.cpu.get_cpu_capability()))


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a detector runs in.

    Attributes:
        requested: what the caller asked for (``fp32``, ``bf16``, ``fp16``).
        effective: what runs.
        fallback: why ``effective`` differs from ``requested`` (``None`` when it does not).
    """

    requested: str
    effective: str
    fallback: str | None = None


_warned: set[tuple[str, str, str]] = set()
_warned_lock = threading.Lock()


def resolve_precision(
    requested: str, device: str, *, caps: CpuCapabilities | None = None, method: str = ""
) -> PrecisionChoice:
    """Precision to run for ``requested`` on ``device``.

    On a CPU without fast bf16 (:attr:`CpuCapabilities.fast_bf16`) a ``bf16`` request
    becomes ``fp32`` — never emulated bf16 (3-6x slower than fp32 there) — and one
    warning is logged per process and method. Other requests and CUDA devices are
    returned unchanged (validation stays with the detectors).
    """
    if requested != "bf16" or str(device).startswith("cuda"):
        return PrecisionChoice(requested, requested)
    caps = caps or cpu_capabilities()
    if caps.fast_bf16:
        return PrecisionChoice(requested, requested)
    limited = f", limited by {', '.join(caps.limited_by)}" if caps.limited_by else ""
    note = (
        f"bf16 requested, running fp32: this CPU ({caps.isa}{limited}) has no native bf16 matmul "
        "(needs AVX512_BF16 or AMX-BF16 usable by oneDNN); emulated bf16 would be slower than fp32"
    )
    key = (method, requested, note)
    with _warned_lock:
        first = key not in _warned
        _warned.add(key)
    if first:
        log.warning("%s%s", f"{method}: " if method else "", note)
    return PrecisionChoice(requested, "fp32", note)


PRECISIONS = ("fp32", "bf16", "fp16")


def checked_precision(requested: str, device: str, *, method: str = "") -> PrecisionChoice:
    """Validate a ``precision=`` option, then :func:`resolve_precision` it.

    Raises:
        ValueError: an unknown precision, or ``fp16`` on a CPU (use ``bf16`` there).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp16" and not str(device).startswith("cuda"):
        raise ValueError("fp16 is only supported on CUDA; use bf16 on CPU")
    return resolve_precision(requested, device, method=method)


__all__ = [
    "ENV_MAX_ISA",
    "ISA_LEVELS",
    "PRECISIONS",
    "CpuCapabilities",
    "PrecisionChoice",
    "checked_precision",
    "cpu_capabilities",
    "cpu_flags",
    "hardware_level",
    "parse_isa",
    "resolve_precision",
]
