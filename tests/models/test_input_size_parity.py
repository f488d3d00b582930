"""Fidelity at any input size: each method's pre-processing equals its reference's.

Line cameras send 640x480, 2448x2048 ... not the models' square sizes. Here the
detectors, given a 4:3 image and an odd one (333x517), must equal independent
computations that pre-process as the references do, written with the references'
own building blocks (torchvision transforms on PIL images, OpenCV), never with the
project's pre-processing:

- AnomalyCLIP (zqhang/AnomalyCLIP ``utils.get_transform``): torchvision ``Resize((S, S),
  BICUBIC)`` on the PIL image, ``CenterCrop``, ``ToTensor``, ``Normalize``; the model side
  by the per-head loops of ``_anomalyclip_helpers``.
- WinCLIP / WinCLIP+ (anomalib 2.7): ``read_image(as_tensor=True)`` =
  ``to_dtype(to_image(pil), float32, scale=True)``, then ``WinClip.configure_pre_processor``
  = v2 ``Resize((S, S), BICUBIC, antialias=True)`` + ``Normalize`` on the float image; the
  model side by the naive per-window reference of ``winclip_reference``.
- SAA+: GroundingDINO's ``RandomResize([800], max_size=1333)`` + ``ToTensor`` + ``Normalize``;
  the saliency network's input by ``cv2.resize`` (uint8) and ``ModelINet.preprocess``.

Tiny random-init configurations: the pre-processing and the pipeline are checked as
exactly as on the real sizes, in seconds. Tolerance: score and map <= 1e-5.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import torchvision.transforms.v2 as T2
from PIL import Image
from torchvision.transforms.v2.functional import to_dtype, to_image

import models
from models.anomalyclip.detector import AnomalyClipDetector, load_prompts
from models.base import RANDOM_INIT
from tests.models import winclip_reference
from tests.models._anomalyclip_helpers import (
    TINY_ARCH,
    one_thread,
    ref_gaussian_blur,
    ref_text,
    ref_visual,
    tiny_backbone,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOL = 1e-5
#: (height, width): a 4:3 line-camera frame and an odd portrait size
SIZES = [(480, 640), (517, 333)]
SIZE_IDS = ["640x480", "333x517"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def camera_image(seed: int, height: int, width: int) -> np.ndarray:
    """``HWC uint8 RGB``: smooth shading, noise and a bright rectangle (edges resize differently)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 90 + 60 * np.sin(xx / 23.0)[..., None] + 40 * np.cos(yy / 17.0)[..., None]
    img = base + rng.normal(0, 25, (height, width, 3))
    img[height // 3 : height // 2, width // 4 : width // 2] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


def bilinear_to(m: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The project's documented map resize: bilinear, antialiased only when shrinking."""
    shrink = height < m.shape[0] or width < m.shape[1]
    up = F.interpolate(m[None, None].float(), size=(height, width), mode="bilinear", antialias=shrink)
    return up[0, 0].clamp(0.0, 1.0).numpy()


# ----------------------------------------------------------------------------- AnomalyCLIP
def anomalyclip_reference_pixels(img: np.ndarray, size: int) -> torch.Tensor:
    """zqhang/AnomalyCLIP ``utils.get_transform`` (test and train), applied to a PIL image."""
    transform = T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, max_size=None, antialias=None),
            T.CenterCrop((size, size)),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    return transform(Image.fromarray(img))[None]  # [1, 3, S, S]


def resize_max_size_pixels(img: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """open_clip's ``ResizeMaxSize`` (the reference's ``resize_longest_max``): keep aspect, pad black.

    Returns the pixels and ``(top, left, height, width)`` of the image inside the frame.
    """
    pil = Image.fromarray(img)
    w, h = pil.size
    scale = size / float(max(h, w))
    nh, nw = (round(h * scale), round(w * scale))
    pil = TF.resize(pil, [nh, nw], T.InterpolationMode.BICUBIC)
    pad_h, pad_w = size - nh, size - nw
    pil = TF.pad(pil, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    x = TF.normalize(TF.to_tensor(pil), OPENAI_MEAN, OPENAI_STD)
    return x[None], (pad_h // 2, pad_w // 2, nh, nw)


@functools.lru_cache(maxsize=1)
def anomalyclip_text() -> torch.Tensor:
    """``[2, E]`` normalised text embeddings of the seed-0 random prompts, by the full-length loop."""
    learner, _, _ = load_prompts(RANDOM_INIT, tiny_backbone(), TINY_ARCH, seed=0)
    prompts, tokens, deep = learner()
    with torch.no_grad():
        t = ref_text(tiny_backbone().model, prompts, tokens, deep)
    return F.normalize(t, dim=-1)


def anomalyclip_reference(
    img: np.ndarray,
    layers: tuple[int, ...],
    pixels: Callable[[np.ndarray, int], torch.Tensor] = anomalyclip_reference_pixels,
) -> tuple[float, np.ndarray]:
    """Official ``test.py`` on one image: score, and the map summed over ``layers`` at S x S.

    The map at the image size is then made by the project's documented rule (crop of
    the image's part, bilinear resize); the reference stops at S x S.
    """
    size = TINY_ARCH.image_size
    x = pixels(img, size)
    with torch.no_grad():
        glob, patches, _ = ref_visual(tiny_backbone().model.visual, x, layers)
    text = anomalyclip_text().double()
    g = F.normalize(glob[0].double(), dim=-1)
    score = float(torch.softmax(g @ text.T / 0.07, dim=-1)[1])
    side = size // 14
    maps = []
    for p in patches:
        probs = torch.softmax(F.normalize(p[0].double(), dim=-1) @ text.T / 0.07, dim=-1)  # [L, 2]
        grid = probs.T.reshape(1, 2, side, side).float()
        up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0]
        maps.append(((up[1] + 1 - up[0]) / 2).double().numpy())
    return score, ref_gaussian_blur(np.sum(maps, axis=0), 4.0)


def tiny_anomalyclip(**kwargs: object) -> AnomalyClipDetector:
    learner, tag, rnd = load_prompts(RANDOM_INIT, tiny_backbone(), TINY_ARCH, seed=0)
    return AnomalyClipDetector(
        backbone=tiny_backbone(),
        prompt_learner=learner,
        prompt_tag=tag,
        arch=TINY_ARCH,
        prompts_random=rnd,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("height", "width"), SIZES, ids=SIZE_IDS)
def test_anomalyclip_equals_the_official_pipeline_at_camera_sizes(height: int, width: int) -> None:
    # given a non-square camera frame and the default detector (top layer only)
    img = camera_image(1, height, width)
    det = tiny_anomalyclip()
    assert det.encoder.feature_layers == (7,) and det.fit == "squash"
    # when scored by the detector and by the official pipeline (PIL resize of the uint8 image)
    res = det.predict(img)
    score, full = anomalyclip_reference(img, (7,))
    # then score and map agree
    assert abs(res.score - score) <= TOL
    assert res.anomaly_map.shape == (height, width)
    assert float(np.abs(res.anomaly_map - bilinear_to(torch.from_numpy(full), height, width)).max()) <= TOL


def test_anomalyclip_float_resize_is_not_the_official_one() -> None:
    # the check above has teeth: the old pre-processing (float bicubic, no uint8 rounding)
    # differs from the official pixels by far more than the tolerance
    img = camera_image(2, 480, 640)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    t = F.interpolate(t, size=(70, 70), mode="bicubic", antialias=True)
    t = TF.normalize(t, OPENAI_MEAN, OPENAI_STD)
    assert float((t - anomalyclip_reference_pixels(img, 70)).abs().max()) > 1e-3


def test_anomalyclip_default_is_the_top_layer_only() -> None:
    # given the default and the explicit top-layer detector on the ViT-L and tiny configurations
    from models.anomalyclip.detector import ARCHS, DEFAULT_BACKBONE

    assert ARCHS[DEFAULT_BACKBONE].feature_layers == (24,)
    assert ARCHS[DEFAULT_BACKBONE].multi_feature_layers == (6, 12, 18, 24)
    img = camera_image(3, 480, 640)
    a = tiny_anomalyclip().predict(img)
    b = tiny_anomalyclip(feature_layers=(7,)).predict(img)
    c = tiny_anomalyclip(feature_layers=(6, 7)).predict(img)
    # then the default is layer 7 (the top) alone, and differs from the two-layer mean
    assert a.details["feature_layers"] == [7]
    assert np.array_equal(a.anomaly_map, b.anomaly_map)
    assert float(np.abs(a.anomaly_map - c.anomaly_map).max()) > 1e-3


def test_anomalyclip_multi_layer_option_equals_its_reference() -> None:
    # the 2024 setting (--features_list 6 12 18 24; here the tiny model's 6, 7): the official
    # test.py SUMS the layer maps, the detector takes their mean (same ranking, stays in [0, 1])
    img = camera_image(4, 480, 640)
    layers = TINY_ARCH.multi_feature_layers
    res = tiny_anomalyclip(feature_layers=layers).predict(img)
    score, summed = anomalyclip_reference(img, layers)
    assert res.details["feature_layers"] == list(layers)
    assert abs(res.score - score) <= TOL
    want = bilinear_to(torch.from_numpy(summed / len(layers)), 480, 640)
    assert float(np.abs(res.anomaly_map - want).max()) <= TOL


@pytest.mark.parametrize(
    ("height", "width"), [(480, 640), (517, 333), (70, 33)], ids=["640x480", "333x517", "33x70"]
)
def test_anomalyclip_pad_option_equals_resize_max_size(height: int, width: int) -> None:
    # given the aspect-keeping option (the reference's own ResizeMaxSize transform)
    img = camera_image(5, height, width)
    res = tiny_anomalyclip(fit="pad").predict(img)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    def pixels(im: np.ndarray, size: int) -> torch.Tensor:
        nonlocal box
        x, box = resize_max_size_pixels(im, size)
        return x

    score, full = anomalyclip_reference(img, (7,), pixels)
    top, left, h, w = box
    # then the score equals, and the map is the image's part of the frame, resized to the image
    assert abs(res.score - score) <= TOL
    want = bilinear_to(torch.from_numpy(full[top : top + h, left : left + w].copy()), height, width)
    assert res.anomaly_map.shape == (height, width)
    assert float(np.abs(res.anomaly_map - want).max()) <= TOL
    assert res.details["fit"] == "pad"


def test_anomalyclip_batch_of_mixed_sizes_is_each_image_alone() -> None:
    # given one batch with a 4:3 frame, an odd size and a square one
    det = tiny_anomalyclip()
    imgs = [camera_image(6, 480, 640), camera_image(7, 517, 333), camera_image(8, 70, 70)]
    batch = det.predict_batch(imgs)
    for img, got in zip(imgs, batch, strict=True):
        alone = det.predict(img)
        score, full = anomalyclip_reference(img, (7,))
        # then each result equals the image scored alone, and the official pipeline
        assert abs(got.score - alone.score) <= 1e-6
        assert float(np.abs(got.anomaly_map - alone.anomaly_map).max()) <= 1e-6
        assert abs(got.score - score) <= TOL
        want = bilinear_to(torch.from_numpy(full), *img.shape[:2])
        assert float(np.abs(got.anomaly_map - want).max()) <= TOL


# ----------------------------------------------------------------------------- AnomalyCLIP training
def test_training_items_equal_the_official_transforms(tmp_path) -> None:
    # given a 4:3 anomalous image and its mask on disk
    from models.anomalyclip.data import AnomalyDataset, Sample

    img = camera_image(9, 480, 640)
    mask = np.zeros((480, 640), dtype=np.uint8)
    mask[100:233, 301:452] = 1
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")
    item = AnomalyDataset([Sample(tmp_path / "img.png", tmp_path / "mask.png", 1, "x")], 70)[0]
    # when made by the official get_transform / target_transform (train.py: gt > 0.5)
    target = T.Compose([T.Resize((70, 70)), T.CenterCrop(70), T.ToTensor()])
    raw = np.array(Image.open(tmp_path / "mask.png").convert("L")) > 0
    gt = target(Image.fromarray(raw.astype(np.uint8) * 255))[0]  # mode L
    gt = (gt > 0.5).float()
    # then pixels and mask are equal
    assert torch.equal(item["pixels"], anomalyclip_reference_pixels(img, 70)[0])
    assert torch.equal(item["mask"], gt) and 0 < int(gt.sum()) < 70 * 70
    assert int(item["label"]) == 1


def test_training_defaults_are_the_top_layer_and_lam_4() -> None:
    # the official train.sh (--features_list 24) and train.py (lam = 4 on the pixel losses)
    from models.anomalyclip.detector import ARCHS, DEFAULT_BACKBONE
    from models.anomalyclip.losses import dice_loss, focal_loss
    from models.anomalyclip.torch_model import DpamVisualEncoder
    from models.anomalyclip.train import TrainConfig, training_loss

    assert TrainConfig().feature_layers == ARCHS[DEFAULT_BACKBONE].feature_layers == (24,)
    # given the tiny model at its default (top) layer, two images and masks
    clip = tiny_backbone().model
    learner, _, _ = load_prompts(RANDOM_INIT, tiny_backbone(), TINY_ARCH, seed=0)
    enc = DpamVisualEncoder(visual=clip.visual, feature_layers=TINY_ARCH.feature_layers)
    imgs = [camera_image(10, 480, 640), camera_image(11, 517, 333)]
    pixels = torch.cat([anomalyclip_reference_pixels(im, 70) for im in imgs])
    masks = torch.zeros(2, 70, 70)
    masks[0, 10:30, 20:50] = 1
    labels = torch.tensor([1, 0])
    # when the loss is computed by the training code and as train.py writes it
    with torch.no_grad():
        total, parts = training_loss(clip, learner, enc, pixels, masks, labels)
        glob, patches, _ = ref_visual(clip.visual, pixels, TINY_ARCH.feature_layers)
    text = anomalyclip_text()
    logits = F.normalize(glob, dim=-1) @ text.T / 0.07
    image_loss = F.cross_entropy(logits, labels)
    (p,) = patches
    probs = torch.softmax(F.normalize(p, dim=-1) @ text.T / 0.07, dim=-1)  # [B, 25, 2]
    sim = F.interpolate(probs.transpose(1, 2).reshape(2, 2, 5, 5), size=(70, 70), mode="bilinear")
    pixel = focal_loss(sim, masks) + dice_loss(sim[:, 1], masks) + dice_loss(sim[:, 0], 1 - masks)
    # then total = CE + 4 * (focal + dice + dice) of the one layer
    assert float(total) == pytest.approx(float(image_loss + 4 * pixel), abs=1e-5)
    assert parts["pixel"] == pytest.approx(float(pixel), abs=1e-5)


# ----------------------------------------------------------------------------- WinCLIP
def anomalib_pixels(images: list[np.ndarray], size: int) -> torch.Tensor:
    """anomalib 2.7: ``read_image(as_tensor=True)`` then the WinClip pre-processor, per image."""
    transform = T2.Compose(
        [
            T2.Resize((size, size), antialias=True, interpolation=T2.InterpolationMode.BICUBIC),
            T2.Normalize(mean=OPENAI_MEAN, std=OPENAI_STD),
        ]
    )
    out = []
    for img in images:
        x = to_dtype(to_image(Image.fromarray(img).convert("RGB")), torch.float32, scale=True)  # [3, H, W]
        out.append(transform(x)[None])
    return torch.cat(out)


@pytest.fixture(scope="module")
def winclip() -> models.Detector:
    return models.load_tiny_detector("winclip")


@pytest.fixture
def winclip_ref(monkeypatch: pytest.MonkeyPatch):
    """The naive WinCLIP reference, fed anomalib's pre-processing."""
    monkeypatch.setattr(winclip_reference, "pixels", anomalib_pixels)
    return winclip_reference


@pytest.mark.parametrize(("height", "width"), SIZES, ids=SIZE_IDS)
def test_winclip_zero_shot_equals_anomalib_preprocessing(
    winclip, winclip_ref, height: int, width: int
) -> None:
    img = camera_image(11, height, width)
    res = winclip.predict(img, object_name="bottle")
    score, want = winclip_ref.predict(winclip.clip, winclip.model_name, img, "bottle")
    assert abs(res.score - score) <= TOL
    assert res.anomaly_map.shape == (height, width)
    assert float(np.abs(res.anomaly_map - want).max()) <= TOL


@pytest.mark.parametrize(("height", "width"), SIZES, ids=SIZE_IDS)
def test_winclip_plus_few_shot_equals_anomalib_preprocessing(
    winclip, winclip_ref, height: int, width: int
) -> None:
    # normal references of other sizes than the inspected image
    img = camera_image(12, height, width)
    normals = [camera_image(13, 480, 640), camera_image(14, 517, 333)]
    refs = winclip.encode_references(normals, object_name="bottle")
    res = winclip.predict(img, object_name="bottle", references=refs)
    score, want = winclip_ref.predict(winclip.clip, winclip.model_name, img, "bottle", references=normals)
    assert abs(res.score - score) <= TOL
    assert float(np.abs(res.anomaly_map - want).max()) <= TOL


def test_winclip_pixels_are_bit_equal_to_anomalib() -> None:
    # x * (1/255) (torchvision to_dtype) and x / 255 differ in the last bit for half the values
    from models.clip_backbone import preprocess

    for h, w in [*SIZES, (80, 80)]:
        img = camera_image(15, h, w)
        assert torch.equal(preprocess([img], 80), anomalib_pixels([img], 80))


def test_winclip_batch_of_mixed_sizes_is_each_image_alone(winclip, winclip_ref) -> None:
    imgs = [camera_image(16, 480, 640), camera_image(17, 517, 333), camera_image(18, 80, 80)]
    normals = [camera_image(19, 300, 400)]
    refs = winclip.encode_references(normals, object_name="bottle")
    for references in (None, refs):
        batch = winclip.predict_batch(imgs, object_name="bottle", references=references)
        for img, got in zip(imgs, batch, strict=True):
            alone = winclip.predict(img, object_name="bottle", references=references)
            assert abs(got.score - alone.score) <= 1e-6
            assert float(np.abs(got.anomaly_map - alone.anomaly_map).max()) <= 1e-6
            score, want = winclip_ref.predict(
                winclip.clip, winclip.model_name, img, "bottle", references=normals if references else None
            )
            assert abs(got.score - score) <= TOL
            assert float(np.abs(got.anomaly_map - want).max()) <= TOL


# ----------------------------------------------------------------------------- SAA+
@pytest.mark.parametrize(("height", "width"), [*SIZES, (800, 1400)], ids=[*SIZE_IDS, "1400x800"])
def test_saa_groundingdino_input_equals_the_reference_transform(height: int, width: int) -> None:
    dino_transforms = pytest.importorskip("groundingdino.datasets.transforms")
    from models.saa.groundingdino import dino_preprocess

    img = camera_image(21, height, width)
    transform = dino_transforms.Compose(
        [
            dino_transforms.RandomResize([800], max_size=1333),
            dino_transforms.ToTensor(),
            dino_transforms.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
        ]
    )
    want, _ = transform(Image.fromarray(img), None)
    got = dino_preprocess(img, 800, 1333)
    assert got.shape == (1, *want.shape)
    assert torch.equal(got[0], want)


@pytest.mark.parametrize(("height", "width", "size"), [(320, 320, 256), (480, 640, 128), (517, 333, 64)])
def test_saa_saliency_input_and_features_equal_the_reference(height: int, width: int, size: int) -> None:
    cv2 = pytest.importorskip("cv2")
    from models.saa.hybrid import self_similarity_saliency
    from models.saa.saliency import create_wrn, wrn_features

    torch.manual_seed(0)
    wrn = create_wrn(None, tiny=True)
    img = camera_image(22, height, width)
    # the reference: cv2.resize of the uint8 image, then ModelINet.preprocess and forward
    resized = cv2.resize(img, (size, size))
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    pixel_mean = torch.tensor([0.485 * 255, 0.456 * 255, 0.406 * 255]).view(-1, 1, 1)
    pixel_std = torch.tensor([0.229 * 255, 0.224 * 255, 0.225 * 255]).view(-1, 1, 1)
    x = (x - pixel_mean) / pixel_std
    with torch.no_grad():
        h = wrn.maxpool(wrn.relu(wrn.bn1(wrn.conv1(x))))
        f1 = wrn.layer1(h)
        f2 = wrn.layer2(f1)
        f3 = wrn.layer3(f2)
    feats = [f1, F.interpolate(f2, f1.shape[2:]), F.interpolate(f3, f1.shape[2:])]
    want = F.normalize(torch.cat(feats, dim=1), dim=1)[0]
    got = wrn_features(wrn, img, size)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    sal_got = self_similarity_saliency(got, 400)
    sal_want = self_similarity_saliency(want, 400)
    assert float((sal_got - sal_want).abs().max()) <= 1e-6
