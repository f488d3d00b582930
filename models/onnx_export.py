"""The WinCLIP visual tower in ONNX, run by onnxruntime (CPU, or CUDA where available).

The tower is the part of an open_clip ViT after the positional embedding
(:class:`models.winclip.encoder.VisualTower`): ``x [N, L, D] -> (pooled [N, E],
tokens [N, L-1, D])``. N (sequences) and L (tokens per sequence: 1+225 for a full
image, 1+4 and 1+9 for windows) are dynamic axes of the exported graph.

``torch.onnx.export`` (TorchScript tracer) bakes the sequence shapes of
``nn.MultiheadAttention`` into the graph, so the tower is exported through
:class:`ExportableTower`, which computes the same function with the same
parameters but writes attention with shape-agnostic reshapes. The parity test
(``tests/models/test_onnx_export.py``) compares the ONNX output with the
original module.

Needs the ``onnx`` extra (``onnx``, ``onnxruntime``) or ``onnx-gpu`` (``onnxruntime-gpu``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_OPSET = 17
INPUT_NAME = "tokens"
OUTPUT_NAMES = ("pooled", "patch_tokens")
FINGERPRINT_KEY = "zsi_tower_fingerprint"


class ExportableTower(nn.Module):
    """``ln_pre``, transformer blocks, ``ln_post``, CLS projection: traceable with dynamic N and L.

    Shares its parameters with ``tower`` (a :class:`~models.winclip.encoder.VisualTower`
    or anything with ``ln_pre``, ``transformer.resblocks``, ``ln_post``, ``proj``).
    Supports open_clip's plain ``ResidualAttentionBlock`` (``nn.MultiheadAttention``,
    any MLP activation, optional LayerScale).
    """

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        t: Any = tower
        self.ln_pre = t.ln_pre
        self.ln_post = t.ln_post
        self.proj = t.proj
        self.blocks: Any = nn.ModuleList(t.transformer.resblocks)
        for blk in self.blocks:
            attn = blk.attn
            if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
                raise ValueError("ExportableTower supports nn.MultiheadAttention blocks only")
            if not isinstance(getattr(blk, "ln_attn", nn.Identity()), nn.Identity):
                raise ValueError("ExportableTower does not support scaled-cosine / ln_attn blocks")

    @staticmethod
    def _attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
        n, length = x.shape[0], x.shape[1]  # traced: dynamic in the exported graph
        d, heads = int(attn.embed_dim), int(attn.num_heads)  # constants
        qkv = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [N, L, 3D]
        qkv = qkv.reshape(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # [3, N, H, L, hd]
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = (d // heads) ** -0.5
        att = torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)  # [N, H, L, L]
        out = (att @ v).transpose(1, 2).reshape(n, length, d)  # [N, L, D]
        return attn.out_proj(out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.ln_pre(x)  # [N, L, D]
        for blk in self.blocks:
            x = x + blk.ls_1(self._attention(blk.attn, blk.ln_1(x)))
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        x = self.ln_post(x)
        pooled = x[:, 0]  # [N, D]
        if self.proj is not None:
            pooled = pooled @ self.proj  # [N, E]
        return pooled, x[:, 1:]


def tower_fingerprint(tower: nn.Module) -> str:
    """Hash of the tower's parameter names, shapes and values (16 hex): which weights an export holds."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_visual_tower(
    tower: nn.Module,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    *,
    fingerprint: str | None = None,
) -> Path:
    """Export ``tower`` (float32, CPU) to ONNX at ``path`` with dynamic N and L; returns the path.

    Input ``tokens`` ``[N, L, D]`` float32; outputs ``pooled`` ``[N, E]`` and
    ``patch_tokens`` ``[N, L-1, D]``. The weights fingerprint is stored in the
    model's metadata so a stale file can be recognised.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = ExportableTower(tower).eval()
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError("export a float32 CPU tower (move it with .float().cpu() first)")
    width = int(module.ln_pre.weight.shape[0])
    example = torch.zeros(2, 5, width)  # [N, L, D]; N and L are dynamic
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript (not in the `onnx` extra); shapes are checked by the parity test.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {0: "n", 1: "l"},
                OUTPUT_NAMES[0]: {0: "n"},
                OUTPUT_NAMES[1]: {0: "n", 1: "l_minus_1"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(tmp))
    meta = model.metadata_props.add()
    meta.key, meta.value = FINGERPRINT_KEY, fingerprint or tower_fingerprint(tower)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path


def onnx_fingerprint(path: str | Path) -> str | None:
    """The weights fingerprint stored in an exported file (None if absent)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == FINGERPRINT_KEY), None)


