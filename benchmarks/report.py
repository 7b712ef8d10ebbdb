"""The benchmark's results as files: results.json (everything), results.md (the tables), latency.png.

The Markdown follows the Hugging Face DeiT SDPA table (batch size, median ms per backend, speed-up
over eager) with one table per clock, since a CUDA-event time and a host-clock time are not the same
measurement; each table adds the backends' top-1 agreement with the reference, so a fast but wrong
backend is visible as wrong right beside its latency. On a CPU each cell also says how many GFLOP/s
the model achieved and what share of the best MatMul ceiling measured in the same run that is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.artifact import SYNTHETIC_WARNING, atomic_path, write_json
from runtime.backends.timing import CONTENDED

BASELINE = "torch-eager"
FILES = {"json": "results.json", "markdown": "results.md", "plot": "latency.png"}
CLOCKS = {
    "cuda-events": "GPU, CUDA events around runs on a device-resident input (no host copies)",
    "host": "host clock (time.perf_counter) around each run, inputs copied in and outputs out",
}
# The transformers docs' DeiT table (deit-base-distilled, A100-40GB, fp32, PyTorch 2.3), for context.
HF_DOCS_A100 = "transformers docs, deit-base-distilled, A100-40GB fp32, PyTorch 2.3: eager 8/9/9/8 ms, SDPA 6/6/6/6 ms at batch 1/2/4/8"


def publish(results: dict[str, Any], out_dir: str | Path, files: dict[str, str],
            to_markdown: Callable[[dict[str, Any]], str]) -> int:
    """A benchmark's last step: its report written, its table printed, and synthetic weights said on stderr
    (their timings stand, their answers do not)."""
    write_report(results, out_dir, files, to_markdown)
    print(to_markdown(results))
    if results["synthetic"]:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    return 0


def write_report(results: dict[str, Any], out_dir: str | Path, files: dict[str, str] = FILES,
                 to_markdown: Callable[[dict[str, Any]], str] | None = None,
                 to_plot: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Path]:
    """Write the json, markdown and (when `files` names one) plot files, each atomically, and return their
    paths; other benchmarks pass their own file names and writers."""
    out = Path(out_dir)
    paths = {kind: out / name for kind, name in files.items()}
    write_json(paths["json"], results)
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text((to_markdown or markdown)(results))
    if "plot" in paths:
        with atomic_path(paths["plot"]) as tmp:
            (to_plot or plot)(results, tmp)
    return paths


def ok_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in results["backends"] if row["status"] == "ok"]


def by_clock(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["clock"], []).append(row)
    return groups


def contended(timing: dict[str, Any]) -> bool:
    return (timing.get("other_load_cores") or 0.0) > CONTENDED


def markdown(results: dict[str, Any]) -> str:
    model, env, settings = results["model"], results["environment"], results["settings"]
    rows = ok_rows(results)
    weights = "SYNTHETIC (random) weights" if model["synthetic"] else f"{model['weights']} weights"
    lines = [f"# Benchmark: {Path(model['checkpoint']).name} ({weights})", ""]
    if results.get("warning"):
        lines += [f"> {results['warning']}", ""]
    if results.get("interrupted"):
        lines += [f"> Interrupted ({results['interrupted']}): only the rows that finished are here.", ""]
    gpu = env["gpu"] or "no GPU"
    features = ", ".join(env.get("cpu_features", [])) or "none reported"
    lines += [
        f"CPU: {env['cpu']} ({features}; {env['cpu_cores_usable']} usable cores, {env['threads']} threads per CPU backend); "
        f"GPU: {gpu}. Median of >= {settings['min_iters']} runs and >= {settings['min_time_s']} s after "
        f"{settings['warmup']} warm-up runs. fp32 on a GPU runs with TF32 off.",
        "",
    ]
    for clock, group in by_clock(rows).items():
        lines += _latency_table(group, clock, results.get("cpu_efficiency", {})) + [""]
        if clock == "cuda-events":
            lines += [f"`{row['label']}`: {row['timing_note']}." for row in group if row.get("timing_note")]
            lines += [f"Reference ({HF_DOCS_A100}).", ""]
    if rows:
        lines += _correctness_table(results, rows) + [""]
        lines += _detail_table(rows) + [""]
    if results.get("cpu_ceilings"):
        lines += _ceiling_table(results) + [""]
    if results.get("auto"):
        lines += _auto_lines(results["auto"]) + [""]
    if results.get("end_to_end"):
        lines += _end_to_end_table(results["end_to_end"]) + [""]
    skipped = [row for row in results["backends"] if row["status"] != "ok"]
    if skipped:
        lines += ["Not measured here:", ""]
        lines += [f"- `{row['label']}` ({row['status']}): {row['reason']}" for row in skipped]
        lines.append("")
    if results.get("reference_note"):
        lines += [f"Note: {results['reference_note']}", ""]
    return "\n".join(lines)


def _latency_table(rows: list[dict[str, Any]], clock: str, efficiency: dict[str, Any]) -> list[str]:
    base = next((row for row in rows if row["label"] == BASELINE), rows[0])
    base_ms = {t["batch_size"]: t["median_ms"] for t in base["timings"]}
    lines = [f"Median latency, ms, {CLOCKS.get(clock, clock)} (speed-up over {base['label']})", "",
             "| Batch size | " + " | ".join(_header(row) for row in rows) + " |", "| --- " * (len(rows) + 1) + "|"]
    for i, batch in enumerate(t["batch_size"] for t in rows[0]["timings"]):
        cells = []
        for row in rows:
            t = row["timings"][i]
            cell = f"{t['median_ms']:.2f} ({base_ms[batch] / t['median_ms']:.2f}x)" if batch in base_ms else f"{t['median_ms']:.2f}"
            share = efficiency.get(row["label"], {}).get(str(batch))
            if share is not None:
                cell += f" {share['gflops']:.0f} GFLOP/s, {share['share_of_ceiling']:.0%}"
            cells.append(cell + (" †" if contended(t) else ""))
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    if any("timings_with_copies" in row for row in rows):
        lines.append("| with copies, batch " + "/".join(str(t["batch_size"]) for t in rows[0]["timings"]) + " | "
                     + " | ".join("/".join(f"{t['median_ms']:.2f}" for t in row.get("timings_with_copies", [])) or "n/a"
                                  for row in rows) + " |")
    lines.append("| top-1 agreement | " + " | ".join(_agreement_cell(row) for row in rows) + " |")
    if any(contended(t) for row in rows for t in row["timings"]):
        lines += ["", f"† other processes kept more than {CONTENDED} cores busy while this cell was measured: "
                      "the number is suspect; measure again on a quiet machine."]
    return lines


def _header(row: dict[str, Any]) -> str:
    label = row["label"]
    return label if row["precision"] in (None, "fp32") or label.endswith(row["precision"]) else f"{label} ({row['precision']})"


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
        "| Backend | Precision | Device | Threads | File | Clock | Top-1 agreement | Max abs diff | Min cosine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        a = row.get("agreement") or {}
        lines.append(
            f"| {row['label']} | {row['precision']} | {row.get('device')} | {row.get('threads')} | {row.get('model_file')} | "
            f"{row['clock']} | {_agreement_cell(row)} | {a.get('max_abs_diff', float('nan')):.2e} | "
            f"{a.get('min_cosine', float('nan')):.5f} |"
        )
    notes = [f"- `{row['label']}`: {note}" for row in rows for note in row.get("notes", [])]
    return lines + ([""] + notes if notes else [])


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


def _ceiling_table(results: dict[str, Any]) -> list[str]:
    lines = ["MatMul ceilings of this CPU, measured in the same run (what each engine's GEMM reaches alone):", "",
             "| Engine | Type | Size | GFLOP/s (GOP/s for int8) |", "| --- | --- | --- | --- |"]
    for c in results["cpu_ceilings"]["entries"]:
        lines.append(f"| {c['engine']} | {c['dtype']} | {c['size']} | {c['gflops']:.0f} |")
    for note in results["cpu_ceilings"].get("notes", []):
        lines.append(f"\n{note}")
    return lines


def _auto_lines(auto: list[dict[str, Any]]) -> list[str]:
    lines = ["What `--backend auto` picks here, per batch size, against the fastest fp32 row of the table:", ""]
    for a in auto:
        lines.append(f"- batch {a['batch_size']}: {a['picked']} ({a.get('verdict', '')})")
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
    """Latency (median, bars to p90), throughput and (on a CPU) achieved GFLOP/s against batch size, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    efficiency = results.get("cpu_efficiency", {})
    panels = 3 if efficiency else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5))
    lat, thr = axes[0], axes[1]
    for row in ok_rows(results):
        batches = [t["batch_size"] for t in row["timings"]]
        median = [t["median_ms"] for t in row["timings"]]
        upper = [t["p90_ms"] - t["median_ms"] for t in row["timings"]]
        flagged = (row.get("agreement") or {}).get("flagged", False)
        label = f"{row['label']} [{row['clock']}]" + (" (WRONG outputs)" if flagged else "")
        style = "--" if flagged else "-"
        lat.errorbar(batches, median, yerr=[[0] * len(upper), upper], marker="o", linestyle=style, capsize=3, label=label)
        thr.plot(batches, [t["images_per_s"] for t in row["timings"]], marker="o", linestyle=style, label=label)
        if row["label"] in efficiency:
            cells = efficiency[row["label"]]
            axes[2].plot(batches, [cells[str(b)]["gflops"] for b in batches], marker="o", linestyle=style, label=row["label"])
    titles = [("median latency, ms (bar: p90)", lat), ("throughput, images/s", thr)]
    if efficiency:
        for c in results["cpu_ceilings"]["entries"]:
            axes[2].axhline(c["gflops"], linestyle=":", linewidth=1, color="grey")
            axes[2].annotate(f"{c['engine']} {c['dtype']} MatMul", (results["settings"]["batch_sizes"][0], c["gflops"]), fontsize=7)
        titles.append(("achieved GFLOP/s (dotted: MatMul ceilings)", axes[2]))
    for ylabel, ax in titles:
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["settings"]["batch_sizes"], [str(b) for b in results["settings"]["batch_sizes"]])
        ax.grid(True, alpha=0.3)
    lat.set_yscale("log")
    lat.legend(fontsize=7)
    model = results["model"]
    title = Path(model["checkpoint"]).name + (" (SYNTHETIC weights)" if model["synthetic"] else "")
    env = results["environment"]
    fig.suptitle(f"{title}: {env['cpu']}, {env['threads']} threads" + (f", {env['gpu']}" if env["gpu"] else ""))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
