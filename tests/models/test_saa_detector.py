"""SAA+ on tiny random-init GroundingDINO / SAM / WRN built by the real loading code.

The tiny BERT (text side of GroundingDINO) is saved to a temporary directory by the
test, with a vocabulary the test writes: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models import RANDOM_INIT, ReferenceMismatchError, ReferenceSet, WeightsError
from models.saa import SaaWeights, build_saa_plus
from models.saa import groundingdino as gd
from models.saa.detector import SaaPlusDetector
from models.saa.saliency import create_wrn, wrn_features
from models.saa.sam import SAM_CONFIGS, build_sam, create_sam, decode_boxes, embed_image
from prompts import get_builtin_product
from prompts.saa import resolve_saa_prompts

WORDS = ["defect", "damage", "flaw", "on", "carpet", "candle", "black", "hole", "thread", "object", "."]


def _make_tiny_bert(directory: Path) -> Path:
    """A tiny BERT with a vocabulary written here (special tokens, words, letters)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *(f"##{c}" for c in letters)]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    BertModel(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="module")
def det(bert_dir: Path) -> SaaPlusDetector:
    torch.manual_seed(1234)
    d = models.load_tiny_detector("saa_plus", bert_dir=bert_dir)
    assert isinstance(d, SaaPlusDetector)
    return d


