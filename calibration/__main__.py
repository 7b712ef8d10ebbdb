"""`python -m calibration`: photos -> int8 Q/DQ model beside model.onnx, accuracy measured and gated.

Exit status (the README's table): 0 written, 2 usage (bad flag, no usable photos), 4 accuracy gate failed
(nothing written), 5 bad artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from calibration.pipeline import DEFAULT_METHOD, CalibrationOptions, calibrate
from calibration.quantize import METHODS
from runtime.artifact import SYNTHETIC_WARNING, find_artifact
from runtime.errors import ArgumentParser, GateFailed, run_cli


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m calibration", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", help="artifact folder (default: the newest under artifacts/)")
    p.add_argument("--calib-dir", type=Path, required=True,
                   help="ImageNet train-style (wnid folders), val-style (+ labels file), wnid-named files, or any photos")
    p.add_argument("--eval-dir", type=Path, help="evaluation photos (default: --calib-dir minus the calibration images)")
    p.add_argument("--labels", type=Path, help="labels file for a flat eval folder: `name wnid|index` per line")
    p.add_argument("--num-images", type=int, default=512, help="calibration images (default 512, class-balanced)")
    p.add_argument("--num-eval", type=int, default=500, help="evaluation images (default 500)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help=f"calibration method (default {DEFAULT_METHOD})")
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile (default 99.99)")
    p.add_argument("--compare-methods", action="store_true", help="also evaluate every method and record the comparison")
    p.add_argument("--attention-qdq", action="store_true", help="fused Attention graphs: also put Q/DQ on q, k, v")
    p.add_argument("--no-cpu-variant", dest="cpu_variant", action="store_false", help="skip model.int8-cpu.onnx")
    p.add_argument("--min-agreement", type=float, default=0.99, help="fail below this top-1 agreement with fp32 (default 0.99)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, help="where preprocessed tensors are cached (default <model>/.calib-cache)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="decode every image, cache nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for flag, value in (("--num-images", args.num_images), ("--num-eval", args.num_eval)):
        if value < 1:
            p.error(f"{flag} must be at least 1")
    if not 0.0 <= args.min_agreement <= 1.0:
        p.error(f"--min-agreement {args.min_agreement}: a fraction between 0 and 1 (0.99 = 99%)")
    if not 0.0 < args.percentile <= 100.0:
        p.error(f"--percentile {args.percentile}: must be in (0, 100]")
    for flag, folder in (("--calib-dir", args.calib_dir), ("--eval-dir", args.eval_dir)):
        if folder is not None and not folder.is_dir():
            p.error(f"{flag} {folder}: no such folder")

    def work() -> int:
        report = calibrate(CalibrationOptions(
            artifact_dir=find_artifact(args.model), calib_dir=args.calib_dir, eval_dir=args.eval_dir,
            labels_file=args.labels, num_images=args.num_images, num_eval=args.num_eval, method=args.method,
            percentile=args.percentile, attention_qdq=args.attention_qdq, compare_methods=args.compare_methods,
            cpu_variant=args.cpu_variant, min_agreement=args.min_agreement, seed=args.seed, cache_dir=args.cache_dir,
            cache=args.cache, progress=args.progress,
        ))
        print_report(report)
        if not report["passed"]:
            raise GateFailed(f"accuracy gate failed ({'; '.join(report['gate']['failures'])}); nothing written")
        return 0

    return run_cli("calibration", work, entry=argv is None)


def print_report(report: dict[str, Any]) -> None:
    if report["weights"] == "synthetic":
        print(SYNTHETIC_WARNING, file=sys.stderr)
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    c, e = report["calibration_images"], report["evaluation_images"]
    print(f"calibrated {report['artifact_dir']} ({report['weights']} weights, {report['attention']} attention), "
          f"method {report['method']}, Q/DQ {report['placement']}")
    for name, info in (("calibration", c), ("evaluation", e)):
        cached = ", from cache" if info["from_cache"] else ""
        print(f"  {name}: {info['used']}/{info['requested']} images, {info['classes']} classes from {info['dir']}{cached}")
        if info["skipped"]:
            print(f"    skipped {len(info['skipped'])} unreadable: " + "; ".join(f"{k} ({v})" for k, v in list(info["skipped"].items())[:5]))
    s = report["scales"]["summary"]
    print(f"  activation amax over {s['count']} tensors: min {s['min']:.3g}, median {s['median']:.3g}, max {s['max']:.3g}")
    rows = dict(report["accuracy"])
    if report["method_comparison"]:
        rows |= {f"  method {m}": r for m, r in report["method_comparison"].items()}
    for name, acc in rows.items():
        line = f"  {name:22s} agreement {acc['top1_agreement']:.2%}  mean KL {acc['mean_kl']:.2e}"
        if "int8_top1" in acc:
            line += f"  top-1 {acc['fp32_top1']:.2%} -> {acc['int8_top1']:.2%}  top-5 {acc['fp32_top5']:.2%} -> {acc['int8_top5']:.2%}"
        print(line)
    gate = report["gate"]
    print(f"  gate: agreement >= {gate['min_agreement']:.2%}: " + (f"not applied ({gate['not_applied_because']})"
          if not gate["applied"] else "passed" if not gate["failures"] else "FAILED"))
    if report.get("files"):
        print(f"  wrote {', '.join(report['files'])}")
    print(f"  time: {report['timings_s']}")


if __name__ == "__main__":
    sys.exit(main())
