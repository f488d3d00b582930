"""WinCLIP (zero-shot) and WinCLIP+ (few-shot) detector (METHODS.md section 1)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import open_clip
import torch

from models.base import (
    AnomalyResult,
    ArrayCache,
    Detector,
    LocalArrayCache,
    ReferenceMismatchError,
    ReferenceSet,
    check_image,
    image_hash,
    leave_one_out_indices,
    usable_cached,
)
from models.clip_backbone import ClipBackbone, encode_text_trimmed, preprocess
from models.cpu import checked_precision, cpu_capabilities
from models.winclip.encoder import (
    EncodedImages,
    PackedTower,
    TowerFn,
    VisualTower,
    WinClipEncoder,
    default_prepack,
)
from models.winclip.maths import (
    TEMPERATURE,
    class_scores,
    fuse_zero_shot,
    harmonic_aggregation,
    upsample_map,
    visual_association,
)
from prompts import PromptEnsemble, ensemble_for

if TYPE_CHECKING:
    from prompts import ProductRecipe

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``kernels`` label of the tower made of open_clip's own modules (CPUs without AVX-512)
OPEN_CLIP_KERNELS = "open_clip"
TEXT_BATCH = 64  # prompts per text-encoder pass


class WinClipDetector(Detector):
    """WinCLIP / WinCLIP+ on an open_clip ViT.

    Holds the model, the window index tensors and a cache of text prototypes (keyed
    by model, weights and prompt content). No per-request state: ``predict_batch``
    and ``encode_references`` may run concurrently from several threads.

    Args:
        backbone: loaded open_clip model (:func:`models.clip_backbone.create_clip`).
        device: torch device string.
        scales: window sizes in patches (reference: (2, 3)).
        cache: where text prototypes are kept (default: in-process LRU).
        precision: ``fp32`` (default), ``bf16`` or ``fp16`` for the visual tower;
            scores and aggregation are always computed in float32. On a CPU without
            native bf16 (AVX2-only, or AVX-512 without BF16) ``bf16`` runs as ``fp32``
            (:func:`models.cpu.resolve_precision`): one warning is logged and
            ``describe()`` / result ``details`` carry ``precision_fallback``.
        tower: optional replacement for the visual tower (e.g. an ONNX session), same
            signature as :class:`models.winclip.encoder.VisualTower` (default: a
            :class:`models.winclip.encoder.PackedTower` in the chosen precision).
    """

    method = "winclip"
    supports_references = True

    def __init__(
        self,
        *,
        backbone: ClipBackbone,
        device: str = "cpu",
        scales: Sequence[int] = (2, 3),
        temperature: float = TEMPERATURE,
        cache: ArrayCache | None = None,
        precision: str = "fp32",
        tower: TowerFn | None = None,
        tower_label: str = "torch",
    ) -> None:
        self.backbone = backbone
        self.clip: Any = backbone.model
        self.model_name = backbone.model_name
        self.weights_tag = backbone.weights_tag
        self.random_weights = backbone.random_weights
        self.device = str(device)
        self.temperature = float(temperature)
        on_cpu = not self.device.startswith("cuda")
        #: ISA level the CPU paths were chosen for (``None`` on CUDA)
        self.cpu_isa = cpu_capabilities().isa if on_cpu else None
        self.precision_choice = checked_precision(precision, self.device, method=self.method)
        self.precision = self.precision_choice.effective  # what runs
        self.cache: ArrayCache = cache if cache is not None else LocalArrayCache()
        self.tokenizer = open_clip.get_tokenizer(backbone.model_name)
        if tower is None:
            tower = self._default_tower(on_cpu)
        self.tower_label = tower_label
        #: GEMM path of the tower: ``onednn-prepacked`` / ``torch`` (PackedTower), ``open_clip``
        #: (open_clip's own modules, one pass per window scale), else the backend
        self.kernels = str(
            getattr(tower, "kernels", OPEN_CLIP_KERNELS if isinstance(tower, VisualTower) else tower_label)
        )
        # On CPU, sub-batches of ~one image keep activations in cache (measured: same or
        # faster than one huge pass); on GPU the whole batch goes through at once.
        self.encoder = WinClipEncoder(
            visual=self.clip.visual, scales=scales, tower=tower, max_tokens_per_pass=4096 if on_cpu else None
        )
        self.scales = self.encoder.scales
        self._text_locks: dict[str, threading.Lock] = {}
        self._text_locks_guard = threading.Lock()

    def _default_tower(self, on_cpu: bool) -> TowerFn:
        """The visual tower for this device, precision and CPU (``models/cpu.py``).

        One :class:`PackedTower` pass for the full image and all windows, with oneDNN-
        prepacked weights where those are the fastest GEMMs (AVX-512 CPUs, bf16 with native
        kernels) and on GPUs. On a CPU without them (AVX2), fp32 runs open_clip's own
        modules instead, one pass per window scale: torch's fused inference attention
        there beat the packed pass with plain GEMMs (3.35 vs 3.70 s/image with oneDNN and
        ATen limited to AVX2; anomalib 2.7 3.25 s in the same run), with maps equal to
        float rounding.
        """
        dtype = _PRECISIONS[self.precision]
        if on_cpu and dtype == torch.float32 and not default_prepack(dtype, "cpu"):
            return VisualTower(self.clip.visual)
        try:
            return PackedTower(self.clip.visual, dtype=dtype)
        except ValueError:  # a block layout PackedTower does not know: open_clip's modules
            if self.precision != "fp32":
                raise
            return VisualTower(self.clip.visual)

    # ------------------------------------------------------------------ prompts
    def _prompt_inputs(
        self, object_name: str | None, product: ProductRecipe | None
    ) -> tuple[PromptEnsemble, str | None]:
        name = object_name or (product.object_name if product is not None else None)
        return ensemble_for(product), name

    def prompt_digest(self, object_name: str | None = None, product: ProductRecipe | None = None) -> str:
        ensemble, name = self._prompt_inputs(object_name, product)
        return ensemble.digest(name)

    def text_cache_key(self, digest: str) -> str:
        return f"winclip:text:{self.model_key}:{digest}"

    @torch.no_grad()
    def compute_text_prototypes(self, ensemble: PromptEnsemble, object_name: str | None) -> torch.Tensor:
        """``[2, E]`` float32: mean of the UNNORMALISED text embeddings of the normal and anomalous prompts."""
        normal, anomalous = ensemble.build(object_name)
        protos = []
        for prompts in (normal, anomalous):
            tokens = self.tokenizer(prompts).to(self.device)  # [N, n_ctx]
            emb = torch.cat(
                [
                    encode_text_trimmed(self.clip, tokens[i : i + TEXT_BATCH])
                    for i in range(0, len(prompts), TEXT_BATCH)
                ]
            )
            protos.append(emb.float().mean(dim=0))
        return torch.stack(protos)  # [2, E]

    def text_prototypes(
        self, object_name: str | None = None, product: ProductRecipe | None = None
    ) -> torch.Tensor:
        """Cached text prototypes ``[2, E]`` on the detector's device."""
        ensemble, name = self._prompt_inputs(object_name, product)
        return self._cached_prototypes(ensemble, name, ensemble.digest(name))

    def _cached_prototypes(self, ensemble: PromptEnsemble, name: str | None, digest: str) -> torch.Tensor:
        key = self.text_cache_key(digest)
        shape = (2, int(self.clip.visual.output_dim))  # a cached value of another shape is corrupt
        cached = usable_cached(self.cache.get_array(key), shape)
        if cached is None:
            with self._text_locks_guard:
                lock = self._text_locks.setdefault(key, threading.Lock())
            with lock:  # one computation per key even under concurrent requests
                cached = usable_cached(self.cache.get_array(key), shape)
                if cached is None:
                    protos = self.compute_text_prototypes(ensemble, name)
                    self.count("text_prototypes_computed")
                    cached = protos.cpu().numpy().astype(np.float32)
                    self.cache.set_array(key, cached)
        return torch.from_numpy(np.array(cached, dtype=np.float32)).to(self.device)

    # --------------------------------------------------------------- references
    @torch.no_grad()
    def encode_references(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
    ) -> ReferenceSet:
        """Encode K normal images into the WinCLIP+ memory.

        Memory: patch tokens (after ln_post, not projected) and each scale's window
        embeddings, all references flattened together. Independent of prompts.
        """
        if len(images) == 0:
            raise ValueError("at least one reference image is needed")
        for i, img in enumerate(images):
            check_image(img, f"reference image {i}")
        enc = self._encode(list(images))
        arrays: dict[str, np.ndarray] = {
            "patches": enc.patches.reshape(-1, enc.patches.shape[-1]).float().cpu().numpy()
        }
        for k, w in enc.windows.items():
            arrays[f"windows_{k}"] = w.reshape(-1, w.shape[-1]).float().cpu().numpy()
        self.count("references_encoded", len(images))
        return ReferenceSet(
            method=self.method,
            model_key=self.model_key,
            image_hashes=tuple(image_hash(img) for img in images),
            arrays=arrays,
        )

    def check_references(self, references: ReferenceSet | None) -> None:
        """Also the memory itself: ``patches [n * P, D]`` and ``windows_k [n * W_k, E]`` for every
        scale, ``n >= 1`` (images, or tiles of a tiled product), ``P``/``W_k`` this encoder's
        patches / windows per image and ``D``/``E`` its token / embedding widths.

        Raises:
            ReferenceMismatchError: another model's references, or arrays of the wrong shape
                (a corrupt stored set must be refused here, not fail inside the model).
        """
        super().check_references(references)
        if references is None:
            return
        visual = self.clip.visual
        want = {"patches": (self.encoder.n_patches, int(visual.ln_post.weight.shape[0]))}
        for k in self.scales:
            want[f"windows_{k}"] = (int(self.encoder.masks[k].shape[0]), int(visual.output_dim))
        for name, (per_image, width) in want.items():
            arr = references.arrays.get(name)
            if (
                arr is None
                or arr.ndim != 2
                or arr.shape[0] == 0
                or arr.shape[0] % per_image
                or arr.shape[1] != width
            ):
                got = "missing" if arr is None else f"of shape {tuple(arr.shape)}"
                raise ReferenceMismatchError(
                    f"WinCLIP+ memory array {name!r} is {got}; this detector needs [n * {per_image}, {width}]"
                )

    # ---------------------------------------------------------------- inference
    def _encode(self, images: list[np.ndarray]) -> EncodedImages:
        pixels = preprocess(
            images, self.backbone.image_size, self.backbone.mean, self.backbone.std, self.device
        )
        return self.encoder.encode(pixels)

    def zero_shot_maps(
        self, enc: EncodedImages, prototypes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``[B]`` and zero-shot grid maps ``[B, h, w]`` (float32)."""
        s_img = class_scores(enc.image.float(), prototypes, self.temperature)  # [B]
        scale_maps = []
        for k in self.scales:
            s_win = class_scores(enc.windows[k].float(), prototypes, self.temperature)  # [B, W]
            scale_maps.append(
                harmonic_aggregation(s_win, self.encoder.grid_size, self.encoder.aggregation_index[k])
            )
        return s_img, fuse_zero_shot(s_img, scale_maps)

    def few_shot_map(self, enc: EncodedImages, references: ReferenceSet) -> torch.Tensor:
        """WinCLIP+ few-shot grid map ``[B, h, w]``: mean of patch VA and per-scale harmonic window VA."""
        memory = {
            name: torch.tensor(np.asarray(arr)).to(self.device) for name, arr in references.arrays.items()
        }
        return self._few_shot_from_memory(enc.patches, enc.windows, memory)

    def _few_shot_from_memory(
        self, patches: torch.Tensor, windows: dict[int, torch.Tensor], memory: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Few-shot map ``[B, h, w]`` of ``patches [B, P, D]`` / ``windows {k: [B, W_k, E]}`` against
        a memory ``{"patches": [R, D], "windows_k": [R_k, E]}`` (the arrays of a ReferenceSet)."""
        b = patches.shape[0]
        gh, gw = self.encoder.grid_size
        maps = [visual_association(patches.float(), memory["patches"]).reshape(b, gh, gw)]
        for k in self.scales:
            va = visual_association(windows[k].float(), memory[f"windows_{k}"])  # [B, W]
            maps.append(harmonic_aggregation(va, self.encoder.grid_size, self.encoder.aggregation_index[k]))
        return torch.stack(maps).mean(dim=0)

    @torch.no_grad()
    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
    ) -> list[AnomalyResult]:
        """Score a batch of ``HWC uint8 RGB`` images of one product (sizes may differ).

        Returns one :class:`AnomalyResult` per image; its ``anomaly_map`` is float32
        ``(H, W)`` of that image with values in [0, 1]. Timings are per batch.
        """
        if len(images) == 0:
            return []
        self.check_references(references)
        for i, img in enumerate(images):
            check_image(img, f"image {i}")
        digest, prototypes, enc, timings = self._prompts_and_encoding(images, object_name, product)
        t3 = time.perf_counter()
        scores, grid = self.zero_shot_maps(enc, prototypes)
        if references is not None:
            fs = self.few_shot_map(enc, references)
            grid = (grid + fs) / 2
            scores = (scores + fs.flatten(1).amax(dim=1)) / 2
        timings["score"] = time.perf_counter() - t3
        return self._results(images, scores, grid, digest, timings, used_references=references is not None)

    def _prompts_and_encoding(
        self, images: Sequence[np.ndarray], object_name: str | None, product: ProductRecipe | None
    ) -> tuple[str, torch.Tensor, EncodedImages, dict[str, float]]:
        """Prompt digest (once per batch: cache key and result label), text prototypes and
        the encoded batch, with the seconds of each step (``text``, ``preprocess``, ``encode``)."""
        t0 = time.perf_counter()
        ensemble, name = self._prompt_inputs(object_name, product)
        digest = ensemble.digest(name)
        prototypes = self._cached_prototypes(ensemble, name, digest)
        t1 = time.perf_counter()
        pixels = preprocess(
            list(images), self.backbone.image_size, self.backbone.mean, self.backbone.std, self.device
        )
        t2 = time.perf_counter()
        enc = self.encoder.encode(pixels)
        t3 = time.perf_counter()
        return digest, prototypes, enc, {"text": t1 - t0, "preprocess": t2 - t1, "encode": t3 - t2}

    @torch.no_grad()
    def leave_one_out(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
    ) -> list[AnomalyResult]:
        """WinCLIP+ scores of each golden image against the memory of the OTHER images.

        The same numbers as :meth:`models.base.Detector.leave_one_out` (references encoded
        from the others, then :meth:`predict`), but every image is encoded ONCE: the
        zero-shot part of each score needs no references, and the few-shot map of image
        ``i`` is its visual association with the concatenated patch and window
        embeddings of the other images (pixel-identical copies of ``i`` left out too).
        ``K`` image encodings instead of ``K^2``.
        """
        if len(images) == 0:
            return []
        for i, img in enumerate(images):
            check_image(img, f"image {i}")
        keep = leave_one_out_indices(images)  # raises with < 2 distinct images
        digest, prototypes, enc, timings = self._prompts_and_encoding(images, object_name, product)
        self.count("references_encoded", len(images))
        t3 = time.perf_counter()
        scores, grid = self.zero_shot_maps(enc, prototypes)  # [K], [K, h, w]
        patches = enc.patches.float()  # [K, P, D]
        windows = {k: w.float() for k, w in enc.windows.items()}  # [K, W_k, E]
        fs_maps = []
        for i, others in enumerate(keep):
            idx = torch.tensor(others, dtype=torch.long, device=patches.device)
            memory = {"patches": patches[idx].reshape(-1, patches.shape[-1])}  # [(K-1) P, D]
            for k, w in windows.items():
                memory[f"windows_{k}"] = w[idx].reshape(-1, w.shape[-1])  # [(K-1) W_k, E]
            own = {k: w[i : i + 1] for k, w in windows.items()}
            fs_maps.append(self._few_shot_from_memory(patches[i : i + 1], own, memory)[0])
        fs = torch.stack(fs_maps)  # [K, h, w]
        grid = (grid + fs) / 2
        scores = (scores + fs.flatten(1).amax(dim=1)) / 2
        timings["score"] = time.perf_counter() - t3
        results = self._results(images, scores, grid, digest, timings, used_references=True)
        return [
            replace(r, details={**r.details, "reference_count": len(others), "leave_one_out": True})
            for r, others in zip(results, keep, strict=True)
        ]

    def _results(
        self,
        images: Sequence[np.ndarray],
        scores: torch.Tensor,
        grid: torch.Tensor,
        digest: str,
        timings: dict[str, float],
        *,
        used_references: bool,
    ) -> list[AnomalyResult]:
        """Upsample the grid maps ``[B, h, w]`` to each image and wrap ``scores [B]`` as results."""
        t4 = time.perf_counter()
        maps: list[np.ndarray] = []
        for i, img in enumerate(images):
            up = upsample_map(grid[i].float(), (img.shape[0], img.shape[1])).clamp_(0.0, 1.0)
            maps.append(up.cpu().numpy().astype(np.float32, copy=False))
        timings = {**timings, "upsample": time.perf_counter() - t4}
        results = []
        for i, m in enumerate(maps):
            m.setflags(write=False)
            results.append(
                AnomalyResult(
                    score=float(scores[i].clamp(0.0, 1.0)),
                    anomaly_map=m,
                    method=self.method,
                    model=self.model_name,
                    weights=self.weights_tag,
                    prompt_digest=digest,
                    used_references=used_references,
                    random_weights=self.random_weights,
                    timings=dict(timings),
                    details={**self._precision_details(), "batch_size": len(images)},
                )
            )
        return results

    def _precision_details(self) -> dict[str, Any]:
        """Precision and kernel path, with ``precision_fallback`` (a sentence) only when bf16 fell back."""
        out: dict[str, Any] = {
            "precision": self.precision,
            "precision_requested": self.precision_choice.requested,
            "backend": self.tower_label,
            "kernels": self.kernels,
        }
        if self.cpu_isa is not None:
            out["cpu_isa"] = self.cpu_isa
        if self.precision_choice.fallback:
            out["precision_fallback"] = self.precision_choice.fallback
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self._precision_details(), "scales": list(self.scales)}


WEIGHTS_NAME = "openclip-vit-b-16-plus-240-laion400m_e31"
