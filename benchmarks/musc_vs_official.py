"""MuSc s/image in batch (transductive) mode: this project vs the official code (xrli-U/MuSc), CPU.

Both sides run the REAL default architecture (open_clip ``ViT-L-14-336``, OpenAI layout,
run at 518 as the official ``configs/musc.yaml``: ``nn.GELU`` at that size, positional
embedding resized 24x24 -> 37x37 by the official loader; tokens after blocks 6, 12, 18,
24 = ``feature_layers: [5, 11, 17, 23]`` + 1; ``r_list: [1, 3, 5]``; MSM interval 0 ..
0.3; RsCIN ``k_list [1, 2, 3]``, the MVTec-AD / BTAD setting) on IDENTICAL random weights
(timing only; scores mean nothing), CPU, fp32, on the same batch of ``--batch`` uint8
images (random noise, seeded), with the same torch thread count. The official code is
imported at run time from a checkout of its repository; nothing of it is copied into this
project::

    git clone https://github.com/xrli-U/MuSc /tmp/MuSc
    .venv/bin/python benchmarks/musc_vs_official.py --official-repo /tmp/MuSc

(Only ``models/`` and ``configs/`` of the checkout are used.) The official ``MuSc`` class
(``models/musc.py``) is tied to its datasets, metrics, ``openpyxl`` and ``cv2`` and picks
CUDA when there is one, so the official child does not build it: it calls the official
pieces that ``MuSc.make_category_data`` calls, in the same order, on ``torch.device("cpu")``
(``models.backbone.open_clip.create_model_and_transforms``, ``encode_image``,
``models.modules._LNAMD.LNAMD._embed``, ``_MSM.MSM`` (``compute_scores_fast``),
``F.interpolate(bilinear, align_corners=True)``, ``_RsCIN.RsCIN``). What it leaves out:
the ``torch.cuda.amp.autocast()`` context (disabled without CUDA; CPU ops are never
autocast by it), ``torch.cuda.empty_cache()``, the metrics and the prints. Its model is
left in training mode, as the official code leaves it (no ``.eval()``; no dropout in it).
Everything it needs (torch, torchvision, numpy, PIL, tqdm, ftfy, regex) is in this
project's virtualenv, so by default it runs under this interpreter (``--official-python``
to use another); ``PYTHONPATH`` is the checkout, so its ``models`` package is the
official one.

Weights: the first project run builds the detector exactly as the service does on random
weights (``models.load_detector("musc", weights=RANDOM_INIT)``: seeded, so every run
builds the same model) and saves its vision tower's state dict (open_clip's OpenAI layout,
24x24 positional embedding as in the OpenAI checkpoint) to a temporary file. The official
child replaces ``load_openai_model`` in the official ``open_clip.factory`` (it would
download the OpenAI checkpoint) by a function that builds the official ``CLIP`` of the
``ViT-L-14-336`` config and loads that state dict into its ``visual`` strictly (the text
tower keeps its random init: MuSc never uses it); the official
``create_model_and_transforms("ViT-L-14-336", 518, pretrained="openai")`` then runs
unchanged: it builds ``CLIP`` at 518, resizes the positional embedding with its own
``resize_pos_embed`` and loads the state dict strictly, as with the real weights.

Small batches. With fewer than 5 images the official MSM interval ``[int(0 n), int(0.3
n))`` of the ``n = B - 1`` other images is empty (NaN scores) and with fewer than 3 images
RsCIN with ``k = 3`` raises (``topk`` of a negative count). The project documents what it
does instead (docs/musc.md: the nearest image only; ``min(k, B)``); to compare like for
like the official child is then called with exactly that: ``MSM(..., topmin_max=1)`` (the
official code's own count form: the nearest image) and ``k_list = [min(k, B)]``. The
settings used are printed. With ``--batch 5`` or more both sides run the official
settings unchanged.

Timed (after one warm-up call on each side on the first two images, outside the timed
region; the official warm-up with the 2-image settings above):

* project: ``det.predict_batch(images)`` on the uint8 images: its pre-processing (PIL
  resize, a no-op at 518x518; ``/ 255``, normalise), the backbone, LNAMD, MSM, maps,
  RsCIN, and the results (maps to numpy), a few milliseconds the official side does not
  pay.
* official: from the pre-processed batch tensor to the RsCIN scores: backbone in chunks
  of the config's ``batch_size`` (4; the project encodes up to 8 at a time, the same for
  ``--batch`` <= 4), LNAMD per ``r``, MSM per block, means, interpolation to 518, the
  maximum and RsCIN. Its input is the same uint8 images through the official
  ``preprocess_val`` (open_clip ``image_transform``: ``Resize((518, 518), BICUBIC)``,
  ``CenterCrop``, ``ToTensor``, ``Normalize``) on PIL images, prepared outside the timed
  region.

The ``backbone`` columns are the backbone share of the timed pass (project: its own
``timings["backbone"]``, which includes the pre-processing; official: the feature
extraction loop). Each configuration is measured ``--rounds`` times, interleaved
(project, official, project, official), each run keeping the best of ``--repeats``
passes; the best over the rounds is printed. ``--isa avx2`` (default: both) also runs
both sides with oneDNN, ATen and MKL limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``; the project also gets
``ZSI_CPU_ISA=avx2``). Differences (last round of each configuration, all images): the
project's maps are ``distance / 2`` (docs/musc.md), so ``map |diff|`` compares twice the
project's map with the official map; ``raw |diff|`` the image scores before RsCIN
(project ``details["raw_score"]``, official ``max`` of the map); ``rscin |diff|`` the
final scores (project ``score``, official ``RsCIN``). Float rounding only (~1e-6) if the
comparison is like for like.

Where the time differs (measured on the 2-core development machine): most of the backbone
gap is the official ``ResidualAttentionBlock.attention``, which calls
``nn.MultiheadAttention`` with ``need_weights=True`` in every block (its visual tower sums
block 12's attention map into an ``out_attn`` it never returns), so torch materialises
the head-averaged attention weights instead of taking the fused attention kernel; the
same official model with ``need_weights=False`` ran one 518 image in 6.8 s instead of
11.3 s. The rest is scoring (not broken down further here): the official MSM compares
each image with all the others (every pair twice), the project each pair once.

Cost: ViT-L at 518 is ~7-10 s per image through the backbone on a 2-core CPU, and each
child also builds the model and runs a 2-image warm-up: one configuration took 1.8 min at
``--batch 2`` and 3 min at ``--batch 5`` (one round), so the defaults (batch 4, 1 repeat,
1 round, both ISAs) take about 5-6 minutes and ``--batch 5 --rounds 2`` about 12.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._children import AVX2_ENV, run_child  # noqa: E402

SIZE = 518
R_LIST = (1, 3, 5)
RSCIN_K = (1, 2, 3)  # official musc.py for mvtec_ad and btad
TOPMIN_MAX = 0.3
CONFIG_BATCH = 4  # official configs/musc.yaml models.batch_size

#: timed in this project's virtualenv; argv: repeats, images .npy, weights out (or "-"), out prefix
_PROJECT_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    import models
    from models.musc.detector import MAP_SCALE
    repeats, images_in, weights_out, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    arr = np.load(images_in)
    images = [arr[i] for i in range(arr.shape[0])]
    det = models.load_detector("musc", weights=models.RANDOM_INIT, device="cpu")
    det.predict_batch(images[:2], object_name="bottle")  # warm-up
    times, backbone = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = det.predict_batch(images, object_name="bottle")
        times.append(time.perf_counter() - t0)
        backbone.append(res[0].timings["backbone"])
    maps = np.stack([np.asarray(r.anomaly_map, dtype=np.float64) / MAP_SCALE for r in res])
    np.save(out + "_maps.npy", maps)
    if weights_out != "-":  # after timing: the official child builds from these weights
        torch.save(det.encoder.visual.state_dict(), weights_out)
    d = det.describe()
    i = int(np.argmin(times))
    print(json.dumps({"best": times[i], "backbone": backbone[i], "all": times,
                      "threads": torch.get_num_threads(),
                      "raw": [float(r.details["raw_score"]) for r in res],
                      "final": [float(r.score) for r in res],
                      "score_kind": res[0].details.get("score_kind"),
                      "precision": d.get("precision"), "cpu_isa": d.get("cpu_isa"),
                      "feature_layers": d.get("feature_layers"), "image_size": d.get("image_size"),
                      "r_list": d.get("r_list"), "topmin": d.get("topmin"), "rscin_k": d.get("rscin_k")}))
    """
)

