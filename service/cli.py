"""``anomaly-inspect``: the command line of the inspection service.

Subcommands:
    serve               run the HTTP service (uvicorn, app factory ``service.app:create_app``)
    inspect IMAGE...    inspect image files; print scores as JSON lines, write PNG overlays
    weights ...         list / fetch / verify checkpoint files (see ``anomaly-inspect weights -h``)
    train-anomalyclip   train AnomalyCLIP prompts on an auxiliary dataset
    eval DATA_DIR       evaluate a method on MVTec-AD / VisA / your own folders (docs/evaluation.md)
    make-demo-dataset DIR   write a tiny synthetic dataset (MVTec-AD layout) to try eval on
    calibrate PRODUCT   set a product's threshold in a running service from good images (docs/evaluation.md)
    db ...              records database schema: upgrade / current / heads (docs/records.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DEMO_LABEL = "DEMO: tiny random-init model, not a real inspection result"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
#: methods of ``inspect`` and ``eval`` (MuSc scores a batch against itself: the service's stream mode)
CLI_METHODS = ("winclip", "anomalyclip", "saa_plus", "anomalydino")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.demo:
        os.environ["ZSI_DEMO"] = "true"
    if args.methods:
        os.environ["ZSI_METHODS"] = args.methods
    if args.weights_dir:
        os.environ["ZSI_WEIGHTS_DIR"] = str(args.weights_dir)
    if args.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"):
        os.environ["ZSI_LOG_LEVEL"] = args.log_level.upper()
    from service.logs import uvicorn_log_config

    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        log_config=uvicorn_log_config(args.log_level),  # timestamps on every line
    )
    return 0


def _read_image(path: Path) -> Any:
    """``HWC uint8 RGB``, decoded as the service decodes uploads (orientation tags never applied)."""
    from service.errors import ApiError
    from service.imaging import decode_image

    try:
        return decode_image(path.read_bytes(), max_pixels=1_000_000_000, max_bytes=1 << 40, name=str(path))
    except ApiError as exc:
        raise SystemExit(f"error: {path}: not a readable image ({exc.message})") from exc
    except OSError as exc:
        raise SystemExit(f"error: {path}: not a readable image ({exc})") from exc


def _expand(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise SystemExit(f"error: {p}: no such file or directory")
    return out


def _inspect(args: argparse.Namespace) -> int:
    import models
    from models.postprocess import anomaly_map_png, boxes_above, overlay_png
    from prompts import ProductRecipe, builtin_products
    from service.logs import configure_logging

    configure_logging("WARNING")  # stdout is JSON lines; stderr only what matters
    golden = [*(args.reference or []), *(args.references or [])]
    if not args.images:
        swallowed = " ".join(str(p) for p in args.references or [])
        print(
            "error: no image to inspect"
            + (f": --references took every path after it ({swallowed})" if swallowed else "")
            + ". Give one golden image or folder per --reference FILE_OR_DIR, put the images before "
            "--references, or end its list with --, e.g. "
            "`anomaly-inspect inspect --references a.png b.png -- part.png`",
            file=sys.stderr,
        )
        return 2
    product: ProductRecipe | None = None
    if args.product:
        try:
            product = builtin_products()[args.product]
        except KeyError:
            print(
                f"error: unknown product {args.product!r}; known: {', '.join(sorted(builtin_products()))}",
                file=sys.stderr,
            )
            return 2
    method = args.method or (product.default_method if product else None) or "winclip"
    threshold = args.threshold if args.threshold is not None else (product.threshold if product else 0.5)
    try:
        if args.demo:
            det = models.load_tiny_detector(method, device=args.device, precision=args.precision)
        elif args.weights:
            det = models.load_detector(
                method, weights=args.weights, device=args.device, precision=args.precision
            )
        else:
            det = models.load_detector_from_dir(
                method, args.weights_dir, device=args.device, precision=args.precision
            )
    except models.WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not golden and det.requires_references:
        print(
            f"error: method {method!r} compares each image with golden (defect-free) images of the "
            "product: give them with --reference FILE_OR_DIR (repeatable) or --references PATH...",
            file=sys.stderr,
        )
        return 2
    references = None
    if golden:
        refs = [_read_image(p) for p in _expand(golden)]
        if not refs:
            print("error: --reference/--references holds no image", file=sys.stderr)
            return 2
        references = det.encode_references(refs, object_name=args.object_name, product=product)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = DEMO_LABEL if det.random_weights else None
    for path in _expand(args.images):
        image = _read_image(path)
        res = det.predict(image, object_name=args.object_name, product=product, references=references)
        overlay = out_dir / f"{path.stem}.overlay.png"
        overlay.write_bytes(overlay_png(image, res.anomaly_map, res.score, threshold=threshold, label=label))
        record: dict[str, Any] = {
            "file": str(path),
            "score": round(res.score, 6),
            "decision": "anomalous" if res.score >= threshold else "normal",
            "threshold": threshold,
            "method": res.method,
            "model": res.model,
            "weights": res.weights,
            "prompt_digest": res.prompt_digest,
            "used_references": res.used_references,
            "reference_count": references.count if references is not None else 0,
            "overlay": str(overlay),
            "regions": [
                b.as_dict() if hasattr(b, "as_dict") else b for b in boxes_above(res.anomaly_map, threshold)
            ],
        }
        if args.save_map:
            map_path = out_dir / f"{path.stem}.map.png"
            map_path.write_bytes(anomaly_map_png(res.anomaly_map))
            record["map"] = str(map_path)
        if det.random_weights:
            record["demo"] = True
            record["warning"] = DEMO_LABEL
        print(json.dumps(record), flush=True)
    return 0


def _weights(argv: list[str]) -> int:
    from service.fetch import main as fetch_main

    return int(fetch_main(argv) or 0)


def _db(argv: list[str]) -> int:
    from service.records.cli import main as db_main

    return int(db_main(argv) or 0)


def _train_anomalyclip(argv: list[str]) -> int:
    from models.anomalyclip.train import main as train_main

    return int(train_main(argv) or 0)


def _eval(args: argparse.Namespace) -> int:
    """Thin wrapper: options -> :func:`service.evaluation.run_evaluation` (which does the work)."""
    import models
    from service.evaluation import DatasetError, EvalConfig, EvaluationError, run_evaluation

    try:
        if args.demo:
            det = models.load_tiny_detector(args.method, device=args.device, precision=args.precision)
        elif args.weights:
            det = models.load_detector(
                args.method, weights=args.weights, device=args.device, precision=args.precision
            )
        else:
            det = models.load_detector_from_dir(
                args.method, args.weights_dir, device=args.device, precision=args.precision
            )
    except models.WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.references < 1 and det.requires_references:
        print(
            f"error: method {args.method!r} compares each image with golden (defect-free) images: "
            "run with --references N (golden images drawn per category, e.g. 1 or 4)",
            file=sys.stderr,
        )
        return 2
    if det.random_weights:
        print(f"warning: {DEMO_LABEL}", file=sys.stderr)
    cfg = EvalConfig(
        data_dir=args.data_dir,
        out_dir=args.out,
        layout=args.layout,
        categories=tuple(args.categories or ()),
        references=args.references,
        seed=args.seed,
        target_false_reject_rate=args.target_frr,
        calibration_images=args.calibration_images,
        map_size=args.map_size,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        database_url=args.database_url,
    )
    try:
        report = run_evaluation(cfg, det, log=lambda m: print(m, file=sys.stderr))
    except (DatasetError, EvaluationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: scored images are cached under {args.out}/cache; run again to resume",
            file=sys.stderr,
        )
        return 130
    print((args.out / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out / 'report.json'}, {args.out / 'report.md'} and plots", file=sys.stderr)
    return 0 if report else 1


def _make_demo_dataset(args: argparse.Namespace) -> int:
    from service.evaluation import make_demo_dataset

    cats = make_demo_dataset(
        args.dir,
        train=args.train,
        test_good=args.test_good,
        test_defect=args.test_defect,
        size=args.size,
        seed=args.seed,
    )
    print(f"wrote {', '.join(cats)} (MVTec-AD layout, synthetic) under {args.dir}")
    return 0


def _multipart(fields: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request: (field, file name or '', data, type)."""
    import uuid

    boundary = f"zsi-{uuid.uuid4().hex}"
    parts = []
    for name, filename, data, ctype in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n"
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _http_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int, bytes]:
    """POST with the standard library; (status, body) for HTTP errors too."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def _calibrate(args: argparse.Namespace) -> int:
    """Thin wrapper: options -> POST /products/{id}/calibrate of a running service; prints its answer."""
    import mimetypes
    import urllib.error
    import urllib.parse

    config: dict[str, Any] = {"target_false_reject_rate": args.target_frr}
    if args.confidence is not None:
        config["confidence"] = args.confidence
    if args.method:
        config["method"] = args.method
    if args.include_reviewed:
        config["include_reviewed"] = True
    if args.no_golden:
        config["use_golden"] = False
    files = [("good", p) for p in _expand(args.good or [])] + [
        ("defect", p) for p in _expand(args.defect or [])
    ]
    headers = {"Accept": "application/json"}
    api_key = args.api_key or os.environ.get("ZSI_API_KEY")
    if api_key:
        headers["X-API-Key"] = api_key
    if files:
        fields = [("config", "", json.dumps(config).encode(), "application/json")]
        for name, path in files:
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            fields.append((name, path.name, path.read_bytes(), ctype))
        body, headers["Content-Type"] = _multipart(fields)
    else:
        body, headers["Content-Type"] = json.dumps(config).encode(), "application/json"
    url = f"{args.url.rstrip('/')}/products/{urllib.parse.quote(args.product, safe='')}/calibrate"
    try:
        status, answer = _http_post(url, body, headers, args.timeout)
    except (urllib.error.URLError, OSError) as exc:
        print(
            f"error: no answer from {args.url} ({exc}); is the service running (anomaly-inspect serve)?",
            file=sys.stderr,
        )
        return 2
    try:
        doc = json.loads(answer)
    except ValueError:
        print(f"error: HTTP {status} from {url}: {answer[:300]!r}", file=sys.stderr)
        return 1
    if status != 200:
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
        print(f"error: HTTP {status} {err.get('code', '')}: {err.get('message', doc)}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2))
    cal = doc["calibration"]
    demo = " (DEMO: random-init model, not a real threshold)" if cal.get("random_weights") else ""
    print(
        f"{args.product}: threshold {doc['threshold']!r} from {cal['n']} good scores ({cal['bound']} bound, "
        f"false-reject rate <= {cal['target_false_reject_rate']:g}){demo}",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service")
    s.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in containers)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes (each loads its own models)"
    )
    s.add_argument("--methods", help="comma list of methods to load (sets ZSI_METHODS)")
    s.add_argument("--weights-dir", type=Path, help="weights directory (sets ZSI_WEIGHTS_DIR)")
    s.add_argument(
        "--demo", action="store_true", help="tiny random-init models, every response labelled demo"
    )
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=_serve)

    i = sub.add_parser(
        "inspect",
        help="inspect image files",
        description="Inspect image files; golden images (WinCLIP+ few-shot, AnomalyDINO): --reference FILE_OR_DIR, "
        "once per file or folder, e.g. `inspect part.png --reference golden/` or "
        "`inspect --reference a.png --reference b.png part.png`.",
    )
    i.add_argument("images", nargs="*", type=Path, help="image files or folders")
    i.add_argument(
        "--method",
        choices=list(CLI_METHODS),
        help="default: the product's, else winclip; anomalydino needs --reference",
    )
    i.add_argument("--product", help="built-in product id (e.g. bottle, pcb1)")
    i.add_argument("--object-name", help="object name for the prompts (overrides the product's)")
    i.add_argument(
        "--reference",
        action="append",
        type=Path,
        metavar="FILE_OR_DIR",
        help="a golden (normal) image, or a folder of them: WinCLIP+ few-shot, AnomalyDINO; repeat for more",
    )
    i.add_argument(
        "--references",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="several golden images or folders at once; takes EVERY path after it, so put the images "
        "first or end the list with --",
    )
    i.add_argument("--threshold", type=float, help="decision threshold (default: the product's, else 0.5)")
    i.add_argument("--weights", type=Path, help="a checkpoint file (default: look in --weights-dir)")
    i.add_argument("--weights-dir", type=Path, default=Path(os.environ.get("ZSI_WEIGHTS_DIR", "weights")))
    i.add_argument("--device", default="cpu")
    i.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    i.add_argument("--demo", action="store_true", help="tiny random-init model (output labelled DEMO)")
    i.add_argument("--out", default="out", help="folder for overlays (default ./out)")
    i.add_argument("--save-map", action="store_true", help="also write the 8-bit anomaly map PNG")
    i.set_defaults(func=_inspect)

    e = sub.add_parser("eval", help="evaluate a method on a dataset (docs/evaluation.md)")
    e.add_argument(
        "data_dir",
        type=Path,
        help="dataset root (MVTec-AD, VisA or good/ + defect/ folders); --layout records: the service's "
        "ZSI_DATA_DIR",
    )
    e.add_argument(
        "--layout",
        choices=["mvtec", "visa", "folder", "records"],
        help="default: detected (mvtec, visa or folder); records: the inspection records an operator "
        "reviewed, with kept images, one category per product",
    )
    e.add_argument(
        "--database-url",
        default=os.environ.get("ZSI_DATABASE_URL"),
        help="--layout records: the records database (default: $ZSI_DATABASE_URL, else the SQLite file "
        "under DATA_DIR)",
    )
    e.add_argument(
        "--method",
        default="winclip",
        choices=list(CLI_METHODS),
        help="default winclip; anomalydino needs --references N (golden images per category)",
    )
    e.add_argument("--categories", nargs="+", help="only these categories (default: all)")
    e.add_argument(
        "--references",
        type=int,
        default=0,
        help="golden images per category (few-shot: winclip, anomalydino)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the golden/calibration draw (default 0)")
    e.add_argument("--target-frr", type=float, default=0.01, help="target false-reject rate (default 0.01)")
    e.add_argument("--calibration-images", type=int, default=100, help="good images to calibrate on (max)")
    e.add_argument("--map-size", type=int, default=256, help="side of maps and masks for pixel metrics")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--out", type=Path, default=Path("eval-out"), help="report folder (and cache)")
    e.add_argument("--weights", type=Path, help="a checkpoint file (default: look in --weights-dir)")
    e.add_argument("--weights-dir", type=Path, default=Path(os.environ.get("ZSI_WEIGHTS_DIR", "weights")))
    e.add_argument("--device", default="cpu")
    e.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    e.add_argument("--demo", action="store_true", help="tiny random-init model (every output labelled DEMO)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)

    d = sub.add_parser("make-demo-dataset", help="write a tiny synthetic dataset (MVTec-AD layout)")
    d.add_argument("dir", type=Path)
    d.add_argument("--train", type=int, default=120, help="train good images per category")
    d.add_argument("--test-good", type=int, default=10)
    d.add_argument("--test-defect", type=int, default=12)
    d.add_argument("--size", type=int, default=128, help="image side in pixels")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_make_demo_dataset)

    c = sub.add_parser(
        "calibrate",
        help="set a product's threshold in a running service from good images",
        description="POST /products/PRODUCT/calibrate to a running service: it scores the product's golden "
        "images leave-one-out (plus the images given here, plus reviewed records with --include-reviewed) "
        "and sets the product's threshold at the target false-reject rate (docs/evaluation.md).",
    )
    c.add_argument("product", help="product id")
    c.add_argument("--url", default=os.environ.get("ZSI_URL", "http://127.0.0.1:8000"), help="the service")
    c.add_argument("--api-key", help="X-API-Key (default: $ZSI_API_KEY)")
    c.add_argument("--target-frr", type=float, default=0.01, help="target false-reject rate (default 0.01)")
    c.add_argument("--confidence", type=float, help="PAC variant: confidence in (0, 1), e.g. 0.9")
    c.add_argument("--method", help="method to calibrate (default: the product's)")
    c.add_argument(
        "--good", action="append", type=Path, metavar="FILE_OR_DIR", help="extra good images; repeatable"
    )
    c.add_argument(
        "--defect",
        action="append",
        type=Path,
        metavar="FILE_OR_DIR",
        help="labelled defect images: the answer gives the recall at the new threshold; repeatable",
    )
    c.add_argument(
        "--include-reviewed", action="store_true", help="also use records an operator judged good / defect"
    )
    c.add_argument("--no-golden", action="store_true", help="do not score the product's golden images")
    c.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    c.set_defaults(func=_calibrate)

    sub.add_parser(
        "weights", help="list / fetch / verify checkpoints (anomaly-inspect weights -h)", add_help=False
    )
    sub.add_parser("db", help="records database schema (anomaly-inspect db -h)", add_help=False)
    sub.add_parser(
        "train-anomalyclip",
        help="train AnomalyCLIP prompts (anomaly-inspect train-anomalyclip -h)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "weights":
        return _weights(argv[1:])
    if argv and argv[0] == "train-anomalyclip":
        return _train_anomalyclip(argv[1:])
    if argv and argv[0] == "db":
        return _db(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
