"""The MLServer custom runtime `benchmarks.serve --peer mlserver` serves: the project's ONNX file on ONNX Runtime,
with the session options the project's ort-cpu backend uses (all graph optimizations, `threads` intra-op
threads, one inter-op thread), so that the comparison is of the servers, not of two model runs.

It runs inside MLServer's own virtual environment (MLServer copies nothing of this project); the benchmark
copies this file beside the model settings it writes. `model-settings.json` gives `parameters.extra`:
`model_file` (absolute path) and `threads`. MLServer's adaptive batching concatenates requests along the
first axis and splits the logits back, so `predict` sees one batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class DeitOnnxRuntime(MLModel):  # type: ignore[misc]  # MLServer is not installed in the project's environment
    async def load(self) -> bool:
        extra: dict[str, Any] = self.settings.parameters.extra
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(extra["threads"])
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(extra["model_file"], opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        pixels = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        (logits,) = self.session.run(["logits"], {self.input_name: pixels})
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("logits", logits)])
