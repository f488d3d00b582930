"""Parity of the WinCLIP package with an independent reference on the REAL architecture.

Random-init ViT-B-16-plus-240 with a fixed seed (no weights are downloaded):
the batched detector must match the naive per-window reference of
tests/models/winclip_reference.py, zero-shot and few-shot (score and map <= 1e-5).

Cost: the reference's work is done ONCE per module (``reference`` fixture): its
text prototypes (the full 77-token text encoder over all 231 prompts) and its
per-window loop over the query and the two normal images together (one batch of
3: each window still runs alone, for all images at once). Both tests use the same
query image; the detector goes through its public API in each test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from tests.models import winclip_reference as ref

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def det():
    torch.manual_seed(2023)
    return models.load_detector("winclip", weights=models.RANDOM_INIT)  # real ViT-B-16-plus-240 shapes


def _img(seed: int, shape=(180, 260)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (*shape, 3), dtype=np.uint8)
    base[40:70, 90:140] = 255  # a bright blob so windows differ
    return base


QUERY = _img(1)
NORMALS = [_img(3), _img(4)]


@pytest.fixture(scope="module")
def reference(det):
    """The naive reference's text prototypes and encodings of [QUERY, *NORMALS], computed once."""
    protos = ref.text_prototypes(det.clip, det.model_name, "bottle")
    encoded = ref.encode(det.clip, ref.pixels([QUERY, *NORMALS], ref.image_size(det.clip)))
    return protos, encoded


def test_architecture_is_the_reference_one(det) -> None:
    v = det.clip.visual
    assert det.model_name == "ViT-B-16-plus-240"
    assert (
        tuple(v.grid_size) == (15, 15) and v.conv1.out_channels == 896 and len(v.transformer.resblocks) == 12
    )
    assert det.clip.visual.proj.shape == (896, 640)
    assert det.encoder.masks[2].shape == (196, 4) and det.encoder.masks[3].shape == (169, 9)


def test_zero_shot_matches_reference(det, reference) -> None:
    res = det.predict(QUERY, object_name="bottle")
    protos, encoded = reference
    r_score, r_map = ref.predict_encoded(protos, encoded, 0, QUERY.shape[:2], det.encoder.grid_size[0])
    assert abs(res.score - r_score) <= 1e-5
    assert res.anomaly_map.shape == r_map.shape
    assert np.abs(res.anomaly_map - r_map).max() <= 1e-5


def test_few_shot_matches_reference(det, reference) -> None:
    refs = det.encode_references(NORMALS, object_name="bottle")
    res = det.predict(QUERY, object_name="bottle", references=refs)
    protos, encoded = reference
    r_score, r_map = ref.predict_encoded(
        protos, encoded, 0, QUERY.shape[:2], det.encoder.grid_size[0], memory=[1, 2]
    )
    assert abs(res.score - r_score) <= 1e-5
    assert np.abs(res.anomaly_map - r_map).max() <= 1e-5
    # the few-shot term really moved the result (the memory is not a no-op)
    _, zero_map = ref.predict_encoded(protos, encoded, 0, QUERY.shape[:2], det.encoder.grid_size[0])
    assert np.abs(r_map - zero_map).max() > 1e-3
