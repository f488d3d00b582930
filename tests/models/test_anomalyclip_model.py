"""AnomalyCLIP maths: DPAM, positional interpolation, deep-prompt text encoder, scoring, losses."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.anomalyclip.losses import dice_loss, focal_loss
from models.anomalyclip.torch_model import (
    DpamVisualEncoder,
    PromptLearner,
    anomaly_maps,
    class_probabilities,
    encode_text_deep_prompts,
    gaussian_blur,
    interpolate_pos_embedding,
)
from tests.models._anomalyclip_helpers import (
    TINY_ARCH,
    one_thread,
    ref_gaussian_blur,
    ref_text,
    ref_visual,
    released_state,
    tiny_backbone,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def _pixels(seed: int, b: int, size: int) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- DPAM
def test_dpam_equals_per_head_loop_and_blocks_1_to_5_are_plain() -> None:
    # given the tiny random model (7 blocks: 1..5 plain, 6..7 dual path) at a non-native size
    clip = tiny_backbone().model
    pixels = _pixels(0, 2, 70)  # 5x5 grid; the model's native grid is 4x4
    enc = DpamVisualEncoder(visual=clip.visual, feature_layers=(3, 5, 6, 7), dpam_start=6)
    # when encoded by the implementation and by a per-head loop written from the pseudo-code
    with torch.no_grad():
        feats = enc(pixels)
        ref_global, ref_patches, plain = ref_visual(clip.visual, pixels, (3, 5, 6, 7))
    # then global and every layer's patch embeddings agree
    assert feats.grid_size == (5, 5)
    assert torch.allclose(feats.global_embedding, ref_global, atol=1e-5, rtol=0)
    for got, want in zip(feats.patch_embeddings, ref_patches, strict=True):
        assert got.shape == (2, 25, 32)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # and blocks 1..5 are plain CLIP blocks: open_clip's own modules give the same tokens
    with torch.no_grad():
        x, _ = enc.embed(pixels[:1])
        for i in range(5):
            x = clip.visual.transformer.resblocks[i](x)
            assert torch.allclose(x[0], plain[i], atol=1e-5, rtol=0)


def test_vv_path_differs_from_plain_attention() -> None:
    # the V-V patch tokens of layer 7 are not the plain CLIP tokens of layer 7
    clip = tiny_backbone().model
    pixels = _pixels(1, 1, 56)
    enc = DpamVisualEncoder(visual=clip.visual, feature_layers=(7,), dpam_start=6)
    plain_enc = DpamVisualEncoder(visual=clip.visual, feature_layers=(7,), dpam_start=7)
    with torch.no_grad():
        dpam = enc(pixels).patch_embeddings[0]
        plain = plain_enc(pixels).patch_embeddings[0]  # dpam_start=7: only block 7 dual
    assert not torch.allclose(dpam, plain, atol=1e-3)


def test_model_is_not_mutated_and_two_resolutions_work() -> None:
    # given the tiny model's state and its plain CLIP output
    clip = tiny_backbone().model
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    native = _pixels(2, 1, 56)
    with torch.no_grad():
        plain_before = clip.encode_image(native)
        enc = DpamVisualEncoder(visual=clip.visual, feature_layers=(6, 7))
        # when running DPAM at two different sizes in the same process
        a = enc(_pixels(3, 1, 84))
        b = enc(_pixels(3, 1, 70))
        plain_after = clip.encode_image(native)
    # then both work, nothing in the model changed and plain CLIP is unaffected
    assert a.grid_size == (6, 6) and b.grid_size == (5, 5)
    assert a.patch_embeddings[0].shape[1] == 36 and b.patch_embeddings[0].shape[1] == 25
    after = clip.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(plain_before, plain_after)


def _ref_bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """align_corners=False bilinear resize of ``[h, w, C]`` written from the coordinate formula."""
    h, w, _ = grid.shape
    out = np.zeros((out_h, out_w, grid.shape[2]))
    for i in range(out_h):
        sy = min(max((i + 0.5) * h / out_h - 0.5, 0.0), h - 1)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = min(max((j + 0.5) * w / out_w - 0.5, 0.0), w - 1)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
            bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_positional_embedding_interpolation_matches_bilinear_formula() -> None:
    # 24x24 -> 37x37 is the reference's case; use a small 4x4 -> 7x7 grid with 3 channels
    pos = torch.randn(1 + 16, 3, generator=torch.Generator().manual_seed(4))
    got = interpolate_pos_embedding(pos, (7, 7))
    want = _ref_bilinear(pos[1:].reshape(4, 4, 3).numpy().astype(np.float64), 7, 7).reshape(49, 3)
    assert got.shape == (50, 3)
    assert torch.equal(got[0], pos[0])  # class token kept
    np.testing.assert_allclose(got[1:].numpy(), want, atol=1e-6)
    assert interpolate_pos_embedding(pos, (4, 4)) is pos  # native size: untouched


# ----------------------------------------------------------------------------- text side
def test_deep_prompt_text_encoder_matches_full_length_reference() -> None:
    # given a released-format learner in the tiny text width
    clip = tiny_backbone().model
    learner = PromptLearner.from_state_dict(released_state(48, seed=5), ctx_dim=48)
    prompts, tokens, deep = learner()
    assert prompts.shape == (2, 77, 48) and tokens.shape == (2, 77) and len(deep) == 8
    with torch.no_grad():
        # when encoded trimmed (implementation) and full length one by one (reference)
        got = encode_text_deep_prompts(clip, prompts, tokens, deep)
        want = ref_text(clip, prompts, tokens, deep)
        untrimmed = encode_text_deep_prompts(clip, prompts, tokens, deep, trim=False)
    # then they agree; trimming after EOT is exact
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got, untrimmed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [0, 7])
def test_each_deep_prompt_changes_the_text_embedding(layer: int) -> None:
    # deep prompts 0 and 7 feed text layers 2 and 9: changing one changes the output
    clip = tiny_backbone().model
    learner = PromptLearner.from_state_dict(released_state(48, seed=6), ctx_dim=48)
    prompts, tokens, deep = learner()
    with torch.no_grad():
        base = encode_text_deep_prompts(clip, prompts, tokens, deep)
        changed = list(deep)
        changed[layer] = deep[layer] + 0.5
        other = encode_text_deep_prompts(clip, prompts, tokens, changed)
    assert not torch.allclose(base, other, atol=1e-4)


def test_prompt_learner_initialise_builds_the_reference_templates() -> None:
    clip = tiny_backbone().model
    import open_clip

    tok = open_clip.get_tokenizer(TINY_ARCH.clip_model)
    learner = PromptLearner.initialise(clip, tok, generator=torch.Generator().manual_seed(0))
    ids = tok(["X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object."])
    assert torch.equal(learner.tokenized_prompts_pos[0, 0].long(), ids[0])
    assert torch.equal(learner.tokenized_prompts_neg[0, 0].long(), ids[1])
    with torch.no_grad():
        emb = clip.token_embedding(ids)
    assert torch.allclose(learner.token_prefix_pos[0, 0], emb[0, :1])
    assert torch.allclose(learner.token_suffix_neg[0, 0], emb[1, 13:])
    assert 0.01 < float(learner.ctx_pos.detach().std()) < 0.03  # N(0, 0.02)


# ----------------------------------------------------------------------------- scoring
def test_class_probabilities_by_hand() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # normal, abnormal (unit norm)
    p = class_probabilities(f, t)
    # cosines: row 0 -> (1, 0.6), row 1 -> (0, 0.8)
    e0 = np.exp(np.array([1.0, 0.6]) / 0.07)
    e1 = np.exp(np.array([0.0, 0.8]) / 0.07)
    np.testing.assert_allclose(p.numpy(), np.stack([e0 / e0.sum(), e1 / e1.sum()]), rtol=1e-5)


@pytest.mark.parametrize(("h", "w", "sigma"), [(10, 12, 1.5), (20, 20, 4.0), (5, 7, 4.0)])
def test_gaussian_blur_matches_direct_convolution(h: int, w: int, sigma: float) -> None:
    img = np.random.default_rng(7).random((h, w)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(img)[None], sigma)[0].numpy()
    np.testing.assert_allclose(got, ref_gaussian_blur(img, sigma), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    layers=st.integers(1, 3),
    side=st.integers(2, 5),
    size=st.sampled_from([14, 28, 40]),
)
def test_anomaly_maps_in_unit_range_with_shape(seed: int, layers: int, side: int, size: int) -> None:
    g = torch.Generator().manual_seed(seed)
    patches = [torch.randn(2, side * side, 8, generator=g) * 5 for _ in range(layers)]
    text = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    maps = anomaly_maps(patches, text, (side, side), size, sigma=2.0)
    assert maps.shape == (2, size, size)
    assert float(maps.min()) >= -1e-6 and float(maps.max()) <= 1 + 1e-6


def test_anomaly_map_is_the_layer_mean_of_blurred_abnormal_probability() -> None:
    # (P_abn + 1 - P_norm) / 2 equals P_abn because the two probabilities sum to 1
    g = torch.Generator().manual_seed(8)
    patches = [torch.randn(1, 4, 6, generator=g) for _ in range(2)]
    text = torch.nn.functional.normalize(torch.randn(2, 6, generator=g), dim=-1)
    got = anomaly_maps(patches, text, (2, 2), 8, sigma=1.0)[0].numpy()
    per_layer = []
    for p in patches:
        cos = (torch.nn.functional.normalize(p[0], dim=-1) @ text.T).numpy().astype(np.float64)
        e = np.exp(cos / 0.07)
        abn = (e[:, 1] / e.sum(1)).reshape(1, 1, 2, 2)
        up = torch.nn.functional.interpolate(torch.from_numpy(abn), size=(8, 8), mode="bilinear")
        per_layer.append(up[0, 0].numpy())
    want = ref_gaussian_blur(np.mean(per_layer, axis=0), 1.0)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- losses
def test_focal_loss_by_formula() -> None:
    p1 = torch.tensor([[0.9, 0.2], [0.4, 0.5]])
    probs = torch.stack([1 - p1, p1])[None]  # [1, 2, 2, 2]
    gt = torch.tensor([[[1, 0], [0, 1]]])
    smooth = 1e-5
    want = []
    for (i, j), y in np.ndenumerate(gt[0].numpy()):
        pc = float(p1[i, j]) if y == 1 else 1 - float(p1[i, j])
        pt = pc * (1 - smooth) + (1 - pc) * smooth + smooth  # clamped one-hot
        want.append(-((1 - pt) ** 2) * np.log(pt))
    assert float(focal_loss(probs, gt)) == pytest.approx(np.mean(want), rel=1e-5)


def test_dice_loss_by_formula() -> None:
    pred = torch.tensor([[0.5, 1.0, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0]])
    gt = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    d0 = (2 * 1.5 + 1) / (1.75 + 2 + 1)
    d1 = (0 + 1) / (0 + 0 + 1)
    assert float(dice_loss(pred, gt)) == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)
