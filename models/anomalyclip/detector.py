"""AnomalyCLIP detector (METHODS.md section 2): loading, cached text embeddings, inference.

Object-agnostic: ``object_name`` / ``product`` do not change anything; references are
not used. Text embeddings depend only on the prompt checkpoint (and the CLIP text
tower): computed once, cached through the :class:`models.base.ArrayCache`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from models.anomalyclip.checkpoint import learner_digest, load_prompt_learner
from models.anomalyclip.torch_model import (
    BLUR_SIGMA,
    AnomalyClipArch,
    DpamVisualEncoder,
    PromptLearner,
    VisualFeatures,
    anomaly_maps,
    image_scores,
    text_embeddings,
)
from models.base import (
    RANDOM_INIT,
    AnomalyResult,
    ArrayCache,
    Detector,
    LocalArrayCache,
    ReferenceSet,
    WeightsError,
    check_image,
    usable_cached,
)
from models.clip_backbone import FIT_MODES, ClipBackbone, create_clip, preprocess_pil, square_fit
from models.cpu import checked_precision, cpu_capabilities
from models.weights import fetch_hint, manifest

if TYPE_CHECKING:
    from prompts import ProductRecipe

DEFAULT_BACKBONE = "ViT-L-14-336"
TINY_BACKBONE = "tiny-vitl-test"
CLIP_WEIGHTS_NAME = "openclip-vit-l-14-336-openai"
#: prompt checkpoint choice -> manifest name. ``visa`` (default) is meant to be the
#: checkpoint trained on VisA, for MVTec-like parts (see docs/anomalyclip.md on naming).
PROMPT_WEIGHTS_NAMES = {
    "visa": "anomalyclip-prompt-learner-visa",
    "mvtec": "anomalyclip-prompt-learner-mvtec",
}
DEFAULT_PROMPTS = "visa"

#: architectures by name (open_clip name of the model actually built, processing size, layers).
#: Feature layers: the top block only, as the official ``test.sh``/``train.sh`` since
#: 2025-04-13 (``--features_list 24``); see docs/anomalyclip.md.
ARCHS: dict[str, AnomalyClipArch] = {
    # OpenAI weights need QuickGELU: open_clip's plain "ViT-L-14-336" config uses nn.GELU
    DEFAULT_BACKBONE: AnomalyClipArch(
        clip_model="ViT-L-14-336-quickgelu",
        image_size=518,
        feature_layers=(24,),
        multi_feature_layers=(6, 12, 18, 24),
    ),
    # 7 blocks, dual path from block 6: block 7 is the top, (6, 7) the multi-layer variant
    TINY_BACKBONE: AnomalyClipArch(
        clip_model=TINY_BACKBONE, image_size=70, feature_layers=(7,), multi_feature_layers=(6, 7)
    ),
}

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class AnomalyClipWeights:
    """Where the two AnomalyCLIP weight files are.

    Attributes:
        clip: OpenAI ``ViT-L-14-336px.pt`` (TorchScript archive) or an open_clip state
            dict; ``None`` = the official ``openai`` tag through open_clip (network);
            ``RANDOM_INIT`` = random (tests/demo only).
        prompts: released-format prompt checkpoint, or ``RANDOM_INIT``.
        weights_dir: the weights directory the paths came from (for error messages).
        prompts_name: manifest name of the prompt checkpoint (for error messages).
    """

    clip: str | Path | None
    prompts: str | Path
    weights_dir: Path | None = None
    prompts_name: str = PROMPT_WEIGHTS_NAMES[DEFAULT_PROMPTS]


def prompt_weights_name(prompt_checkpoint: str = DEFAULT_PROMPTS) -> str:
    try:
        return PROMPT_WEIGHTS_NAMES[prompt_checkpoint]
    except KeyError:
        raise ValueError(
            f"prompt_checkpoint must be one of {', '.join(PROMPT_WEIGHTS_NAMES)}, got {prompt_checkpoint!r}"
        ) from None


def required_weights(prompt_checkpoint: str = DEFAULT_PROMPTS, **_: Any) -> tuple[str, ...]:
    """Manifest names the configuration needs (CLIP + the chosen prompt checkpoint)."""
    return (CLIP_WEIGHTS_NAME, prompt_weights_name(prompt_checkpoint))


def weights_from_dir(
    weights_dir: Path, prompt_checkpoint: str = DEFAULT_PROMPTS, **_: Any
) -> AnomalyClipWeights:
    """The two files of a weights directory laid out as the manifest says."""
    wd = Path(weights_dir)
    specs = manifest()
    name = prompt_weights_name(prompt_checkpoint)
    return AnomalyClipWeights(
        clip=wd / specs[CLIP_WEIGHTS_NAME].file,
        prompts=wd / specs[name].file,
        weights_dir=wd,
        prompts_name=name,
    )


def _missing_file_error(what: str, path: Path, name: str, weights_dir: Path | None) -> WeightsError:
    if weights_dir is None:
        rel = manifest()[name].file if name in manifest() else ""
        s = str(path)
        weights_dir = Path(s[: -len(rel)]) if rel and s.endswith(rel) else path.parent
    return WeightsError(
        f"AnomalyCLIP {what} not found: {path}. Fetch it (where a network exists) with: "
        f"{fetch_hint([name], weights_dir)}"
    )


def _resolve_weights(weights: Any, prompt_checkpoint: str) -> AnomalyClipWeights:
    name = prompt_weights_name(prompt_checkpoint)
    if isinstance(weights, AnomalyClipWeights):
        return weights
    if isinstance(weights, Mapping):
        return AnomalyClipWeights(
            clip=weights.get("clip"),
            prompts=weights["prompts"],
            prompts_name=weights.get("prompts_name", name),
        )
    if weights is None:
        raise WeightsError(
            "AnomalyCLIP needs its prompt checkpoint file "
            f"({manifest()[name].file}); no library downloads it. Fetch the weights with "
            f"'{fetch_hint(list(required_weights(prompt_checkpoint)), 'weights')}' and build the detector "
            "with models.load_detector_from_dir('anomalyclip', 'weights')."
        )
    if str(weights) == RANDOM_INIT:
        return AnomalyClipWeights(clip=RANDOM_INIT, prompts=RANDOM_INIT, prompts_name=name)
    path = Path(weights).expanduser()
    if path.is_dir():
        return weights_from_dir(path, prompt_checkpoint)
    return AnomalyClipWeights(clip=None, prompts=path, prompts_name=name)  # a prompt checkpoint file


class AnomalyClipDetector(Detector):
    """AnomalyCLIP on an open_clip ViT with DPAM and a loaded prompt learner.

    Holds the model and nothing per request: ``predict_batch`` may run from several
    threads at once. Text embeddings live in ``cache`` (keyed by model and prompt
    checkpoint digest).

    Args:
        backbone: loaded open_clip model (QuickGELU ViT-L-14-336 for the OpenAI weights).
        prompt_learner: loaded :class:`PromptLearner`.
        prompt_tag: name of the prompt weights (file tag or ``random-init``).
        arch: :class:`AnomalyClipArch` of the backbone.
        image_size: processing resolution (default ``arch.image_size``, 518 for ViT-L).
        feature_layers: blocks whose V-V tokens make the map (default ``arch.feature_layers``:
            the top block, as the official code; ``arch.multi_feature_layers`` = the
            four-layer mean of the 2024 release).
        fit: how an image becomes the square input: ``squash`` (reference: PIL bicubic to
            ``image_size x image_size``, aspect ratio not kept) or ``pad`` (aspect ratio
            kept, black borders; the map is cropped back to the image). See
            :func:`models.clip_backbone.square_fit`.
        cache: where text embeddings are kept (default: in-process LRU).
        precision: ``fp32`` (default), ``bf16`` (autocast; CPU or CUDA) or ``fp16`` (CUDA).
            On a CPU without native bf16 (AVX2-only, or AVX-512 without BF16) ``bf16``
            runs as ``fp32`` (:func:`models.cpu.resolve_precision`; emulated bf16 was
            5.5x slower than fp32 on an AVX2 EPYC): one warning is logged and
            ``describe()`` / result ``details`` carry ``precision_fallback``.
        sigma: Gaussian blur of the map at the processing resolution (reference: 4).
    """

    method = "anomalyclip"
    supports_references = False

    def __init__(
        self,
        *,
        backbone: ClipBackbone,
        prompt_learner: PromptLearner,
        prompt_tag: str,
        arch: AnomalyClipArch,
        device: str = "cpu",
        image_size: int | None = None,
        feature_layers: Sequence[int] | None = None,
        cache: ArrayCache | None = None,
        precision: str = "fp32",
        prompts_random: bool = False,
        sigma: float = BLUR_SIGMA,
        fit: str = "squash",
    ) -> None:
        if fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
        self.backbone = backbone
        self.clip: Any = backbone.model
        self.arch = arch
        self.device = str(device)
        self.model_name = backbone.model_name
        self.prompt_tag = prompt_tag
        self.weights_tag = f"{backbone.weights_tag}+{prompt_tag}"
        self.random_weights = bool(backbone.random_weights or prompts_random)
        self.precision_choice = checked_precision(precision, self.device, method=self.method)
        self.precision = self.precision_choice.effective  # what runs
        #: ISA level the CPU path was chosen for (``None`` on CUDA)
        self.cpu_isa = None if self.device.startswith("cuda") else cpu_capabilities().isa
        self.sigma = float(sigma)
        self.fit = fit
        self.image_size = int(image_size or arch.image_size)
        self.encoder = DpamVisualEncoder(
            visual=self.clip.visual,
            feature_layers=tuple(feature_layers or arch.feature_layers),
            dpam_start=arch.dpam_start,
        )
        if self.image_size % self.encoder.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size")
        self.prompt_learner = prompt_learner.to(self.device).eval().requires_grad_(False)
        self.checkpoint_digest = learner_digest(prompt_learner)
        self.cache: ArrayCache = cache if cache is not None else LocalArrayCache()
        self._text_lock = threading.Lock()

    # ------------------------------------------------------------------ prompts
    def prompt_digest(self, object_name: str | None = None, product: ProductRecipe | None = None) -> str:
        """Digest of the prompt checkpoint content (object-agnostic: arguments ignored)."""
        return self.checkpoint_digest

    def text_cache_key(self) -> str:
        return f"anomalyclip:text:{self.model_key}:{self.checkpoint_digest}"

    @torch.no_grad()
    def compute_text_embeddings(self) -> torch.Tensor:
        """``[2, E]`` float32, L2-normalised (normal, abnormal)."""
        return text_embeddings(self.clip, self.prompt_learner)

    def text_embeddings(self) -> torch.Tensor:
        """Cached ``[2, E]`` text embeddings on the detector's device."""
        key = self.text_cache_key()
        shape = (2, int(self.clip.visual.output_dim))  # a cached value of another shape is corrupt
        cached = usable_cached(self.cache.get_array(key), shape)
        if cached is None:
            with self._text_lock:  # one computation even under concurrent first requests
                cached = usable_cached(self.cache.get_array(key), shape)
                if cached is None:
                    cached = self.compute_text_embeddings().cpu().numpy().astype(np.float32)
                    self.count("text_prototypes_computed")
                    self.cache.set_array(key, cached)
        return torch.from_numpy(np.array(cached, dtype=np.float32)).to(self.device)

    # ---------------------------------------------------------------- inference
    def encode(self, pixels: torch.Tensor) -> VisualFeatures:
        """DPAM features of normalised ``[B, 3, S, S]`` pixels, in the detector's precision."""
        if self.precision == "fp32":
            return self.encoder(pixels)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.autocast(device_type=device_type, dtype=_PRECISIONS[self.precision]):
            return self.encoder(pixels)

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``[B]`` and blurred maps ``[B, S, S]`` (float32, [0, 1]) at the processing size."""
        feats = self.encode(pixels)
        scores = image_scores(feats.global_embedding.float(), text)
        patches = [p.float() for p in feats.patch_embeddings]
        maps = anomaly_maps(patches, text, feats.grid_size, int(pixels.shape[-1]), self.sigma)
        return scores, maps

    @torch.inference_mode()
    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: ProductRecipe | None = None,
        references: ReferenceSet | None = None,
    ) -> list[AnomalyResult]:
        """Score ``HWC uint8 RGB`` images (sizes may differ); ``object_name``/``product`` are ignored.

        Each result's ``anomaly_map`` is float32 ``(H, W)`` of its image, values in [0, 1].
        """
        if references is not None:
            self.check_references(references)  # raises: AnomalyCLIP uses no references
        if len(images) == 0:
            return []
        for i, img in enumerate(images):
            check_image(img, f"image {i}")
        t0 = time.perf_counter()
        text = self.text_embeddings()
        t1 = time.perf_counter()
        pixels = preprocess_pil(
            list(images), self.image_size, self.backbone.mean, self.backbone.std, self.device, fit=self.fit
        )
        t2 = time.perf_counter()
        scores, maps = self.score_pixels(pixels, text)
        t3 = time.perf_counter()
        out_maps = []
        for i, img in enumerate(images):
            h, w = int(img.shape[0]), int(img.shape[1])
            box = square_fit(h, w, self.image_size, self.fit)
            m = maps[i, box.top : box.top + box.height, box.left : box.left + box.width]  # the image's part
            if (h, w) != tuple(m.shape):
                shrink = h < m.shape[0] or w < m.shape[1]
                m = F.interpolate(
                    m[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink
                )[0, 0]
            arr = m.clamp(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)
            arr.setflags(write=False)
            out_maps.append(arr)
        t4 = time.perf_counter()
        timings = {"text": t1 - t0, "preprocess": t2 - t1, "encode_score": t3 - t2, "resize": t4 - t3}
        details = {
            **self._precision_details(),
            "image_size": self.image_size,
            "fit": self.fit,
            "feature_layers": list(self.encoder.feature_layers),
            "prompt_checkpoint": self.prompt_tag,
            "batch_size": len(images),
        }
        return [
            AnomalyResult(
                score=float(scores[i].clamp(0.0, 1.0)),
                anomaly_map=m,
                method=self.method,
                model=self.model_name,
                weights=self.weights_tag,
                prompt_digest=self.checkpoint_digest,
                used_references=False,
                random_weights=self.random_weights,
                timings=dict(timings),
                details=dict(details),
            )
            for i, m in enumerate(out_maps)
        ]

    def _precision_details(self) -> dict[str, Any]:
        """Precision run and requested, with ``precision_fallback`` only when bf16 fell back."""
        out: dict[str, Any] = {
            "precision": self.precision,
            "precision_requested": self.precision_choice.requested,
        }
        if self.cpu_isa is not None:
            out["cpu_isa"] = self.cpu_isa
        if self.precision_choice.fallback:
            out["precision_fallback"] = self.precision_choice.fallback
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            **self._precision_details(),
            "image_size": self.image_size,
            "fit": self.fit,
            "feature_layers": list(self.encoder.feature_layers),
            "prompt_checkpoint": self.prompt_tag,
            "prompt_digest": self.checkpoint_digest,
        }


# ----------------------------------------------------------------------------- building
def load_backbone(
    clip: str | Path | None,
    *,
    backbone: str = DEFAULT_BACKBONE,
    device: str = "cpu",
    seed: int = 0,
    weights_dir: Path | None = None,
) -> ClipBackbone:
    """The CLIP model of ``backbone``: file, official ``openai`` tag (``None``) or ``RANDOM_INIT``.

    Random init is seeded (``seed``) so that two random-init builds are identical:
    cache keys (which contain ``random-init``) then stay truthful.
    """
    try:
        arch = ARCHS[backbone]
    except KeyError:
        raise ValueError(f"unknown AnomalyCLIP backbone {backbone!r}; known: {', '.join(ARCHS)}") from None
    if clip is not None and str(clip) == RANDOM_INIT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bb = create_clip(arch.clip_model, RANDOM_INIT, pretrained_tag=None, device=device)
    elif clip is None:
        bb = create_clip(arch.clip_model, None, pretrained_tag="openai", device=device)
    else:
        path = Path(clip).expanduser()
        if not path.is_file():
            raise _missing_file_error("CLIP weights file", path, CLIP_WEIGHTS_NAME, weights_dir)
        bb = create_clip(arch.clip_model, path, pretrained_tag=None, device=device)
    return dataclasses.replace(bb, model_name=backbone)


def load_prompts(
    prompts: str | Path,
    backbone: ClipBackbone,
    arch: AnomalyClipArch,
    *,
    name: str = PROMPT_WEIGHTS_NAMES[DEFAULT_PROMPTS],
    weights_dir: Path | None = None,
    seed: int = 0,
) -> tuple[PromptLearner, str, bool]:
    """``(learner, tag, random)`` from a released-format file or ``RANDOM_INIT`` (seeded)."""
    clip: Any = backbone.model
    if str(prompts) == RANDOM_INIT:
        tokenizer = open_clip.get_tokenizer(arch.clip_model)
        learner = PromptLearner.initialise(
            clip,
            tokenizer,
            n_ctx=arch.n_ctx,
            deep_prompt_depth=arch.deep_prompt_depth,
            deep_prompt_len=arch.deep_prompt_len,
            generator=torch.Generator().manual_seed(seed),
        )
        return learner, RANDOM_INIT, True
    path = Path(prompts).expanduser()
    if not path.is_file():
        raise _missing_file_error("prompt checkpoint", path, name, weights_dir)
    learner = load_prompt_learner(
        path,
        ctx_dim=int(clip.token_embedding.weight.shape[1]),
        context_length=int(clip.positional_embedding.shape[0]),
        arch=arch,
    )
    return learner, f"{path.parent.name}/{path.name}", False


def build_anomalyclip(
    *,
    weights: Any = None,
    device: str = "cpu",
    backbone: str = DEFAULT_BACKBONE,
    prompt_checkpoint: str = DEFAULT_PROMPTS,
    cache: ArrayCache | None = None,
    precision: str = "fp32",
    image_size: int | None = None,
    feature_layers: Sequence[int] | None = None,
    fit: str = "squash",
    seed: int = 0,
    **_: Any,
) -> AnomalyClipDetector:
    """Build an AnomalyCLIP detector.

    Args:
        weights: :class:`AnomalyClipWeights` or ``{"clip": ..., "prompts": ...}``; a weights
            directory; a prompt checkpoint file (CLIP then from open_clip's ``openai`` tag);
            ``RANDOM_INIT`` (both random: tests/demo only); ``None`` raises a
            :class:`WeightsError` saying how to fetch the files.
        backbone: ``ViT-L-14-336`` (reference) or ``tiny-vitl-test`` (tests).
        prompt_checkpoint: ``visa`` (default) or ``mvtec``: which manifest entry.
        image_size: processing size (default 518 for ViT-L).
        feature_layers: blocks giving the patch maps (default 24 only, as the official
            code since 2025-04-13; ``(6, 12, 18, 24)`` = the four-layer mean).
        fit: ``squash`` (reference, default) or ``pad`` (keep the aspect ratio).
        seed: seed of random-init weights.
        **_: other options are accepted and ignored.
    """
    arch = ARCHS.get(backbone)
    if arch is None:
        raise ValueError(f"unknown AnomalyCLIP backbone {backbone!r}; known: {', '.join(ARCHS)}")
    w = _resolve_weights(weights, prompt_checkpoint)
    if w.prompts is not None and str(w.prompts) != RANDOM_INIT:
        p = Path(w.prompts).expanduser()
        if not p.is_file():  # fail before spending time on the CLIP model
            raise _missing_file_error("prompt checkpoint", p, w.prompts_name, w.weights_dir)
    bb = load_backbone(w.clip, backbone=backbone, device=device, seed=seed, weights_dir=w.weights_dir)
    learner, tag, random_prompts = load_prompts(
        w.prompts, bb, arch, name=w.prompts_name, weights_dir=w.weights_dir, seed=seed
    )
    return AnomalyClipDetector(
        backbone=bb,
        prompt_learner=learner,
        prompt_tag=tag,
        arch=arch,
        device=device,
        image_size=image_size,
        feature_layers=feature_layers,
        cache=cache,
        precision=precision,
        prompts_random=random_prompts,
        fit=fit,
    )
