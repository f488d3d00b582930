"""SAA+ hybrid prompts on hand-made boxes, masks and saliency maps; the saa prompt schema."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.saa import hybrid
from prompts import PromptFileError, builtin_products, parse_product
from prompts.saa import resolve_saa_prompts, validate_saa_section

# ------------------------------------------------------------------ language prompts


def test_filter_word_drops_boxes_that_name_the_object() -> None:
    assert hybrid.phrase_is_filtered("carpet", "carpet")
    assert hybrid.phrase_is_filtered("black carpet", "carpet")
    assert not hybrid.phrase_is_filtered("black hole", "carpet")
    assert not hybrid.phrase_is_filtered("anything", "")


def test_phrase_joins_tokens_above_text_threshold_and_glues_word_pieces() -> None:
    words = ["", "black", "ho", "##le", ".", "thread", ""]
    scores = np.array([0.9, 0.5, 0.3, 0.2, 0.05, 0.09, 0.9])
    assert hybrid.phrase_from_tokens(scores, words, 0.1) == "black hole"
    assert hybrid.phrase_from_tokens(scores, words, 0.25) == "black ho"


def test_general_prompts_use_spaces_not_underscores_and_filter_on_the_name() -> None:
    p = resolve_saa_prompts("metal_nut", None)
    assert p.defect_prompts == (
        ("defect on metal nut.", "metal nut"),
        ("damage on metal nut.", "metal nut"),
        ("flaw on metal nut.", "metal nut"),
    )
    assert p.object_caption == "metal nut."
    # a phrase the detector would decode for the object does match its filter word
    assert hybrid.phrase_is_filtered("metal nut", p.defect_prompts[0][1])


def test_product_prompts_follow_general_ones_and_digest_changes_with_content() -> None:
    carpet = builtin_products()["carpet"]
    p = resolve_saa_prompts(carpet.object_name, carpet.saa)
    assert [c for c, _ in p.defect_prompts] == [
        "defect on carpet.",
        "damage on carpet.",
        "flaw on carpet.",
        "black hole.",
        "thread.",
        "defect.",
    ]
    assert (p.max_anomalies, p.max_area_ratio, p.object_count) == (5, 0.9, 1)
    other = resolve_saa_prompts(carpet.object_name, {**(carpet.saa or {}), "max_anomalies": 4})
    assert other.digest() != p.digest()
    assert resolve_saa_prompts("carpet", carpet.saa).digest() == p.digest()


def test_defaults_without_product() -> None:
    p = resolve_saa_prompts(None, None)
    assert p.object_caption == "object."
    assert len(p.defect_prompts) == 3 and p.max_anomalies == 5 and p.object_count == 1


# ------------------------------------------------------------------ property prompts


def test_area_ratio_filter_keeps_only_boxes_below_r_times_object_area() -> None:
    # object box covers 0.5 of the image, r = 0.3 -> defects must be < 0.15 and > 0
    obj_area = hybrid.object_area(np.array([0.2, 0.5]))
    assert obj_area == 0.5
    boxes = np.array([[0.5, 0.5, 0.3, 0.3], [0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.0, 0.5], [0.5, 0.5, 0.2, 0.2]])
    areas = hybrid.box_areas(boxes)
    keep = hybrid.property_filter(
        np.array([0.5, 0.5, 0.5, 0.05]), areas, box_threshold=0.1, max_area=obj_area * 0.3
    )
    assert keep.tolist() == [True, False, False, False]  # too big, empty, low score


def test_no_object_found_means_whole_image() -> None:
    assert hybrid.object_area(np.array([])) == 1.0


def test_object_overlap_filter_measures_share_of_the_defect_inside_an_object() -> None:
    objects = np.array([[0, 0, 50, 50], [100, 100, 200, 200]], dtype=np.float32)
    defects = np.array(
        [
            [10, 10, 20, 20],  # inside object 0
            [40, 10, 60, 20],  # half inside object 0
            [60, 60, 90, 90],  # outside both
            [150, 150, 250, 160],  # half inside object 1
        ],
        dtype=np.float32,
    )
    share = hybrid.overlap_with_objects(defects, objects)
    np.testing.assert_allclose(share, [1.0, 0.5, 0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(hybrid.overlap_with_objects(defects, np.zeros((0, 4))), 1.0)


def test_cxcywh_to_pixels() -> None:
    xyxy = hybrid.cxcywh_to_xyxy(np.array([[0.5, 0.25, 0.2, 0.5]]), width=100, height=40)
    np.testing.assert_allclose(xyxy, [[40, 0, 60, 20]])


# ------------------------------------------------------------------ saliency prompt


def test_self_similarity_saliency_marks_the_odd_location() -> None:
    # 4x4 grid of identical unit features except one location pointing elsewhere
    f = torch.zeros(2, 4, 4)
    f[0] = 1.0
    f[:, 1, 2] = torch.tensor([0.0, 1.0])
    sal = hybrid.self_similarity_saliency(f, top_n=400)  # clamped to the 15 other locations
    # odd location: distance 0.5 to all 15 others; others: one distance 0.5 among 15
    assert sal[1, 2].item() == pytest.approx(0.5)
    assert sal[0, 0].item() == pytest.approx(0.5 / 15)
    # top_n = 1: every location's largest distance is 0.5
    assert torch.allclose(hybrid.self_similarity_saliency(f, top_n=1), torch.full((4, 4), 0.5))


def test_self_similarity_matches_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(8, 5, 6, generator=g), dim=0)
    got = hybrid.self_similarity_saliency(f, top_n=7)
    flat = f.reshape(8, -1)
    for i in range(30):
        d = sorted((0.5 * (1 - float(flat[:, i] @ flat[:, j])) for j in range(30) if j != i), reverse=True)
        assert got.flatten()[i].item() == pytest.approx(sum(d[:7]) / 7, abs=1e-5)


def test_multi_instance_saliency_compares_against_other_objects_only() -> None:
    f = torch.zeros(2, 1, 6)
    f[0] = 1.0
    f[:, 0, 4] = torch.tensor([0.0, 1.0])  # object B has one odd location
    masks = torch.zeros(2, 1, 6, dtype=torch.bool)
    masks[0, 0, :3] = True  # object A: 0..2 ; location 3 is background
    masks[1, 0, 4:] = True  # object B: 4, 5
    sal = hybrid.multi_instance_saliency(f, masks)
    # location 4's nearest neighbour on A is at cos 0 -> 0.5; everything else has a twin
    np.testing.assert_allclose(sal[0].numpy(), [0, 0, 0, 0, 0.5, 0], atol=1e-6)


def test_rescoring_multiplies_by_exp_of_three_times_mean_saliency() -> None:
    sal = np.zeros((4, 4))
    sal[:2, :2] = 0.2
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, :2, :2] = True  # mean 0.2
    masks[1, :2, :4] = True  # mean 0.1
    # masks[2] empty: score kept
    s, means = hybrid.rescore(np.array([0.5, 0.4, 0.3]), masks, sal)
    np.testing.assert_allclose(means, [0.2, 0.1, 0.0])
    np.testing.assert_allclose(s, [0.5 * math.exp(0.6), 0.4 * math.exp(0.3), 0.3])


# ------------------------------------------------------------------ confidence prompt


def test_top_k_keeps_highest_scores_first() -> None:
    assert hybrid.top_k(np.array([0.1, 0.9, 0.5, 0.9]), 3).tolist() == [1, 3, 2]
    assert hybrid.top_k(np.array([0.3]), 5).tolist() == [0]


def test_map_formula_one_mask_gives_half_the_score_and_overlaps_average() -> None:
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, :2] = True
    masks[1, 0, 1:] = True
    a = hybrid.anomaly_map(masks, np.array([0.8, 2.0]))
    assert a[0, 0] == pytest.approx(0.8 / 2)  # one mask: s'/2
    assert a[0, 1] == pytest.approx((0.8 + 2.0) / 3)  # two masks: sum / (1 + 2)
    assert a[0, 2] == pytest.approx(2.0 / 2)
    assert (a[1:] == 0).all()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=6),
    st.lists(st.floats(0, 1), min_size=1, max_size=6),
    st.integers(0, 2**31 - 1),
)
def test_unit_map_is_in_0_1_and_keeps_the_order(scores: list[float], sals: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = min(len(scores), len(sals))
    masks = rng.random((n, 5, 7)) > 0.5
    sal = rng.random((5, 7)) * max(sals)
    s, _ = hybrid.rescore(np.array(scores[:n]), masks, sal)
    assert (s <= hybrid.MAX_RESCORED + 1e-9).all()
    raw = hybrid.anomaly_map(masks, s)
    unit = hybrid.to_unit_interval(raw)
    assert unit.shape == (5, 7) and unit.dtype == np.float32
    assert (unit >= 0).all() and (unit < 1).all()
    flat_raw, flat_unit = raw.flatten(), unit.flatten().astype(np.float64)
    order = np.argsort(flat_raw, kind="stable")
    assert (np.diff(flat_unit[order]) >= -1e-7).all()


# ------------------------------------------------------------------ schema


def test_all_builtin_products_have_a_valid_saa_section() -> None:
    products = builtin_products()
    assert len(products) == 27
    for pid, recipe in products.items():
        assert recipe.saa is not None, pid
        p = resolve_saa_prompts(recipe.object_name, recipe.saa)
        assert len(p.defect_prompts) > 3, pid
    assert products["candle"].saa == {**products["candle"].saa, "object_count": 4, "max_anomalies": 1}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"max_anomalies": 0}, "max_anomalies"),
        ({"max_area_ratio": 1.5}, "max_area_ratio"),
        ({"object_count": "two"}, "object_count"),
        ({"defect_prompts": [{"prompt": "hole"}]}, "filter"),
        ({"defect_prompts": [{"prompt": " . ", "filter": "x"}]}, "prompt"),
        ({"surprise": 1}, "surprise"),
        ({"use_general_prompts": False}, "defect_prompts must not be empty"),
    ],
)
def test_invalid_saa_sections_are_refused_with_the_key(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_saa_section(section)
    with pytest.raises(PromptFileError, match="invalid saa section"):
        parse_product({"id": "x", "object_name": "x", "saa": section})
