"""How far a model's outputs are from a reference's: one comparison for every stage that checks one.

The export's verification, the int8 accuracy report, the benchmark's agreement column, gpu-check and
the backend contract test all call `compare`, so a figure means the same wherever it is printed.

Top-1 agreement alone cannot judge random inputs or a model with random weights: their logits have
near-ties (on DeiT-Ti about 3 in 64 random inputs have a top-1/top-2 margin under 3e-3, about what
fp16 on a GPU moves a logit), so a correct fp16 backend flips some of them. `check` therefore gates
such inputs on cosine similarity and on the top-1 of the *decided* samples only: those whose reference
margin exceeds twice the measured error (the median over samples of the largest logit difference), so
a flip there is an error well beyond the typical one. Real photos through a trained model are gated
on plain top-1 agreement.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Least per-sample cosine of a precision's logits to fp32's: reduced precisions move logits by about
# 1e-3 (fp16), 1e-2 (bf16) and a few 1e-2 (int8) relative; fp32 only reorders sums.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.99, "int8": 0.98}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], labels: np.ndarray | None = None,
            names: tuple[str, str] = ("reference", "candidate")) -> dict[str, Any]:
    """Max abs difference over all outputs; on the first (the logits): top-1 agreement, worst per-sample
    cosine, mean KL(reference || candidate), and top-1 agreement on the decided samples (module docstring).

    With `labels` (class indices, all >= 0), also top-1/top-5 accuracy of both, keyed by `names`
    (e.g. fp32_top1, int8_top1), and the top-1 drop.
    """
    max_abs = max(float(np.max(np.abs(reference[k].astype(np.float64) - candidate[k]))) for k in reference)
    key = next(iter(reference))
    ref, cand = reference[key].astype(np.float64), candidate[key].astype(np.float64)
    cosine = np.sum(ref * cand, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-30)
    lp, lq = _log_softmax(ref), _log_softmax(cand)
    agree = ref.argmax(1) == cand.argmax(1)
    error = float(np.median(np.max(np.abs(ref - cand), axis=1)))
    ranked = np.sort(ref, axis=1)
    margin = ranked[:, -1] - ranked[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    decided = margin > 2 * error
    report: dict[str, Any] = {
        "samples": int(len(ref)),
        "max_abs_diff": max_abs,
        "top1_agreement": float(np.mean(agree)),
        "min_cosine": float(cosine.min()),
        "mean_kl": float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1))),
        "median_error": error,
        "decided": int(decided.sum()),
        "decided_top1_agreement": float(np.mean(agree[decided])) if decided.any() else 1.0,
    }
    if labels is not None and len(labels) and np.all(labels >= 0):
        k5 = min(5, ref.shape[1])
        a, b = names
        report.update({f"{a}_top1": topk_accuracy(ref, labels, 1), f"{b}_top1": topk_accuracy(cand, labels, 1),
                       f"{a}_top5": topk_accuracy(ref, labels, k5), f"{b}_top5": topk_accuracy(cand, labels, k5)})
        report["top1_drop"] = report[f"{a}_top1"] - report[f"{b}_top1"]
    return report


def check(result: dict[str, Any], precision: str, min_agreement: float, meaningful_top1: bool) -> str | None:
    """None when `result` is close enough for `precision`, else why not (one line).

    `meaningful_top1`: the inputs are real photos and the model is trained, so every top-1 counts;
    otherwise cosine and the decided samples' top-1 are gated (module docstring).
    """
    if meaningful_top1:
        if result["top1_agreement"] < min_agreement:
            return f"top-1 agreement {result['top1_agreement']:.2%} < {min_agreement:.1%}"
        return None
    if result["min_cosine"] < MIN_COSINE[precision]:
        return f"min cosine {result['min_cosine']:.5f} < {MIN_COSINE[precision]}"
    if result["decided_top1_agreement"] < min_agreement:
        return (f"top-1 agreement {result['decided_top1_agreement']:.2%} < {min_agreement:.1%} on the {result['decided']} "
                f"inputs whose reference margin exceeds twice the median error {result['median_error']:.2g}")
    return None
