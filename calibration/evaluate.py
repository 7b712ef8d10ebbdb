"""Logits of candidate int8 models before they are written (compared with fp32 by `export.compare`)."""

from __future__ import annotations

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
