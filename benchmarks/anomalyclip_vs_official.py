"""AnomalyCLIP s/image: this project vs the official code (zqhang/AnomalyCLIP), on this CPU and on its AVX2 path.

Both sides run the REAL architecture (OpenAI ViT-L/14@336px layout, QuickGELU, 24 blocks,
DPAM on blocks 6-24, the map from layer 24 alone as the official ``test.sh`` since
2025-04-13) on IDENTICAL random weights (timing only; scores mean nothing), CPU, fp32,
batch 1, 518x518, with the same torch thread count. The official code is imported at run
time from a checkout of its repository; nothing of it is copied into this project::

    git clone https://github.com/zqhang/AnomalyCLIP /tmp/AnomalyCLIP
    .venv/bin/python benchmarks/anomalyclip_vs_official.py --official-repo /tmp/AnomalyCLIP

(The repository's ``checkpoints/`` are not needed; ``git clone --filter=blob:none`` or a
``git archive HEAD -- AnomalyCLIP_lib '*.py'`` of it is enough.) The official code
imports ``ftfy`` and ``regex`` (its tokenizer, installed here with open_clip) and, only
at module level, ``thop`` (``AnomalyCLIP.py``, never called) and ``pkg_resources``
(setuptools < 81; used only for a torch version check). The official child stubs those
two when they are not installed: ``thop`` with an empty module, ``pkg_resources`` with a
module whose ``packaging`` is the real ``packaging`` package. Everything else it needs
(torch, torchvision, scipy, PIL, numpy) is in this project's virtualenv, so by default
it runs under this interpreter (``--official-python`` to use another).

Weights: the first project run builds the detector exactly as the service does on
random weights (``models.load_detector("anomalyclip", weights=RANDOM_INIT)``: seeded,
so every run builds the same model) and saves its open_clip state dict and prompt
learner state dict to a temporary file. open_clip's OpenAI-layout CLIP uses OpenAI's
parameter names, so the official child builds its model with the official
``AnomalyCLIP_lib.build_model.build_model(name, state_dict, design_details)`` (strict
``load_state_dict``; what ``AnomalyCLIP_lib.load`` does with the downloaded
checkpoint), design details as ``test.py`` (``Prompt_length 12``,
``learnabel_text_embedding_depth 9``, ``learnabel_text_embedding_length 4``), loads the
project's prompt learner state dict into the official ``AnomalyCLIP_PromptLearner``
(same layout) and calls ``model.visual.DAPM_replace(DPAM_layer=20)``.

Timed per image (after one warm-up call on each side; text features computed once
before, outside the timed region on both sides, as ``test.py`` and the service do):

* project: ``detector.predict(image)`` on a 518x518 uint8 image (text embeddings served
  from the detector's cache after the warm-up). It includes the project's
  preprocessing (no resize at 518: ``/255`` and normalise) and the conversion of the
  map to numpy, a few milliseconds the official side does not pay.
* official: what ``test.py`` does per image once the image tensor is there:
  ``model.encode_image(image, [24], DPAM_layer=20)``, normalisation, the image-level
  text probability, ``AnomalyCLIP_lib.compute_similarity`` + ``get_similarity_map`` at
  518, ``(P_abn + 1 - P_norm) / 2``, the sum over layers and scipy
  ``gaussian_filter(sigma=4)``. Its input is the same 518x518 image through the
  official ``utils.get_transform`` (resize to 518 = no-op, centre crop, ``ToTensor``,
  ``Normalize``), prepared outside the timed region.

Each configuration is measured ``--rounds`` times, interleaved (project, official,
project, official), each run keeping the best of ``--repeats`` passes; the best over the
rounds is printed. ``--isa avx2`` (default: both) also runs both sides with oneDNN,
ATen and MKL limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2``; the project also gets ``ZSI_CPU_ISA=avx2``). The
``map |diff|`` column is the largest absolute difference between the two sides' final
maps for the same image (last round of that configuration): float rounding only
(~1e-6) if the comparison is like for like.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._children import AVX2_ENV, run_child  # noqa: E402

SIZE = 518

#: timed in this project's virtualenv; argv: repeats, weights file to write (or "-"), map .npy
_PROJECT_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    import models
    repeats, weights_out, map_out, size = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    det = models.load_detector("anomalyclip", weights=models.RANDOM_INIT, device="cpu")
    img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    res = det.predict(img)  # warm-up; computes and caches the text embeddings
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = det.predict(img)
        times.append(time.perf_counter() - t0)
    np.save(map_out, np.asarray(res.anomaly_map, dtype=np.float32))
    if weights_out != "-":  # after timing: the official child builds from these weights
        torch.save({"clip": det.clip.state_dict(), "prompt_learner": det.prompt_learner.state_dict()},
                   weights_out)
    d = det.describe()
    print(json.dumps({"best": min(times), "all": times, "threads": torch.get_num_threads(),
                      "score": res.score, "precision": d.get("precision"), "cpu_isa": d.get("cpu_isa"),
                      "feature_layers": d.get("feature_layers"), "image_size": d.get("image_size")}))
    """
)

