"""The Open Inference Protocol (KServe "v2", as Triton speaks it over HTTP): requests in, responses out.

Only the wire format lives here: JSON tensors, the binary-tensor extension (a JSON header of
`Inference-Header-Content-Length` bytes followed by raw tensor bytes, BYTES elements as a 4-byte
little-endian length and the bytes) and Triton's model-configuration fields. What a model accepts
(names, shapes, limits) is the data plane's business; a malformed request is a `BadRequest`,
one line naming the input, which the endpoints answer with 400 (HTTP) or their protocol's equivalent.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.artifact import ArtifactMeta
from runtime.serve.failures import BadRequest, Unsupported

HEADER_LENGTH = "Inference-Header-Content-Length"
# Protocol datatype -> numpy dtype (BYTES elements are Python bytes).
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]  # BYTES tensors: the elements, flattened


Output = tuple[str, str, np.ndarray, bool]  # an answer's output: name, datatype, array, whether sent binary


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    class_count: int = 0  # Triton's classification extension: the k best as "value:index:label" strings


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Tensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool  # the request-wide default for outputs that do not say
    parameters: dict[str, Any] = field(default_factory=dict)


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def deserialize_bytes(buf: bytes | memoryview, name: str) -> list[bytes]:
    items, at = [], 0
    while at < len(buf):
        if at + 4 > len(buf):
            raise BadRequest(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", buf, at)
        at += 4
        if at + size > len(buf):
            raise BadRequest(f"input {name!r}: BYTES element {len(items)} claims {size} bytes, "
                                f"only {len(buf) - at} remain")
        items.append(bytes(buf[at : at + size]))
        at += size
    return items


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def _json_data(raw: Any, datatype: str, count: int, name: str, parameters: dict[str, Any]) -> np.ndarray | list[bytes]:
    if not isinstance(raw, list):
        raise BadRequest(f"input {name!r}: 'data' must be a list")
    if datatype == "BYTES":
        flat = list(_flatten(raw))
        if not all(isinstance(x, str) for x in flat):
            raise BadRequest(f"input {name!r}: BYTES elements in JSON must be strings")
        if parameters.get("content_type") == "base64":  # MLServer's convention, for clients such as curl
            try:
                return [base64.b64decode(x, validate=True) for x in flat]
            except (binascii.Error, ValueError):
                raise BadRequest(f"input {name!r}: an element is not valid base64") from None
        return [_utf8(x, name, i) for i, x in enumerate(flat)]
    try:
        data = np.asarray(raw, dtype=DTYPES[datatype]).reshape(-1)
    except (ValueError, TypeError, OverflowError) as err:
        raise BadRequest(f"input {name!r}: data is not a list of {datatype} numbers ({err})") from None
    if data.size != count:
        raise BadRequest(f"input {name!r}: {data.size} values for shape of {count} elements")
    return data


def _utf8(text: str, name: str, index: int) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800"), which no UTF-8 text holds
        raise BadRequest(f"input {name!r}: element {index} is not valid Unicode (a lone surrogate)") from None


def _flatten(x: Any) -> Any:
    for item in x:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """An `infer` body -> (its JSON part, its binary part), per the binary-tensor extension's header."""
    if header_length is None:
        return body, memoryview(b"")
    n = int(header_length) if header_length.isdigit() else -1
    if not 0 <= n <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} {header_length!r} is not a length within the {len(body)}-byte body")
    return body[:n], memoryview(body)[n:]


def load_json(head: bytes) -> dict[str, Any]:
    """The request's JSON object; malformed, non-UTF-8 or too deeply nested JSON is a `BadRequest`."""
    try:
        req = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"the request is not valid JSON ({err})") from None
    except RecursionError:
        raise BadRequest("the request's JSON is nested too deeply") from None
    if not isinstance(req, dict):
        raise BadRequest("the request must be a JSON object")
    return req