#: timed with the official code imported from its checkout;
#: argv: repeats, repo, images .npy, weights, out prefix, size, topmin_max, k_list (json), chunk
_OFFICIAL_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    import torch.nn.functional as F
    repeats, repo, images_in, weights, out = (int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4],
                                              sys.argv[5])
    size, topmin_max, k_list, chunk = (int(sys.argv[6]), float(sys.argv[7]), json.loads(sys.argv[8]),
                                       int(sys.argv[9]))
    if topmin_max >= 1:
        topmin_max = int(topmin_max)  # the official count form (1 = the nearest image)
    sys.path.insert(0, repo)
    sys.path.append(repo + "/models/backbone")  # as models/musc.py
    from PIL import Image
    import models.backbone.open_clip as open_clip
    from models.backbone.open_clip import factory
    from models.modules._LNAMD import LNAMD
    from models.modules._MSM import MSM
    from models.modules._RsCIN import RsCIN

    device = torch.device("cpu")  # musc.py: cuda:{cfg['device']} if available, else cpu
    visual_state = torch.load(weights, map_location="cpu", mmap=True)

    def _load_openai_model(name, precision="fp32", device="cpu", jit=False, cache_dir=None, **_):
        # instead of downloading OpenAI's checkpoint: the official CLIP of the config (text
        # tower random, unused by MuSc) with the project's vision weights, loaded strictly
        model = factory.CLIP(**factory.get_model_config(name))
        model.visual.load_state_dict(visual_state, strict=True)
        return model

    factory.load_openai_model = _load_openai_model
    # musc.py load_backbone: create_model_and_transforms(backbone_name, img_resize, pretrained)
    clip_model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14-336", size, pretrained="openai")
    clip_model.to(device)
    del visual_state
    features_list = [l + 1 for l in [5, 11, 17, 23]]
    r_list = [1, 3, 5]

    arr = np.load(images_in)
    batch = torch.stack([preprocess(Image.fromarray(arr[i])) for i in range(arr.shape[0])])

    def infer(images, topmin_max, k_list):  # musc.py make_category_data, the batch as the category
        t0 = time.perf_counter()
        class_tokens, patch_tokens_list = [], []
        for s in range(0, images.shape[0], chunk):
            with torch.no_grad():
                input_image = images[s:s + chunk].to(torch.float).to(device)
                image_features, patch_tokens = clip_model.encode_image(input_image, features_list)
                image_features /= image_features.norm(dim=-1, keepdim=True)
                patch_tokens = [patch_tokens[l].cpu() for l in range(len(features_list))]
            class_tokens.extend([image_features[bi].squeeze().cpu().numpy()
                                 for bi in range(image_features.shape[0])])
            patch_tokens_list.append(patch_tokens)
        t1 = time.perf_counter()
        feature_dim = patch_tokens_list[0][0].shape[-1]
        anomaly_maps_r = torch.tensor([]).double()
        for r in r_list:
            LNAMD_r = LNAMD(device=device, r=r, feature_dim=feature_dim, feature_layer=features_list)
            Z_layers = {}
            for im in range(len(patch_tokens_list)):
                patch_tokens = [p.to(device) for p in patch_tokens_list[im]]
                with torch.no_grad():
                    features = LNAMD_r._embed(patch_tokens)
                    features /= features.norm(dim=-1, keepdim=True)
                    for l in range(len(features_list)):
                        Z_layers.setdefault(str(l), []).append(features[:, :, l, :])
            anomaly_maps_l = torch.tensor([]).double()
            for l in Z_layers.keys():
                Z = torch.cat(Z_layers[l], dim=0).to(device)
                anomaly_maps_msm = MSM(Z=Z, device=device, topmin_min=0, topmin_max=topmin_max)
                anomaly_maps_l = torch.cat((anomaly_maps_l, anomaly_maps_msm.unsqueeze(0).cpu()), dim=0)
            anomaly_maps_l = torch.mean(anomaly_maps_l, 0)
            anomaly_maps_r = torch.cat((anomaly_maps_r, anomaly_maps_l.unsqueeze(0)), dim=0)
        anomaly_maps_iter = torch.mean(anomaly_maps_r, 0).to(device)
        B, L = anomaly_maps_iter.shape
        H = int(np.sqrt(L))
        anomaly_maps = F.interpolate(anomaly_maps_iter.view(B, 1, H, H), size=size, mode="bilinear",
                                     align_corners=True).cpu().numpy()
        ac_score = np.array(anomaly_maps).reshape(B, -1).max(-1)
        scores_cls = RsCIN(ac_score, class_tokens, k_list=k_list)
        return anomaly_maps[:, 0], ac_score, scores_cls, t1 - t0

    infer(batch[:2], 1, [min(k, 2) for k in k_list])  # warm-up (2 images: settings as for batch 2)
    times, backbone = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        maps, raw, final, bb = infer(batch, topmin_max, k_list)
        times.append(time.perf_counter() - t0)
        backbone.append(bb)
    np.save(out + "_maps.npy", maps.astype(np.float64))
    i = int(np.argmin(times))
    print(json.dumps({"best": times[i], "backbone": backbone[i], "all": times,
                      "threads": torch.get_num_threads(), "training_mode": clip_model.training,
                      "raw": [float(v) for v in raw], "final": [float(v) for v in final],
                      "topmin_max": topmin_max, "k_list": k_list}))
    """
)


def _max_abs_diff(a: object, b: object) -> float:
    import numpy as np

    x = np.load(a) if isinstance(a, Path) else np.asarray(a, dtype=np.float64)
    y = np.load(b) if isinstance(b, Path) else np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise SystemExit(f"shapes differ: project {x.shape}, official {y.shape}")
    if np.isnan(y).any() or np.isnan(x).any():
        return float("nan")
    return float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())


def official_settings(batch: int) -> tuple[float, list[int], list[str]]:
    """``(topmin_max, k_list, notes)`` for the official child at ``batch`` images.

    The official settings where they are defined; where they are not (see the module
    docstring), the project's documented substitute expressed in the official parameters.
    """
    notes: list[str] = []
    topmin_max: float = TOPMIN_MAX
    if int((batch - 1) * TOPMIN_MAX) == 0:
        topmin_max = 1
        notes.append(
            f"MSM interval of {batch - 1} other images is empty officially (NaN): "
            "official MSM called with topmin_max=1 (the nearest image), as the project does"
        )
    k_list = [min(k, batch) for k in RSCIN_K]
    if k_list != list(RSCIN_K):
        notes.append(
            f"RsCIN k_list {list(RSCIN_K)} raises officially at batch {batch}: official called with {k_list}"
        )
    return topmin_max, k_list, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-repo", required=True, type=Path, help="checkout of xrli-U/MuSc")
    p.add_argument("--official-python", default=sys.executable, help="python for the official side")
    p.add_argument(
        "--batch", type=int, default=4, help="images in the batch (>= 2; >= 5 for official settings)"
    )
    p.add_argument("--repeats", type=int, default=1, help="timed passes per run (best kept)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved runs per side and configuration")
    p.add_argument("--isa", choices=["native", "avx2", "both"], default="both")
    p.add_argument(
        "--image-hw", type=int, nargs=2, default=(SIZE, SIZE), metavar=("H", "W"), help="input image size"
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        p.error("--repeats and --rounds must be at least 1")
    if args.batch < 2:
        p.error("--batch must be at least 2 (each image is scored against the others)")
    repo = args.official_repo.expanduser().resolve()
    if not (repo / "models" / "modules" / "_MSM.py").is_file() or not (repo / "models" / "backbone").is_dir():
        raise SystemExit(
            f"{repo} is not a checkout of xrli-U/MuSc (no models/modules/_MSM.py, models/backbone/)"
        )
    import numpy as np

    topmin_max, k_list, notes = official_settings(args.batch)
    configs: dict[str, dict[str, str]] = {"native": {}, "avx2": AVX2_ENV}
    chosen = list(configs) if args.isa == "both" else [args.isa]
    h, w = args.image_hw
    print(
        f"MuSc batch mode, ViT-L-14-336 at {SIZE}, random weights, fp32, batch {args.batch} of {h}x{w} uint8, "
        f"layers 6/12/18/24, r {list(R_LIST)} (s/image, best of runs)"
    )
    for note in notes:
        print(f"note: {note}")
    print(
        f"{'cpu path':<8} {'project':>9} {'official':>9} {'proj/off':>9} {'bb proj':>8} {'bb off':>8}"
        f" {'map |diff|':>11} {'raw |diff|':>11} {'rscin |diff|':>12}  project precision"
    )
    with tempfile.TemporaryDirectory(prefix="musc_vs_official_") as tmp:
        images = Path(tmp) / "images.npy"
        rng = np.random.default_rng(0)
        np.save(images, rng.integers(0, 256, (args.batch, h, w, 3), dtype=np.uint8))
        weights = Path(tmp) / "visual.pt"  # ~1.2 GB, removed at the end
        ours_out, theirs_out = str(Path(tmp) / "project"), str(Path(tmp) / "official")
        lines: list[str] = []
        official: dict[str, object] = {}
        info: dict[str, object] = {}
        for name in chosen:
            env = dict(configs[name])
            ours_env = {**env, "ZSI_CPU_ISA": "avx2"} if name == "avx2" else env
            ours_env = {**ours_env, "PYTHONPATH": str(ROOT)}
            theirs_env = {**env, "PYTHONPATH": str(repo)}
            ours: list[tuple[float, float]] = []
            theirs: list[tuple[float, float]] = []
            for _ in range(args.rounds):
                export = "-" if weights.is_file() else str(weights)
                info = run_child(
                    sys.executable,
                    _PROJECT_CHILD,
                    [str(args.repeats), str(images), export, ours_out],
                    ours_env,
                    ROOT,
                )
                ours.append((float(info["best"]), float(info["backbone"])))  # type: ignore[arg-type]
                official = run_child(
                    args.official_python,
                    _OFFICIAL_CHILD,
                    [
                        str(args.repeats),
                        str(repo),
                        str(images),
                        str(weights),
                        theirs_out,
                        str(SIZE),
                        str(topmin_max),
                        json.dumps(k_list),
                        str(CONFIG_BATCH),
                    ],
                    theirs_env,
                    repo,
                )
                theirs.append((float(official["best"]), float(official["backbone"])))  # type: ignore[arg-type]
            map_diff = _max_abs_diff(Path(ours_out + "_maps.npy"), Path(theirs_out + "_maps.npy"))
            raw_diff = _max_abs_diff(info["raw"], official["raw"])
            final_diff = _max_abs_diff(info["final"], official["final"])
            a, ab = min(ours)
            b, bb = min(theirs)
            n = args.batch
            print(
                f"{name:<8} {a / n:9.3f} {b / n:9.3f} {a / b:9.3f} {ab / n:8.3f} {bb / n:8.3f}"
                f" {map_diff:11.1e} {raw_diff:11.1e} {final_diff:12.1e}"
                f"  torch {info.get('precision')}" + (f" ({info['cpu_isa']})" if info.get("cpu_isa") else "")
            )
            lines.append(
                f"{name}: project raw {_fmt(info['raw'])} final {_fmt(info['final'])} ({info.get('score_kind')}); "
                f"official raw {_fmt(official['raw'])} RsCIN {_fmt(official['final'])}"
            )
        print("image scores (random weights, last round):")
        for line in lines:
            print(f"  {line}")
        print(
            f"settings: project layers {info.get('feature_layers')} r {info.get('r_list')} topmin "
            f"{info.get('topmin')} rscin_k {info.get('rscin_k')} size {info.get('image_size')}, "
            f"threads {info.get('threads')}; official topmin_max {official.get('topmin_max')} "
            f"k_list {official.get('k_list')}, threads {official.get('threads')}, "
            f"model in training mode {official.get('training_mode')}"
        )
    return 0


def _fmt(values: object) -> str:
    return "[" + ", ".join(f"{float(v):.6f}" for v in values) + "]"  # type: ignore[attr-defined]


if __name__ == "__main__":
    raise SystemExit(main())