#: timed with the official code imported from its checkout; argv: repeats, repo, weights, map .npy
_OFFICIAL_CHILD = textwrap.dedent(
    """
    import json, sys, time, types
    import numpy as np, torch
    repeats, repo, weights, map_out, size = (int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4],
                                             int(sys.argv[5]))
    sys.path.insert(0, repo)
    stubbed = []
    try:  # imported by AnomalyCLIP_lib/AnomalyCLIP.py at module level, never called
        import thop
    except ImportError:
        sys.modules["thop"] = types.ModuleType("thop")
        sys.modules["thop"].profile = None
        stubbed.append("thop")
    try:  # `from pkg_resources import packaging`: a torch version check (setuptools < 81)
        import pkg_resources
    except ImportError:
        import packaging.version
        sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
        sys.modules["pkg_resources"].packaging = packaging
        stubbed.append("pkg_resources")
    from PIL import Image
    from scipy.ndimage import gaussian_filter
    import AnomalyCLIP_lib
    from AnomalyCLIP_lib.build_model import build_model
    from prompt_ensemble import AnomalyCLIP_PromptLearner
    from utils import get_transform

    design = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
    state = torch.load(weights, map_location="cpu", mmap=True)
    model = build_model("ViT-L/14@336px", dict(state["clip"]), design).to("cpu").float().eval()
    learner = AnomalyCLIP_PromptLearner(model, design)
    learner.load_state_dict(state["prompt_learner"])
    learner.eval()
    del state
    model.visual.DAPM_replace(DPAM_layer=20)
    features_list = [24]

    with torch.no_grad():  # once, before the loop (test.py)
        prompts, tokenized_prompts, compound_prompts_text = learner(cls_id=None)
        text_features = model.encode_text_learn(prompts, tokenized_prompts, compound_prompts_text).float()
        text_features = torch.stack(torch.chunk(text_features, dim=0, chunks=2), dim=1)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)

    preprocess, _ = get_transform(types.SimpleNamespace(image_size=size))
    img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = preprocess(Image.fromarray(img)).unsqueeze(0)

    def infer(image):  # test.py, per image
        with torch.no_grad():
            image_features, patch_features = model.encode_image(image, features_list, DPAM_layer=20)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            text_probs = image_features @ text_features.permute(0, 2, 1)
            text_probs = (text_probs / 0.07).softmax(-1)
            text_probs = text_probs[:, 0, 1]
            anomaly_map_list = []
            for patch_feature in patch_features:
                patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
                similarity, _ = AnomalyCLIP_lib.compute_similarity(patch_feature, text_features[0])
                similarity_map = AnomalyCLIP_lib.get_similarity_map(similarity[:, 1:, :], size)
                anomaly_map_list.append((similarity_map[..., 1] + 1 - similarity_map[..., 0]) / 2.0)
            anomaly_map = torch.stack(anomaly_map_list).sum(dim=0)
            score = text_probs.detach().cpu()
            anomaly_map = torch.stack(
                [torch.from_numpy(gaussian_filter(i, sigma=4)) for i in anomaly_map.detach().cpu()], dim=0
            )
        return score, anomaly_map

    score, amap = infer(image)  # warm-up (also interpolates the positional embedding to 37x37)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score, amap = infer(image)
        times.append(time.perf_counter() - t0)
    np.save(map_out, amap[0].numpy().astype(np.float32))
    print(json.dumps({"best": min(times), "all": times, "threads": torch.get_num_threads(),
                      "score": float(score[0]), "stubbed": stubbed}))
    """
)


