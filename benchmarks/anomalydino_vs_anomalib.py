"""AnomalyDINO s/image: this project vs anomalib 2.7's ``AnomalyDINOModel``, same weights, same image.

Both sides run the REAL architecture (timm ``vit_small_patch14_dinov2``, ``dynamic_img_size``)
on IDENTICAL random weights (timing only; scores mean nothing), CPU, fp32, batch 1,
few-shot: a memory bank of the patch features of K golden images (``--shots``, default 4;
random noise images from a seeded numpy generator, the same on both sides). The inspected
image is golden image 0 with a bright 20 % square pasted in, so that the map has structure.

anomalib runs in a child process of a second virtualenv (its pins, e.g. open_clip_torch
2.24, cannot share this project's; torch and timm are the same versions). The one made
for ``benchmarks/winclip_vs_anomalib.py`` serves; it already holds everything anomalib's
AnomalyDINO needs (timm, scikit-learn, opencv; nothing was installed for this script)::

    python3 -m venv /tmp/anovenv
    /tmp/anovenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/anovenv/bin/pip install anomalib==2.7.0 open_clip_torch==2.24.0
    .venv/bin/python benchmarks/anomalydino_vs_anomalib.py --anomalib-python /tmp/anovenv/bin/python

Same weights: this project's child builds ``load_detector("anomalydino",
weights=RANDOM_INIT)`` (seeded) and saves the timm ``state_dict`` of its backbone to a
temporary file; the anomalib child builds ``AnomalyDINOModel()`` with ``timm.create_model``
forced to ``pretrained=False`` (no download; anomalib's backbone IS a timm
``VisionTransformer``, at ``model.feature_encoder.feature_extractor``, so the keys are the
same) and loads that file strictly.

Sizes (``--sizes``, default 252 448) are the project's int ``image_size`` (as anomalib's:
the SHORTER side, aspect kept) on a square ``size x size`` uint8 image, so neither side
resizes (both are multiples of 14: no crop either). Timed regions, after one warm-up call,
best of ``--repeats`` per run:

- project: ``det.predict(img, references=bank)``, INCLUDING its pre-processing of the
  uint8 image (``x * (1/255)``, ImageNet normalisation; no resize at this size) and the
  conversion of the map to numpy;
- anomalib: ``model(x)`` in eval mode under ``torch.no_grad()`` on the pre-processed
  tensor (``to_dtype(to_image(img), float32, scale=True)`` then anomalib's own
  ``AnomalyDINO.configure_pre_processor(image_size=size)`` transform: a no-op resize and
  the normalisation), done outside the timing. Its bank is filled as its Lightning module
  does it: each golden image through ``model.train()`` forward, then ``model.fit()``.

Bank building is outside the timing on both sides. Each configuration is measured in
``--rounds`` interleaved runs (project, anomalib, project, anomalib ...), each a fresh
child process, and the best over runs is kept. ``--isa avx2`` (default: both) also runs
both sides with oneDNN, ATen and MKL limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``; the project also gets
``ZSI_CPU_ISA=avx2``), the closest this machine comes to an AVX2-only CPU. Both sides use
torch's default thread count.

Like for like: the project's score and map are anomalib's cosine distances / 2
(docs/anomalydino.md), so the table's ``map |diff|`` is ``max |2 * project map -
anomalib anomaly_map|`` and ``score |diff|`` is ``|project raw_score - anomalib
pred_score|`` (``raw_score`` = 2 * ``score``), for the same image and weights, from the
last run of each side in that configuration.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._children import AVX2_ENV, run_child  # noqa: E402

#: the images, identical in both children (numpy's seeded PCG64); ``SIZE`` and ``SHOTS`` set before
_IMAGES = textwrap.dedent(
    """\
    import numpy as np
    rng = np.random.default_rng(0)
    golden = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(SHOTS)]
    img = golden[0].copy()
    a, b = int(SIZE * 0.4), int(SIZE * 0.6)
    img[a:b, a:b] = 255
    """
)

#: timed in this project's virtualenv; argv: repeats size shots weights_file map_file; one JSON line
_PROJECT_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    import models
    repeats, SIZE, SHOTS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    weights_file, map_file = sys.argv[4], sys.argv[5]
    # <images>
    det = models.load_detector("anomalydino", weights=models.RANDOM_INIT, device="cpu", image_size=SIZE)
    if not os.path.exists(weights_file):  # the anomalib child loads these same weights
        torch.save(det.backbone.model.state_dict(), weights_file + ".part")
        os.replace(weights_file + ".part", weights_file)
    bank = det.encode_references(golden)  # not timed
    res = det.predict(img, references=bank)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = det.predict(img, references=bank)
        times.append(time.perf_counter() - t0)
    np.save(map_file, np.asarray(res.anomaly_map, dtype=np.float32))
    print(json.dumps({"best": min(times), "all": times, "threads": torch.get_num_threads(),
                      "score": res.score, "raw_score": res.details["raw_score"],
                      "input_size": res.details["input_size"], "bank": res.details["bank_size"],
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
    """
).replace("# <images>\n", _IMAGES)

