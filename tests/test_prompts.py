"""Prompts as data: built-in product files, validation errors, the WinCLIP ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prompts import (
    MAX_EXTRA_STATES,
    MAX_OBJECT_NAME_CHARS,
    MAX_STATE_CHARS,
    PromptFileError,
    builtin_products,
    ensemble_for,
    load_product_file,
    parse_product,
    winclip_ensemble,
)

MVTEC = {
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
}  # fmt: skip
VISA = {
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
}  # fmt: skip


def test_all_mvtec_and_visa_categories_are_built_in() -> None:
    products = builtin_products()
    assert set(products) >= MVTEC | VISA
    assert {products[p].dataset for p in MVTEC} == {"mvtec_ad"}
    assert {products[p].dataset for p in VISA} == {"visa"}
    assert products["metal_nut"].object_name == "metal nut"  # no underscores in prompts


def test_ensemble_is_every_state_in_every_template() -> None:
    ens = winclip_ensemble()
    normal, anomalous = ens.build("bottle")
    assert len(normal) == len(ens.normal_states) * len(ens.templates)
    assert len(anomalous) == len(ens.anomalous_states) * len(ens.templates)
    assert "a photo of a flawless bottle for visual inspection." in normal
    assert "a cropped photo of the damaged bottle." in anomalous
    assert ens.build(None)[0][0] == "a cropped photo of the object."


def test_extra_states_extend_the_ensemble_and_change_the_digest() -> None:
    base = builtin_products()["bottle"]
    extra = base.model_copy(update={"extra_anomalous_states": ("cracked {}",)})
    n0, a0 = ensemble_for(base).build("bottle")
    n1, a1 = ensemble_for(extra).build("bottle")
    assert n0 == n1 and len(a1) == len(a0) + len(winclip_ensemble().templates)
    assert ensemble_for(extra).digest("bottle") != ensemble_for(base).digest("bottle")
    assert ensemble_for(base).digest("bottle") != ensemble_for(base).digest("cable")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"id": "x", "object_name": "part", "threshold": 1.5}, "threshold"),
        ({"id": "x", "object_name": "part", "extra_anomalous_states": ["cracked"]}, "placeholder"),
        ({"id": "x", "object_name": "part", "default_method": "magic"}, "default_method"),
        ({"id": "Bad Id", "object_name": "part"}, "id"),
        ({"id": "x"}, "object_name"),
        ({"id": "x", "object_name": "part", "colour": "red"}, "colour"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_invalid_product_is_a_clear_error(doc, message) -> None:
    with pytest.raises(PromptFileError, match=message):
        parse_product(doc, "test.json")


def test_product_file_errors_name_the_file(tmp_path: Path) -> None:
    bad_json = tmp_path / "a.json"
    bad_json.write_text("{not json")
    with pytest.raises(PromptFileError, match=r"a\.json: not valid JSON"):
        load_product_file(bad_json)
    mismatch = tmp_path / "b.json"
    mismatch.write_text(json.dumps({"id": "c", "object_name": "part"}))
    with pytest.raises(PromptFileError, match="does not match the file name"):
        load_product_file(mismatch)
    with pytest.raises(PromptFileError, match="not found"):
        load_product_file(tmp_path / "missing.json")


def _states(n: int, length: int = 10) -> list[str]:
    """``n`` distinct states of exactly ``length`` characters: digits, then the placeholder."""
    return [f"{i:0{length - 2}d}{{}}" for i in range(n)]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("extra_anomalous_states", _states(MAX_EXTRA_STATES + 1), "extra_anomalous_states"),
        ("extra_normal_states", _states(5000), "extra_normal_states"),
        ("extra_anomalous_states", ["{} " + "x" * MAX_STATE_CHARS], "extra_anomalous_states"),
        ("object_name", "x" * (MAX_OBJECT_NAME_CHARS + 1), "object_name"),
        ("dataset", "d" * 200, "dataset"),
        (
            "saa",
            {"defect_prompts": [{"prompt": f"hole {i}", "filter": "part"} for i in range(17)]},
            "defect_prompts",
        ),
    ],
)
def test_prompt_fields_are_bounded(field, value, message) -> None:
    """Issue 10, item 4: counts and lengths of prompt fields are bounded (their encoding costs time)."""
    with pytest.raises(PromptFileError, match=message):
        parse_product({"id": "x", "object_name": "part", field: value}, "test.json")


def test_prompt_fields_at_their_bounds_are_accepted() -> None:
    recipe = parse_product(
        {
            "id": "x",
            "object_name": "p" * MAX_OBJECT_NAME_CHARS,
            "extra_normal_states": _states(MAX_EXTRA_STATES, MAX_STATE_CHARS),
            "extra_anomalous_states": _states(MAX_EXTRA_STATES, MAX_STATE_CHARS),
            "saa": {"defect_prompts": [{"prompt": "hole", "filter": "part"}] * 16},
        }
    )
    assert len(recipe.extra_anomalous_states) == MAX_EXTRA_STATES
    assert max(len(s) for s in recipe.extra_normal_states) == MAX_STATE_CHARS
    # every built-in product is within the bounds (they are far below them)
    assert all(len(p.extra_anomalous_states) <= MAX_EXTRA_STATES for p in builtin_products().values())
