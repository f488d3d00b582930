"""WinCLIP s/image: this project vs anomalib 2.7's ``WinClipModel``, on this CPU and on its AVX2 path.

Issue 10 asks that on every CPU the project be at least as fast as anomalib. anomalib 2.7's
WinCLIP is only correct with open_clip_torch 2.24 (docs/DEPENDENCIES), which cannot share
a virtualenv with this project (open_clip 3.3), so anomalib runs in a child process of a
second virtualenv that you make once (torch comes from the same wheels)::

    python3 -m venv /tmp/anovenv
    /tmp/anovenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/anovenv/bin/pip install anomalib==2.7.0 open_clip_torch==2.24.0
    .venv/bin/python benchmarks/winclip_vs_anomalib.py --anomalib-python /tmp/anovenv/bin/python

Both run the REAL architecture (ViT-B-16-plus-240, zero-shot, batch 1, a 240x240 image so
that neither side resizes) on random weights (timing only; scores mean nothing), with the
same torch thread count. Each configuration is measured twice, interleaved (ours, anomalib,
ours, anomalib), and the best of the repeats is kept. ``--isa avx2`` (default: both) also
runs both sides with oneDNN and ATen limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``; the project also gets ``ZSI_CPU_ISA=avx2``), the closest this
machine comes to an AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._children import AVX2_ENV, run_child  # noqa: E402

#: timed in the anomalib virtualenv; prints one JSON line
_ANOMALIB_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch, open_clip
    _create = open_clip.create_model_and_transforms
    def _random_init(name, pretrained=None, **kw):  # no download: random weights, seeded
        torch.manual_seed(0)
        return _create(name, pretrained=None, **kw)
    open_clip.create_model_and_transforms = _random_init
    from anomalib.models.image.winclip.torch_model import WinClipModel
    repeats = int(sys.argv[1])
    model = WinClipModel().eval()
    model.setup("bottle")
    x = torch.randn(1, 3, 240, 240)
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"best": min(times), "all": times, "threads": torch.get_num_threads()}))
    """
)

#: timed in this project's virtualenv; prints one JSON line
_PROJECT_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    import models
    repeats = int(sys.argv[1])
    det = models.load_detector("winclip", weights=models.RANDOM_INIT, device="cpu")
    img = np.random.default_rng(0).integers(0, 256, (240, 240, 3), dtype=np.uint8)
    det.predict(img, object_name="bottle")  # warm-up (and text prototypes, cached)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        det.predict(img, object_name="bottle")
        times.append(time.perf_counter() - t0)
    d = det.describe()
    print(json.dumps({"best": min(times), "all": times, "threads": torch.get_num_threads(),
                      "kernels": d.get("kernels"), "cpu_isa": d.get("cpu_isa")}))
    """
)


def _run(python: str, code: str, repeats: int, env: dict[str, str]) -> dict[str, object]:
    return run_child(python, code, [str(repeats)], {"PYTHONPATH": str(ROOT), **env}, ROOT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--anomalib-python", required=True, help="python of a virtualenv with anomalib 2.7")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes per run (best kept)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs per side and configuration")
    p.add_argument("--isa", choices=["native", "avx2", "both"], default="both")
    args = p.parse_args(argv)
    configs = {"native": {}, "avx2": AVX2_ENV}
    chosen = list(configs) if args.isa == "both" else [args.isa]
    print("WinCLIP zero-shot, ViT-B-16-plus-240, random weights, batch 1, 240x240 (s/image, best of runs)")
    print(f"{'cpu path':<8} {'project':>9} {'anomalib':>9} {'project/anomalib':>17}  project kernels")
    for name in chosen:
        env = dict(configs[name])
        ours_env = {**env, "ZSI_CPU_ISA": "avx2"} if name == "avx2" else env
        ours: list[float] = []
        theirs: list[float] = []
        info: dict[str, object] = {}
        for _ in range(args.rounds):
            info = _run(sys.executable, _PROJECT_CHILD, args.repeats, ours_env)
            ours.append(float(info["best"]))  # type: ignore[arg-type]
            theirs.append(float(_run(args.anomalib_python, _ANOMALIB_CHILD, args.repeats, env)["best"]))  # type: ignore[arg-type]
        a, b = min(ours), min(theirs)
        print(f"{name:<8} {a:9.3f} {b:9.3f} {a / b:17.3f}  {info.get('kernels')} ({info.get('cpu_isa')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