def available_providers(device: str = "cpu") -> list[str]:
    """onnxruntime providers to use: CUDA first when ``device`` is CUDA and it is available."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"] if str(device).startswith("cuda") else []
    return [p for p in wanted if p in have] + ["CPUExecutionProvider"]


class OnnxVisualTower:
    """Callable like :class:`~models.winclip.encoder.VisualTower`, computed by onnxruntime.

    ``tower(x [N, L, D] torch) -> (pooled [N, E], tokens [N, L-1, D])`` as float32
    torch tensors on ``x``'s device. Thread-safe (onnxruntime sessions are).

    Args:
        path: an ONNX file written by :func:`export_visual_tower`.
        device: ``cpu`` or ``cuda[:N]``; CUDA uses the CUDA provider when onnxruntime-gpu
            is installed, otherwise falls back to the CPU provider.
        providers: explicit provider list (overrides ``device``).
    """

    def __init__(self, path: str | Path, device: str = "cpu", providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.device = str(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        provider_list: list[Any] = list(providers or available_providers(self.device))
        if "CUDAExecutionProvider" in provider_list and ":" in self.device:
            i = provider_list.index("CUDAExecutionProvider")
            provider_list[i] = ("CUDAExecutionProvider", {"device_id": int(self.device.split(":")[1])})
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=provider_list)
        self.providers = self.session.get_providers()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        pooled, tokens = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: arr})
        return torch.from_numpy(pooled).to(x.device), torch.from_numpy(tokens).to(x.device)

    forward = __call__

    def __repr__(self) -> str:
        return f"OnnxVisualTower({self.path.name}, providers={self.providers})"


def default_onnx_dir() -> Path:
    """Where exported towers are kept when no path is given: ``$XDG_CACHE_HOME/zeroshot-inspect/onnx``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zeroshot-inspect" / "onnx"


def onnx_tower_for(
    tower: nn.Module,
    backbone: Any,
    *,
    device: str = "cpu",
    onnx_path: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
) -> OnnxVisualTower:
    """An :class:`OnnxVisualTower` for ``tower``, exporting it first where needed.

    ``onnx_path`` is reused when it holds an export of exactly these weights (same
    fingerprint) and re-exported otherwise. Without ``onnx_path`` the file goes to
    :func:`default_onnx_dir` under a name made of the model and weights fingerprint.
    """
    cpu_tower: nn.Module = tower
    p0 = next(tower.parameters(), None)
    if p0 is not None and (p0.device.type != "cpu" or p0.dtype != torch.float32):
        import copy

        cpu_tower = copy.deepcopy(tower).float().cpu()
    fp = tower_fingerprint(cpu_tower)
    if onnx_path is None:
        name = str(getattr(backbone, "model_name", "tower")).replace("/", "_")
        onnx_path = default_onnx_dir() / f"{name}-visual-{fp}.onnx"
    path = Path(onnx_path)
    if not path.is_file() or onnx_fingerprint(path) != fp:
        try:
            export_visual_tower(cpu_tower, path, opset, fingerprint=fp)
        except PermissionError:  # read-only location: export to a temporary file instead
            path = Path(tempfile.mkdtemp(prefix="zsi-onnx-")) / path.name
            export_visual_tower(cpu_tower, path, opset, fingerprint=fp)
    return OnnxVisualTower(path, device=device)
