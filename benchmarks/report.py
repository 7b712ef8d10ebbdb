"""The benchmark's results as files: results.json (everything), results.md (the table), latency.png.

The Markdown table follows the Hugging Face DeiT SDPA table (batch size, median ms per backend,
speedup over eager) and adds each backend's top-1 agreement with the reference, so that a fast but
wrong backend is visible as wrong right beside its latency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.harness import CONTENDED
from runtime.artifact import atomic_path, write_json

BASELINE = "torch-eager"
FILES = {"json": "results.json", "markdown": "results.md", "plot": "latency.png"}


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the three files (each atomically) and return their paths."""
    out = Path(out_dir)
    paths = {kind: out / name for kind, name in FILES.items()}
    write_json(paths["json"], results)
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown(results))
    with atomic_path(paths["plot"]) as tmp:
        plot(results, tmp)
    return paths


def ok_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in results["backends"] if row["status"] == "ok"]


def markdown(results: dict[str, Any]) -> str:
    model, env, settings = results["model"], results["environment"], results["settings"]
    rows = ok_rows(results)
    weights = "SYNTHETIC (random) weights" if model["synthetic"] else f"{model['weights']} weights"
    lines = [f"# Benchmark: {Path(model['checkpoint']).name} ({weights})", ""]
    if results.get("warning"):
        lines += [f"> {results['warning']}", ""]
    gpu = env["gpu"] or "no GPU"
    lines += [
        f"CPU: {env['cpu']} ({env['cpu_cores_usable']} usable cores, {env['threads']} threads per backend); {gpu}. "
        f"Median of >= {settings['min_iters']} runs and >= {settings['min_time_s']} s after {settings['warmup']} warm-up runs, "
        f"inputs rotated among {settings['buffers']} buffers.",
        "",
    ]
    if rows:
        lines += _latency_table(rows) + [""]
        lines += _correctness_table(results, rows) + [""]
        lines += _detail_table(rows) + [""]
    if results.get("end_to_end"):
        lines += _end_to_end_table(results["end_to_end"]) + [""]
    skipped = [row for row in results["backends"] if row["status"] != "ok"]
    if skipped:
        lines += ["Not measured here:", ""]
        lines += [f"- `{row['label']}` ({row['status']}): {row['reason']}" for row in skipped]
        lines.append("")
    return "\n".join(lines)


def _latency_table(rows: list[dict[str, Any]]) -> list[str]:
    base = next((row for row in rows if row["label"] == BASELINE), None)
    base_ms = {t["batch_size"]: t["median_ms"] for t in base["timings"]} if base else {}
    title = f"Median latency, ms (speedup over {BASELINE})" if base else "Median latency, ms"
    lines = [title, "", "| Batch size | " + " | ".join(_header(row) for row in rows) + " |", "| --- " * (len(rows) + 1) + "|"]
    for i, batch in enumerate(t["batch_size"] for t in rows[0]["timings"]):
        cells = []
        for row in rows:
            ms = row["timings"][i]["median_ms"]
            cell = f"{ms:.1f} ({base_ms[batch] / ms:.2f}x)" if batch in base_ms else f"{ms:.1f}"
            cells.append(cell + (" †" if contended(row["timings"][i]) else ""))
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    lines.append("| top-1 agreement | " + " | ".join(_agreement_cell(row) for row in rows) + " |")
    if any(contended(t) for row in rows for t in row["timings"]):
        lines += ["", f"† other processes kept more than {CONTENDED} cores busy while this cell was measured: "
                      "the number is suspect; measure again on a quiet machine."]
    return lines


def contended(timing: dict[str, Any]) -> bool:
    return (timing.get("other_load_cores") or 0.0) > CONTENDED


def _header(row: dict[str, Any]) -> str:
    return row["label"] if row["precision"] in (None, "fp32") or row["label"].endswith(row["precision"]) else f"{row['label']} ({row['precision']})"


def _agreement_cell(row: dict[str, Any]) -> str:
    agreement = row.get("agreement")
    if agreement is None:
        return "n/a"
    cell = f"{agreement['top1_agreement']:.0%}"
    return f"**{cell} WRONG**" if agreement["flagged"] else cell


def _correctness_table(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    batch = results["settings"]["agreement_batch"]
    lines = [
        f"Outputs vs the fp32 reference (`{results['settings']['reference']}`) on one shared batch "
        f"({batch['random']} random tensors + {batch['photos']} photos); flagged below "
        f"{results['settings']['min_agreement']:.0%} top-1 agreement.",
        "",
        "| Backend | Precision | Threads | Clock | Top-1 agreement | Max abs diff | Min cosine |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        a = row.get("agreement") or {}
        lines.append(
            f"| {row['label']} | {row['precision']} | {row.get('threads')} | {row['clock']} | {_agreement_cell(row)} | "
            f"{a.get('max_abs_diff', float('nan')):.2e} | {a.get('min_cosine', float('nan')):.5f} |"
        )
    return lines


def _detail_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| Backend | Batch | Median ms | p90 ms | p99 ms | Images/s | Runs | Other load (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for t in row["timings"]:
            lines.append(
                f"| {row['label']} | {t['batch_size']} | {t['median_ms']:.2f} | {t['p90_ms']:.2f} | {t['p99_ms']:.2f} | "
                f"{t['images_per_s']:.1f} | {t['iterations']} | {t.get('other_load_cores')} |"
            )
    return lines


def _end_to_end_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "End to end: `runtime.classify` on a folder of photos (decode + preprocess + infer), against the model alone "
        "on the same decoded images; best of the passes.",
        "",
        "| Backend | Photos | Batch | Decode workers | Model only, images/s | End to end, images/s | Ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | {row['status']}: {row['reason']} | | | | | |")
            continue
        lines.append(
            f"| {row['label']} | {row['decoded']} | {row['batch_size']} | {row['decode_workers']} | "
            f"{row['model_only_images_per_s']:.1f} | {row['end_to_end_images_per_s']:.1f} | {row['end_to_end_ratio']:.0%} |"
        )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency (median, bars to p90) and throughput against batch size, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.5))
    for row in ok_rows(results):
        batches = [t["batch_size"] for t in row["timings"]]
        median = [t["median_ms"] for t in row["timings"]]
        upper = [t["p90_ms"] - t["median_ms"] for t in row["timings"]]
        flagged = (row.get("agreement") or {}).get("flagged", False)
        label = f"{row['label']} (WRONG outputs)" if flagged else row["label"]
        style = "--" if flagged else "-"
        lat.errorbar(batches, median, yerr=[[0] * len(upper), upper], marker="o", linestyle=style, capsize=3, label=label)
        thr.plot(batches, [t["images_per_s"] for t in row["timings"]], marker="o", linestyle=style, label=label)
    model = results["model"]
    title = Path(model["checkpoint"]).name + (" (SYNTHETIC weights)" if model["synthetic"] else "")
    for ax, ylabel in ((lat, "median latency, ms (bar: p90)"), (thr, "throughput, images/s")):
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["settings"]["batch_sizes"], [str(b) for b in results["settings"]["batch_sizes"]])
        ax.grid(True, alpha=0.3)
    lat.set_yscale("log")
    lat.legend(fontsize=8)
    fig.suptitle(f"{title}: {results['environment']['cpu']}, {results['environment']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
