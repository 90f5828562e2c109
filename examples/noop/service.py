"""The no-op service: a small tensor through an identity model.

It measures what the server itself costs per request (HTTP, hops, batching) with no
real pre/post-processing or inference. Create the model first:
``python examples/noop/make_model.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import splitserve


class Noop(splitserve.Service):
    name = "noop"
    model = splitserve.Model("identity.onnx", max_batch_size=32, max_delay_ms=0.5)

    def preprocess(self, request: splitserve.Request) -> dict[str, np.ndarray]:
        if request.is_json:
            values = request.json_field("values", list)
            try:
                arr = np.asarray(values, dtype=np.float32)
            except (TypeError, ValueError):
                raise splitserve.Unprocessable("'values' must be a list of numbers") from None
            if arr.ndim != 1 or arr.size == 0:
                raise splitserve.Unprocessable("'values' must be a non-empty flat list")
            return {"x": arr[None, :]}
        if not request.body or len(request.body) % 4:
            raise splitserve.BadRequest("raw body must be float32 values (a multiple of 4 bytes)")
        return {"x": np.frombuffer(request.body, dtype=np.float32)[None, :]}

    def postprocess(self, outputs: splitserve.Tensors, request: splitserve.Request) -> Any:
        y = outputs["y"][0]
        if request.is_json:
            return {"values": y.tolist()}
        return y.tobytes()