#: timed in the anomalib virtualenv; same argv; one JSON line
_ANOMALIB_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch, timm
    repeats, SIZE, SHOTS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    weights_file, map_file = sys.argv[4], sys.argv[5]
    # <images>
    _create = timm.create_model
    def _no_download(*args, **kwargs):  # anomalib asks for pretrained weights: build, then load ours
        kwargs["pretrained"] = False
        return _create(*args, **kwargs)
    timm.create_model = _no_download
    from torchvision.transforms.v2.functional import to_dtype, to_image
    from anomalib.models.image.anomaly_dino.lightning_model import AnomalyDINO
    from anomalib.models.image.anomaly_dino.torch_model import AnomalyDINOModel
    model = AnomalyDINOModel()
    vit = model.feature_encoder.feature_extractor
    vit.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True), strict=True)
    transform = AnomalyDINO.configure_pre_processor(image_size=SIZE).transform
    def pre(im):  # anomalib's read_image(as_tensor=True) + its pre-processor, batch of 1
        return transform(to_dtype(to_image(im), torch.float32, scale=True))[None]
    with torch.no_grad():
        model.train()
        for g in golden:  # not timed: the memory bank
            model(pre(g))
        model.fit()
        model.eval()
        x = pre(img)  # not timed
        out = model(x)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(x)
            times.append(time.perf_counter() - t0)
    np.save(map_file, out.anomaly_map[0, 0].float().numpy())
    print(json.dumps({"best": min(times), "all": times, "threads": torch.get_num_threads(),
                      "pred_score": float(out.pred_score.flatten()[0]), "input_size": list(x.shape[-2:]),
                      "bank": int(model.memory_bank.shape[0]),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
    """
).replace("# <images>\n", _IMAGES)


def _run(python: str, code: str, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    return run_child(python, code, argv, {"PYTHONPATH": str(ROOT), **env}, ROOT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--anomalib-python", required=True, help="python of a virtualenv with anomalib 2.7")
    p.add_argument("--repeats", type=int, default=3, help="timed predictions per run (best kept)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs per side and configuration")
    p.add_argument("--isa", choices=["native", "avx2", "both"], default="both")
    p.add_argument("--sizes", type=int, nargs="+", default=[252, 448], help="image_size (square images)")
    p.add_argument("--shots", type=int, default=4, help="golden images in the memory bank (K)")
    args = p.parse_args(argv)
    if args.shots < 1 or args.repeats < 1 or args.rounds < 1:
        p.error("--shots, --repeats and --rounds must be at least 1")
    configs: dict[str, dict[str, str]] = {"native": {}, "avx2": AVX2_ENV}
    chosen = list(configs) if args.isa == "both" else [args.isa]
    print(f"AnomalyDINO few-shot (K={args.shots}), ViT-S/14, random weights, batch 1 (s/image, best of runs)")
    print(
        f"{'cpu path':<8} {'size':>5} {'project':>9} {'anomalib':>9} {'project/anomalib':>17}"
        f" {'map |diff|':>11} {'score |diff|':>13}"
    )
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="anomalydino_vs_anomalib_") as tmp:
        weights = str(Path(tmp) / "vit_small_patch14_dinov2_random.pt")
        ours_map, theirs_map = str(Path(tmp) / "project.npy"), str(Path(tmp) / "anomalib.npy")
        for name in chosen:
            env = dict(configs[name])
            ours_env = {**env, "ZSI_CPU_ISA": "avx2"} if name == "avx2" else env
            for size in args.sizes:
                common = [str(args.repeats), str(size), str(args.shots), weights]
                ours: list[float] = []
                theirs: list[float] = []
                mine: dict[str, Any] = {}
                other: dict[str, Any] = {}
                for _ in range(args.rounds):
                    mine = _run(sys.executable, _PROJECT_CHILD, [*common, ours_map], ours_env)
                    ours.append(float(mine["best"]))
                    other = _run(args.anomalib_python, _ANOMALIB_CHILD, [*common, theirs_map], env)
                    theirs.append(float(other["best"]))
                a, b = min(ours), min(theirs)
                m_ours, m_theirs = np.load(ours_map), np.load(theirs_map)
                if m_ours.shape != m_theirs.shape:
                    raise SystemExit(f"map shapes differ: project {m_ours.shape}, anomalib {m_theirs.shape}")
                map_diff = float(np.abs(2.0 * m_ours.astype(np.float64) - m_theirs).max())
                score_diff = abs(float(mine["raw_score"]) - float(other["pred_score"]))
                print(
                    f"{name:<8} {size:>5} {a:9.3f} {b:9.3f} {a / b:17.3f} {map_diff:11.2e} {score_diff:13.2e}"
                )
                notes.append(
                    f"{name} {size}: input {mine['input_size']} / {other['input_size']}, bank "
                    f"{mine['bank']} / {other['bank']} patches, threads {mine['threads']} / {other['threads']}, "
                    f"ATen {mine['cpu_capability']} / {other['cpu_capability']} (project / anomalib); "
                    f"raw score {float(mine['raw_score']):.6f}, project score {float(mine['score']):.6f}, "
                    f"anomalib map in [{float(m_theirs.min()):.4f}, {float(m_theirs.max()):.4f}]"
                )
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
