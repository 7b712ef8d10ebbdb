"""How much an int8 model costs: accuracy against labels, agreement and KL divergence against fp32."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from runtime.console import progress_bar


def run_logits(model: onnx.ModelProto, x: np.ndarray, batch: int = 8, desc: str = "evaluate", progress: bool = True) -> np.ndarray:
    """The first output (logits) of an in-memory ONNX model on ONNX Runtime CPU, `batch` images at a time.

    Candidates are evaluated before they are written anywhere, so this takes a ModelProto rather than
    an artifact folder (the runtime's backends read files from artifact folders).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    chunks = []
    with progress_bar(total=-(-len(x) // batch), desc=desc, unit="batch", enabled=progress) as bar:
        for i in range(0, len(x), batch):
            chunks.append(np.asarray(session.run([out], {name: x[i : i + batch]})[0]))
            bar.update(1)
    return np.concatenate(chunks).astype(np.float32)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def compare_to_fp32(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Top-1 agreement and mean KL(fp32 || int8) always; top-1/top-5 of both when labels are known."""
    lp, lq = _log_softmax(fp32), _log_softmax(int8)
    report: dict[str, Any] = {
        "images": int(len(fp32)),
        "top1_agreement": float(np.mean(fp32.argmax(1) == int8.argmax(1))),
        "mean_kl": float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1))),
    }
    if labels is not None and len(labels) and np.all(labels >= 0):
        k5 = min(5, fp32.shape[1])
        report.update(
            fp32_top1=topk_accuracy(fp32, labels, 1), int8_top1=topk_accuracy(int8, labels, 1),
            fp32_top5=topk_accuracy(fp32, labels, k5), int8_top5=topk_accuracy(int8, labels, k5),
        )
        report["top1_drop"] = report["fp32_top1"] - report["int8_top1"]
    return report
