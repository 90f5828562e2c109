"""A KServe transformer in front of splitserve (protocol v2), run by tests/test_v2_kserve.py
with the kserve package's own ModelServer, in its own virtual environment (kserve pins
protobuf below the version splitserve's generated gRPC code needs).

``python tests/v2_kserve_transformer.py --model_name echo.model --predictor_host
127.0.0.1:PORT --predictor_protocol v2 --http_port P --enable_grpc false``: requests for the
model ``echo.model`` are pre-processed here (x * 2), inferred by splitserve's bare engine
model of the same name, and post-processed here (y + 1).
"""

from __future__ import annotations

import argparse

import uvicorn
from kserve import InferInput, InferRequest, InferResponse, Model, ModelServer, model_server


class Affine(Model):
    """x -> predictor(2 x) + 1; with splitserve's identity model: 2 x + 1."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True

    async def preprocess(self, payload: InferRequest, headers=None) -> InferRequest:
        x = payload.inputs[0].as_numpy() * 2
        tensor = InferInput(name="x", shape=list(x.shape), datatype="FP32")
        tensor.set_data_from_numpy(x, binary_data=False)
        return InferRequest(model_name=self.name, infer_inputs=[tensor], request_id=payload.id)

    async def postprocess(self, response: InferResponse, headers=None, **_) -> InferResponse:
        output = response.outputs[0]
        y = output.as_numpy() + 1
        output.set_data_from_numpy(y, binary_data=False)
        return response


def listen_on_loopback_only() -> None:
    """kserve's REST server binds 0.0.0.0 unconditionally; tests listen on 127.0.0.1."""
    original = uvicorn.Config.__init__

    def loopback(self, app, *args, **kwargs) -> None:
        kwargs["host"] = "127.0.0.1"
        original(self, app, *args, **kwargs)

    uvicorn.Config.__init__ = loopback


if __name__ == "__main__":
    listen_on_loopback_only()
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    args, _ = parser.parse_known_args()
    ModelServer().start([Affine(args.model_name)])
