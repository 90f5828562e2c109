"""What protocol v2 (HTTP and gRPC) calls a model, and running one on a request.

Two kinds, both served by the same ``Dispatcher`` as ``/v1``:

- every **service** is a model named like the service. It takes one BYTES input,
  ``request``, each element one request body (an encoded image, or JSON when the
  request's ``content_type`` parameter says so), and answers one BYTES output,
  ``response``, each element the service's answer to that body (its JSON). The elements
  run concurrently, as that many ``/v1`` requests would.
- every **engine model** is also a model, ``service.model``, tensors in and out (for
  clients that pre-process themselves), batched in the engines with every other request.
  Its signature comes from the engines (``ModelStats.inputs/outputs``): until the first
  engine reported it, the model is listed but not ready.

The version is always "1"; another version is a 404.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from splitserve.errors import BadRequest, NotFound, ServiceError, Unavailable
from splitserve.protocol.datatypes import datatype_name
from splitserve.replies import Reply
from splitserve.tensors import (
    BUNDLE_CONTENT_TYPE,
    BundleError,
    pack_tensors_bundle,
    unpack_tensors_bundle,
)

VERSION = "1"
SERVICE_INPUT = "request"
SERVICE_OUTPUT = "response"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "torch": "pytorch_libtorch"}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: list[int]  # -1: a dynamic axis


@dataclass(frozen=True)
class ModelEntry:
    name: str
    service: str
    engine_model: str  # "" for the service itself
    backend: str
    max_batch_size: int  # 0: no batch axis of its own (a service)
    max_delay_ms: float
    inputs: list[TensorMeta] = field(default_factory=list)
    outputs: list[TensorMeta] = field(default_factory=list)

    @cached_property
    def input_index(self) -> dict[str, TensorMeta]:
        """The inputs by name (checked on every request)."""
        return {meta.name: meta for meta in self.inputs}

    @property
    def platform(self) -> str:
        if not self.engine_model:
            return "splitserve_service"
        return PLATFORMS.get(self.backend, self.backend)

    @cached_property
    def stats_key(self) -> str:
        """The key of this model in the request and engine statistics."""
        return f"{self.service}/{self.engine_model}" if self.engine_model else self.service


class ServiceFailed(ServiceError):
    """A service or engine answered an error: its status and message, passed on."""


def reply_error(reply: Reply) -> ServiceFailed:
    """The error a non-200 ``Reply`` carries (``{"error": {"message": ...}}`` bodies)."""
    message = reply.body.decode(errors="replace")
    try:
        doc = json.loads(reply.body)
        message = doc["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return ServiceFailed(message, status=reply.status)


class ModelRegistry:
    """The models of a catalogue, and how to run each through a dispatcher."""

    def __init__(self, dispatcher: Any, catalogue: Mapping[str, Mapping[str, Any]]) -> None:
        self.dispatcher = dispatcher
        self.catalogue = catalogue
        self._complete: dict[str, ModelEntry] | None = None  # once every signature is known

    def _signatures(self) -> dict[str, Any]:
        """The engines' model statistics by "service/model" (they carry the signatures)."""
        found: dict[str, Any] = {}
        for engine in self.dispatcher.engine_stats():
            for key, stats in engine.models.items():
                if stats.inputs:
                    found.setdefault(key, stats)
        return found

    def entries(self) -> dict[str, ModelEntry]:
        if self._complete is not None:
            return self._complete
        signatures = self._signatures()
        entries: dict[str, ModelEntry] = {}
        for service, description in self.catalogue.items():
            entries[service] = ModelEntry(
                service,
                service,
                "",
                "splitserve",
                0,
                0.0,
                [TensorMeta(SERVICE_INPUT, "BYTES", [-1])],
                [TensorMeta(SERVICE_OUTPUT, "BYTES", [-1])],
            )
            for model, info in description.get("models", {}).items():
                stats = signatures.get(f"{service}/{model}")
                name = f"{service}.{model}"
                entries[name] = ModelEntry(
                    name,
                    service,
                    model,
                    info.get("backend", ""),
                    int(info.get("max_batch_size", 0)),
                    float(info.get("max_delay_ms", 0.0)),
                    _metas(stats.inputs) if stats else [],
                    _metas(stats.outputs) if stats else [],
                )
        if all(entry.inputs for entry in entries.values()):
            self._complete = entries  # signatures do not change while the server runs
        return entries

    def get(self, name: str, version: str = "") -> ModelEntry:
        entry = self.entries().get(name)
        if entry is None:
            raise NotFound(f"no model named {name!r}")
        if version not in ("", VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; it has {VERSION!r}")
        return entry

    def ready(self, entry: ModelEntry) -> bool:
        return self.dispatcher.ready() and bool(entry.inputs)

    async def infer(
        self,
        entry: ModelEntry,
        inputs: dict[str, np.ndarray],
        *,
        deadline: float,
        headers: dict[str, str],
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The model's outputs for ``inputs``, and the timings of the work (ms)."""
        if not self.ready(entry):
            raise Unavailable(f"model {entry.name!r} is not ready")
        _check_inputs(entry, inputs)
        if entry.engine_model:
            return await self._infer_engine(entry, inputs, deadline, headers)
        bodies = inputs[SERVICE_INPUT]
        return await self._infer_service(entry, bodies, deadline, headers, content_type)

    async def _infer_service(
        self,
        entry: ModelEntry,
        bodies: np.ndarray,
        deadline: float,
        headers: dict[str, str],
        content_type: str,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        calls = [
            self.dispatcher.dispatch(entry.service, bytes(body), content_type, headers, deadline)
            for body in bodies.reshape(-1)
        ]
        if len(calls) == 1:  # the common case, without gather's task per element
            replies: list[Any] = [await calls[0]]
        else:
            replies = await asyncio.gather(*calls, return_exceptions=True)
        out = np.empty(len(replies), dtype=object)
        timings: dict[str, float] = {}
        for index, reply in enumerate(replies):
            if isinstance(reply, BaseException):
                raise reply
            if reply.status != 200:
                raise reply_error(reply)
            out[index] = reply.body
            for key, value in reply.timings.items():
                timings[key] = max(timings.get(key, 0.0), value)
        return {SERVICE_OUTPUT: out.reshape(bodies.shape)}, timings

    async def _infer_engine(
        self,
        entry: ModelEntry,
        inputs: dict[str, np.ndarray],
        deadline: float,
        headers: dict[str, str],
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        try:
            body = pack_tensors_bundle(inputs)
        except BundleError as exc:  # e.g. BF16, which the engines' transport does not carry
            raise BadRequest(f"model {entry.name!r}: {exc}") from None
        reply = await self.dispatcher.dispatch(
            entry.service, body, BUNDLE_CONTENT_TYPE, headers, deadline, model=entry.engine_model
        )
        if reply.status != 200:
            raise reply_error(reply)
        return unpack_tensors_bundle(reply.body), reply.timings


def _metas(infos: list[Any]) -> list[TensorMeta]:
    return [TensorMeta(i.name, datatype_name(i.dtype), list(i.shape)) for i in infos]


def _check_inputs(entry: ModelEntry, inputs: dict[str, np.ndarray]) -> None:
    """Names, datatypes and ranks against the signature (the engine checks the rest)."""
    expected = entry.input_index
    if inputs.keys() != expected.keys():
        raise BadRequest(
            f"model {entry.name!r} takes inputs {sorted(expected)}, got {sorted(inputs)}"
        )
    for name, arr in inputs.items():
        meta = expected[name]
        datatype = datatype_name(arr.dtype)
        if datatype != meta.datatype:
            raise BadRequest(
                f"input {name!r} of model {entry.name!r} must be {meta.datatype}, got {datatype}"
            )
        if arr.ndim != len(meta.shape):
            raise BadRequest(
                f"input {name!r} of model {entry.name!r} must have shape {meta.shape}, "
                f"got {list(arr.shape)}"
            )


def inference_count(entry: ModelEntry, inputs: dict[str, np.ndarray]) -> int:
    """What Triton's statistics count for one request: rows of an engine model's batch
    axis (its first input's), elements of a service model's request tensor."""
    first = next(iter(inputs.values()))
    if entry.engine_model:
        return int(first.shape[0]) if first.ndim else 1
    return int(first.size)


def select_outputs(
    entry: ModelEntry, outputs: dict[str, np.ndarray], requested: list[str]
) -> dict[str, np.ndarray]:
    """The outputs asked for by name (all of them when none is named), in that order."""
    if not requested:
        return outputs
    unknown = [name for name in requested if name not in outputs]
    if unknown:
        raise BadRequest(
            f"model {entry.name!r} has no output {unknown[0]!r}; it has {sorted(outputs)}"
        )
    return {name: outputs[name] for name in requested}


def model_metadata(entry: ModelEntry) -> dict[str, Any]:
    """The v2 model metadata document (shapes with the batch axis, -1 when dynamic)."""
    return {
        "name": entry.name,
        "versions": [VERSION],
        "platform": entry.platform,
        "inputs": [_tensor_doc(m) for m in entry.inputs],
        "outputs": [_tensor_doc(m) for m in entry.outputs],
    }


def _tensor_doc(meta: TensorMeta) -> dict[str, Any]:
    return {"name": meta.name, "datatype": meta.datatype, "shape": meta.shape}


def model_config(entry: ModelEntry) -> dict[str, Any]:
    """Triton's model configuration (dims without the batch axis when it batches)."""
    batched = entry.max_batch_size > 0

    def dims(meta: TensorMeta) -> list[int]:
        return meta.shape[1:] if batched else meta.shape

    config: dict[str, Any] = {
        "name": entry.name,
        "platform": entry.platform,
        "backend": entry.backend,
        "max_batch_size": entry.max_batch_size,
        "input": [
            {"name": m.name, "data_type": f"TYPE_{_config_type(m.datatype)}", "dims": dims(m)}
            for m in entry.inputs
        ],
        "output": [
            {"name": m.name, "data_type": f"TYPE_{_config_type(m.datatype)}", "dims": dims(m)}
            for m in entry.outputs
        ],
    }
    if batched:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(entry.max_delay_ms * 1000)
        }
    return config


def _config_type(datatype: str) -> str:
    return "STRING" if datatype == "BYTES" else datatype
