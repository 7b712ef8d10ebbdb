"""`python -m export`: export a DeiT checkpoint to a verified artifact folder.

Exit status (the README's table): 0 exported, 2 usage, 3 Hub unreachable (try --weights synthetic),
4 verification failed (nothing written), 5 bad checkpoint, 7 export failed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from export.pipeline import ExportOptions, export_checkpoint
from runtime.artifact import SYNTHETIC_WARNING
from runtime.errors import ArgumentParser, run_cli


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m export", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default="facebook/deit-base-distilled-patch16-224", help="hub id or local save_pretrained folder")
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="artifact root (a folder per model is made inside)")
    p.add_argument("--weights", choices=["pretrained", "synthetic"], default="pretrained",
                   help="synthetic: random weights of the published architecture (offline; not a classifier)")
    p.add_argument("--task", choices=["classification", "features"], default="classification")
    p.add_argument("--attention", choices=["fused", "decomposed"], default="fused",
                   help="fused: opset-23 ONNX Attention op; decomposed: opset-18 MatMul/Softmax (TensorRT < 10.14)")
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip model.fp16.onnx")
    p.add_argument("--no-ort-graph", dest="ort_graph", action="store_false",
                   help="skip model.ort.onnx / model.ort.fp16.onnx (ONNX Runtime's fused-op graph for ort-cuda)")
    p.add_argument("--verify-images", type=Path, help="folder of photos to verify on, besides random tensors")
    p.add_argument("--verify-limit", type=int, default=32, help="at most this many photos (default 32)")
    p.add_argument("--name", help="artifact folder name (default: the checkpoint's name)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.verify_images is not None and not args.verify_images.is_dir():
        p.error(f"--verify-images {args.verify_images}: no such folder")
    if args.verify_limit < 0:
        p.error("--verify-limit must be at least 0")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        p.error(f"--name {args.name!r}: a plain folder name, not a path or a hidden name")

    def work() -> int:
        report = export_checkpoint(ExportOptions(
            source=args.model, out_root=args.out, weights=args.weights, task=args.task, attention=args.attention,
            fp16=args.fp16, ort_graph=args.ort_graph, verify_images=args.verify_images, verify_limit=args.verify_limit, name=args.name,
            progress=args.progress,
        ))
        print_report(report)
        return 0

    return run_cli("export", work, entry=argv is None)


def print_report(report: dict[str, Any]) -> None:
    if report["weights"] == "synthetic":
        print(SYNTHETIC_WARNING, file=sys.stderr)
    for warning in report.get("warnings", []):
        print(f"export: warning: {warning}", file=sys.stderr)
    print(f"exported {report['checkpoint']} ({report['architecture']}, {report['weights']} weights) -> {report['artifact_dir']}")
    for name, info in report["files"].items():
        print(f"  {name:22s} {info['bytes'] / 2**20:8.1f} MiB")
    print(f"  attention: {report['attention']} (opset {report['opset']}), ops: {report['ops']}")
    for check, r in report["verification"].items():
        print(f"  {check}: max |diff| {r['max_abs_diff']:.2e}, top-1 agreement {r['top1_agreement']:.1%}, "
              f"min cosine {r['min_cosine']:.6f} on {r['samples']} inputs ({r['photos']} photos)")
    print(f"  time: {report['timings_s']['total']:.1f} s  {report['timings_s']}")
    if report["removed_stale"]:
        print(f"  removed files built from the previous model: {', '.join(report['removed_stale'])}")


if __name__ == "__main__":
    sys.exit(main())