def parse_request(req: dict[str, Any], binary: memoryview) -> InferRequest:
    """A request's JSON object and binary part -> its inputs and outputs, each field checked as Triton checks it."""
    if not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise BadRequest("the request needs a non-empty 'inputs' list")
    params = _parameters(req, "the request")
    binary_output = _flag(params, "binary_data_output", False, "the request")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f"'id' must be a string, not {type(rid).__name__}")
    inputs: dict[str, Tensor] = {}
    at = 0
    try:
        for raw in req["inputs"]:
            tensor, at = _input(raw, binary, at)
            if tensor.name in inputs:
                raise BadRequest(f"input {tensor.name!r} appears twice")
            inputs[tensor.name] = tensor
    except RecursionError:  # `data` nested deeper than Python recurses
        raise BadRequest("an input's 'data' is nested too deeply") from None
    if at != len(binary):
        raise BadRequest(f"{len(binary) - at} bytes of binary data belong to no input")
    return InferRequest(rid, inputs, _outputs(req, binary_output), binary_output, params)


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{what}: 'parameters' must be an object")
    if "shared_memory_region" in params:
        raise Unsupported(f"{what}: shared memory is not supported; send the tensor in the body")
    return params


def _flag(params: dict[str, Any], key: str, default: bool, what: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{what}: parameter {key} must be true or false, not {value!r}")
    return value


def _input(raw: Any, binary: memoryview, at: int) -> tuple[Tensor, int]:
    """One entry of `inputs` -> its tensor, and where the next input's binary data starts."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise BadRequest("every input needs a 'name'")
    name, datatype = raw["name"], raw.get("datatype")
    if datatype not in DTYPES:
        raise BadRequest(f"input {name!r}: unknown datatype {datatype!r}")
    shape = _shape(raw.get("shape"), name)
    count = math.prod(shape)
    params = _parameters(raw, f"input {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {size!r} runs past the request's binary part")
        if "data" in raw:
            raise BadRequest(f"input {name!r} has both 'data' and binary_data_size")
        data = binary_tensor(binary[at : at + size], name, datatype, shape)
        at += size
    elif "data" in raw:
        data = _json_data(raw["data"], datatype, count, name, params)
    else:
        raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
    if datatype == "BYTES" and len(data) != count:
        raise BadRequest(f"input {name!r}: {len(data)} elements for shape {list(shape)}")
    return Tensor(name, datatype, shape, data), at


def binary_tensor(raw: bytes | memoryview, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray | list[bytes]:
    """A tensor's raw bytes (the binary extension's, or gRPC's `raw_input_contents`) -> its elements, flattened."""
    if datatype == "BYTES":
        return deserialize_bytes(raw, name)
    itemsize = np.dtype(DTYPES[datatype]).itemsize
    count = math.prod(shape)
    if len(raw) != count * itemsize:
        raise BadRequest(f"input {name!r}: {len(raw)} bytes for shape {list(shape)} of {datatype} "
                         f"({count * itemsize} expected)")
    return np.frombuffer(raw, dtype=DTYPES[datatype])


def raw_tensor(datatype: str, array: np.ndarray) -> bytes:
    """An output's raw bytes, as the binary extension and gRPC's `raw_output_contents` carry them."""
    if datatype == "BYTES":
        return serialize_bytes(list(array.reshape(-1)))
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def _outputs(req: dict[str, Any], default_binary: bool) -> list[RequestedOutput] | None:
    raw = req.get("outputs")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list")
    outs: list[RequestedOutput] = []
    for o in raw:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest("every requested output needs a 'name'")
        what = f"output {o['name']!r}"
        if any(out.name == o["name"] for out in outs):
            raise BadRequest(f"{what} is requested twice")
        p = _parameters(o, what)
        k = p.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BadRequest(f"{what}: classification must be a non-negative integer")
        outs.append(RequestedOutput(o["name"], _flag(p, "binary_data", default_binary, what), k))
    return outs


def encode_response(model: str, request_id: str | None, outputs: list[Output]) -> tuple[bytes, dict[str, str]]:
    """(name, datatype, array, binary) per output -> the response body and its extra headers."""
    described, chunks = [], []
    for name, datatype, array, binary in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = raw_tensor(datatype, array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [x.decode("utf-8", "replace") for x in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": described}
    if request_id is not None:
        head["id"] = request_id
    text = json.dumps(head).encode()
    if not chunks:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}


def io_config(meta: ArtifactMeta, num_classes: int | None, labels_file: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Triton model-configuration `input`/`output` of an exported model (batch dimension implicit): the
    names a client uses with this project's server and with Triton alike."""
    h, w = meta.preprocessing.input_size
    logits: dict[str, Any] = {"name": "logits", "data_type": "TYPE_FP32", "dims": [num_classes or -1]}
    if labels_file:
        logits["label_filename"] = labels_file
    return {"input": [{"name": "pixel_values", "data_type": "TYPE_FP32", "dims": [3, h, w]}], "output": [logits]}