def _max_abs_diff(a: Path, b: Path) -> float:
    import numpy as np

    x, y = np.load(a), np.load(b)
    if x.shape != y.shape:
        raise SystemExit(f"map shapes differ: project {x.shape}, official {y.shape}")
    return float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-repo", required=True, type=Path, help="checkout of zqhang/AnomalyCLIP")
    p.add_argument("--official-python", default=sys.executable, help="python for the official side")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per run (best kept)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs per side and configuration")
    p.add_argument("--isa", choices=["native", "avx2", "both"], default="both")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        p.error("--repeats and --rounds must be at least 1")
    repo = args.official_repo.expanduser().resolve()
    if not (repo / "AnomalyCLIP_lib").is_dir() or not (repo / "prompt_ensemble.py").is_file():
        raise SystemExit(
            f"{repo} is not a checkout of zqhang/AnomalyCLIP (no AnomalyCLIP_lib/, prompt_ensemble.py)"
        )
    configs: dict[str, dict[str, str]] = {"native": {}, "avx2": AVX2_ENV}
    chosen = list(configs) if args.isa == "both" else [args.isa]
    print(
        f"AnomalyCLIP, ViT-L-14-336, random weights, batch 1, {SIZE}x{SIZE}, layer 24 (s/image, best of runs)"
    )
    print(
        f"{'cpu path':<8} {'project':>9} {'official':>9} {'project/official':>17} {'map |diff|':>11}"
        "  project kernels/precision"
    )
    with tempfile.TemporaryDirectory(prefix="anomalyclip_vs_official_") as tmp:
        weights = Path(tmp) / "weights.pt"  # ~1.7 GB, removed at the end
        ours_map, theirs_map = Path(tmp) / "project.npy", Path(tmp) / "official.npy"
        stubbed: object = []
        scores: list[str] = []
        for name in chosen:
            env = dict(configs[name])
            ours_env = {**env, "ZSI_CPU_ISA": "avx2"} if name == "avx2" else env
            ours_env = {**ours_env, "PYTHONPATH": str(ROOT)}
            theirs_env = {**env, "PYTHONPATH": str(repo)}
            ours: list[float] = []
            theirs: list[float] = []
            info: dict[str, object] = {}
            for _ in range(args.rounds):
                export = "-" if weights.is_file() else str(weights)
                info = run_child(
                    sys.executable,
                    _PROJECT_CHILD,
                    [str(args.repeats), export, str(ours_map), str(SIZE)],
                    ours_env,
                    ROOT,
                )
                ours.append(float(info["best"]))  # type: ignore[arg-type]
                official = run_child(
                    args.official_python,
                    _OFFICIAL_CHILD,
                    [str(args.repeats), str(repo), str(weights), str(theirs_map), str(SIZE)],
                    theirs_env,
                    repo,
                )
                theirs.append(float(official["best"]))
                stubbed = official.get("stubbed")
            diff = _max_abs_diff(ours_map, theirs_map)
            scores.append(f"{name} project {info.get('score'):.6f} official {official.get('score'):.6f}")
            a, b = min(ours), min(theirs)
            print(
                f"{name:<8} {a:9.3f} {b:9.3f} {a / b:17.3f} {diff:11.1e}"
                f"  torch {info.get('precision')} ({info.get('cpu_isa')})"
            )
        print("image scores (random weights, last round): " + "; ".join(scores))
        print(f"official side: imports stubbed (not installed, not on the image path): {stubbed or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