def _image(seed: int, shape: tuple[int, int] = (72, 100)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


# ---------------------------------------------------------------- whole path


def test_image_to_map_on_tiny_models(det: SaaPlusDetector) -> None:
    """Given a non-square RGB image and a product, when SAA+ runs, then the map has the input
    size, lies in [0, 1], the score is its max, and the details name the kept boxes."""
    carpet = get_builtin_product("carpet")
    img = _image(0)
    res = det.predict(img, product=carpet)
    assert res.method == "saa_plus" and res.random_weights and res.weights == RANDOM_INIT
    assert res.anomaly_map.shape == img.shape[:2] and res.anomaly_map.dtype == np.float32
    assert res.anomaly_map.min() >= 0.0 and res.anomaly_map.max() < 1.0
    assert res.score == pytest.approx(float(res.anomaly_map.max()))
    assert res.score == pytest.approx(1 - np.exp(-res.details["raw_score"]), abs=1e-6)
    assert res.prompt_digest == det.prompt_digest(product=carpet)
    assert res.prompt_digest == resolve_saa_prompts("carpet", carpet.saa).digest()
    assert {"dino_image", "dino_grounding", "total"} <= set(res.timings)
    json.dumps(dict(res.details))  # JSON-serialisable
    boxes = res.details["boxes"]
    # random weights give confident boxes everywhere: the path through SAM and saliency ran
    assert 1 <= len(boxes) <= carpet.saa["max_anomalies"]
    assert {"sam_image", "sam_decode", "saliency"} <= set(res.timings)
    assert [b["rank"] for b in boxes] == list(range(len(boxes)))
    rescored = [b["rescored"] for b in boxes]
    assert rescored == sorted(rescored, reverse=True)
    max_area = res.details["object_area_ratio"] * carpet.saa["max_area_ratio"]
    for b in boxes:
        assert 0 < b["area_ratio"] < max_area
        assert b["score"] > 0.1
        assert b["rescored"] == pytest.approx(b["score"] * np.exp(3 * b["saliency"]), rel=1e-4)
        assert b["object_overlap"] >= 0.5
        assert "carpet" not in b["phrase"]
    # the map is positive exactly where some kept mask is: zero elsewhere, > 0 somewhere
    assert res.anomaly_map.max() > 0


def test_predict_batch_equals_single_predictions(det: SaaPlusDetector) -> None:
    imgs = [_image(1), _image(2, (64, 64))]
    batch = det.predict_batch(imgs, object_name="candle")
    for img, r in zip(imgs, batch, strict=True):
        alone = det.predict(img, object_name="candle")
        np.testing.assert_array_equal(r.anomaly_map, alone.anomaly_map)


def test_two_requests_in_either_order_give_the_results_of_each_alone(det: SaaPlusDetector) -> None:
    """No hidden state: nothing about one request changes the next."""
    carpet, candle = get_builtin_product("carpet"), get_builtin_product("candle")  # N = 1 and N = 4
    a_img, b_img = _image(3), _image(4, (80, 60))
    a1 = det.predict(a_img, product=carpet)
    b1 = det.predict(b_img, product=candle)
    b2 = det.predict(b_img, product=candle)
    a2 = det.predict(a_img, product=carpet)
    for x, y in ((a1, a2), (b1, b2)):
        np.testing.assert_array_equal(x.anomaly_map, y.anomaly_map)
        assert x.score == y.score
        assert x.details["boxes"] == y.details["boxes"]
    assert a1.prompt_digest != b1.prompt_digest


def test_filter_word_is_applied_to_detected_phrases(det: SaaPlusDetector) -> None:
    """Given the same caption with a filter word that never occurs and one that occurs in
    most decoded phrases (a single letter of the tiny vocabulary), the second keeps fewer boxes."""
    img = _image(5)
    base = {"use_general_prompts": False, "min_object_overlap": 0.0}
    keep_all = resolve_saa_prompts(
        "carpet", {**base, "defect_prompts": [{"prompt": "black hole", "filter": "zzz"}]}
    )
    drop_e = resolve_saa_prompts(
        "carpet", {**base, "defect_prompts": [{"prompt": "black hole", "filter": "l"}]}
    )
    all_props, _ = det.propose(img, keep_all)
    some_props, _ = det.propose(img, drop_e)
    assert len(all_props.defects) > 0
    dropped = [d for d in all_props.defects if "l" in d.phrase]
    assert dropped, "the random model should decode some phrases containing 'l'"
    assert len(some_props.defects) == len(all_props.defects) - len(dropped)
    assert all("l" not in d.phrase for d in some_props.defects)
    assert some_props.rejected["filter_word"] == len(dropped)


def test_references_are_refused(det: SaaPlusDetector) -> None:
    refs = ReferenceSet(method="winclip", model_key="x", image_hashes=(), arrays={})
    with pytest.raises(ReferenceMismatchError):
        det.predict(_image(0), references=refs)


# ---------------------------------------------------------------- model pieces


def test_batched_grounding_equals_the_package_forward_per_caption(det: SaaPlusDetector) -> None:
    """All captions in one pass (backbone once) == the package's own forward, one caption at a time."""
    img = _image(6)
    pixels = gd.dino_preprocess(img, 96, 160)
    captions = ["carpet.", "black hole. thread.", "defect on carpet."]
    out = gd.ground(det.dino, gd.encode_image(det.dino, pixels), captions)
    with torch.no_grad():
        for i, caption in enumerate(captions):
            ref = det.dino(pixels, captions=[caption])
            n = len(out.input_ids[i])
            torch.testing.assert_close(out.boxes[i], ref["pred_boxes"][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                out.token_scores[i, :, :n], ref["pred_logits"][0, :, :n].sigmoid(), atol=1e-5, rtol=1e-4
            )
            assert (out.token_scores[i, :, n:] == 0).all()  # padding of shorter captions


def test_stateless_sam_decoding_equals_sam_predictor(det: SaaPlusDetector) -> None:
    from segment_anything import SamPredictor

    img = _image(7, (70, 90))
    boxes = np.array([[5, 5, 40, 30], [20, 10, 85, 65], [0, 0, 89, 69]], dtype=np.float32)
    got = decode_boxes(det.sam, embed_image(det.sam, img), boxes)
    pred = SamPredictor(det.sam)
    pred.set_image(img)
    tb = pred.transform.apply_boxes_torch(torch.from_numpy(boxes), img.shape[:2])
    ref, _, _ = pred.predict_torch(point_coords=None, point_labels=None, boxes=tb, multimask_output=False)
    assert got.shape == (3, 70, 90) and got.dtype == bool
    np.testing.assert_array_equal(got, ref[:, 0].numpy())
    assert decode_boxes(det.sam, embed_image(det.sam, img), np.zeros((0, 4))).shape == (0, 70, 90)


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_sam_variant_configs_match_segment_anything_builders(variant: str) -> None:
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ours = build_sam(SAM_CONFIGS[variant]).state_dict()
        theirs = sam_model_registry[variant]().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_wrn_features_are_unit_norm_layer1_to_3() -> None:
    torch.manual_seed(0)
    wrn = create_wrn(None, tiny=True)
    f = wrn_features(wrn, _image(8), 64)
    assert f.shape == (256 + 512 + 1024, 16, 16)
    torch.testing.assert_close(f.norm(dim=0), torch.ones(16, 16), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- weights


def test_saved_tiny_checkpoints_load_through_the_same_code(
    det: SaaPlusDetector, tmp_path: Path, bert_dir: Path
) -> None:
    torch.save({"model": {f"module.{k}": v for k, v in det.dino.state_dict().items()}}, tmp_path / "dino.pth")
    torch.save(det.sam.state_dict(), tmp_path / "sam.pth")
    torch.save(det.wrn.state_dict(), tmp_path / "wrn.pth")
    torch.manual_seed(99)  # different random init underneath: the files must overwrite all of it
    dino = gd.create_groundingdino(tmp_path / "dino.pth", bert_dir=bert_dir, overrides=gd.TINY_OVERRIDES)
    sam = create_sam("tiny", tmp_path / "sam.pth")
    wrn = create_wrn(tmp_path / "wrn.pth", tiny=True)
    again = SaaPlusDetector(
        dino=dino,
        sam=sam,
        wrn=wrn,
        model_name="t",
        weights_tag="t",
        random_weights=False,
        settings=det.settings,
    )
    img = _image(9)
    a, b = det.predict(img, object_name="carpet"), again.predict(img, object_name="carpet")
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-5)
    assert a.details["boxes"] == b.details["boxes"]


def test_checkpoint_missing_a_weight_is_refused(det: SaaPlusDetector, tmp_path: Path) -> None:
    state = det.dino.state_dict()
    state.pop("feat_map.weight")
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"does not fit GroundingDINO.*feat_map\.weight"):
        gd.load_groundingdino_weights(det.dino, tmp_path / "partial.pth")
    torch.save(det.sam.state_dict(), tmp_path / "tiny_sam.pth")
    with pytest.raises(WeightsError, match="does not fit WideResNet"):
        create_wrn(tmp_path / "tiny_sam.pth", tiny=True)


def test_missing_files_are_clear_errors(tmp_path: Path, bert_dir: Path) -> None:
    w = SaaWeights(
        groundingdino=tmp_path / "groundingdino/groundingdino_swint_ogc.pth",
        bert_dir=bert_dir,
        sam=tmp_path / "sam/sam_vit_b_01ec64.pth",
        wrn=tmp_path / "torchvision/wide_resnet50_2-95faca4d.pth",
        weights_dir=tmp_path,
    )
    with pytest.raises(
        WeightsError,
        match=r"not found: .*groundingdino_swint_ogc\.pth.*weights fetch groundingdino-swint-ogc",
    ):
        build_saa_plus(weights=w, sam_variant="vit_b")
    no_bert = SaaWeights(w.groundingdino, tmp_path / "bert-base-uncased", w.sam, w.wrn, tmp_path)
    with pytest.raises(
        WeightsError, match=rf"BERT directory not found.*weights fetch bert-base-uncased --dir {tmp_path}"
    ):
        build_saa_plus(weights=no_bert)
    (tmp_path / "half-bert").mkdir()
    (tmp_path / "half-bert" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"incomplete \(missing vocab\.txt, model\.safetensors"):
        build_saa_plus(weights=w, bert_dir=tmp_path / "half-bert")
    with pytest.raises(WeightsError, match="local files only"):
        models.load_detector("saa_plus", weights=None)


def test_required_weights_follow_the_sam_variant(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from models import weights as mw

    spec = models.method_spec("saa_plus")
    assert spec.required_weights() == (
        "groundingdino-swint-ogc",
        "bert-base-uncased",
        "sam-vit-h",
        "wide-resnet50-2",
    )
    assert spec.required_weights(sam_variant="vit_b")[2] == "sam-vit-b"
    with pytest.raises(ValueError, match="sam_variant"):
        spec.required_weights(sam_variant="vit_x")
    files = {
        "groundingdino-swint-ogc": "groundingdino/groundingdino_swint_ogc.pth",
        "bert-base-uncased": "bert-base-uncased",
        "sam-vit-h": "sam/sam_vit_h_4b8939.pth",
        "sam-vit-l": "sam/sam_vit_l_0b3195.pth",
        "wide-resnet50-2": "torchvision/wide_resnet50_2-95faca4d.pth",
    }
    fake = {
        n: mw.WeightSpec(name=n, file=f, url="", licence="", used_by=("saa_plus",)) for n, f in files.items()
    }
    monkeypatch.setattr(mw, "manifest", lambda: fake)
    w = spec.weights_from_dir(tmp_path, sam_variant="vit_l")
    assert w.sam == tmp_path / "sam/sam_vit_l_0b3195.pth" and w.bert_dir == tmp_path / "bert-base-uncased"
    assert spec.weights_from_dir(tmp_path, bert_dir="/elsewhere").bert_dir == Path("/elsewhere")
    with pytest.raises(WeightsError, match=r"sam-vit-l.*anomaly-inspect weights fetch"):
        models.load_detector_from_dir("saa_plus", tmp_path, sam_variant="vit_l")


def test_random_init_without_bert_dir_builds_a_temporary_bert() -> None:
    torch.manual_seed(0)
    d = build_saa_plus(weights=RANDOM_INIT, config="tiny", cache=object(), precision="bf16")
    assert d.random_weights and d.model_name == "saa_plus-tiny"
    assert d.predict(_image(10, (40, 50)), object_name="carpet").anomaly_map.shape == (40, 50)
