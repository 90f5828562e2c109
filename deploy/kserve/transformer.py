"""A KServe transformer that runs a splitserve service's own code in front of a predictor.

    python -m deploy.kserve.transformer --service examples.ocr.service:OCRService \\
        --model_name ocr --predictor_host 127.0.0.1:8000 --protocol v2 [--host 127.0.0.1]

The CPU side of the split layout (deploy/kserve/split-inferenceservice.yaml): a
``kserve.Model`` whose ``predict`` runs the service's ``handle`` (image decoding,
pre/post-processing, as in a splitserve CPU worker), each ``infer(model, inputs)``
becoming an OIP v2 call with binary tensors to the predictor's bare engine model
``{service}.{model}`` (a splitserve server; engine models are named so). The predictor
batches the calls of every transformer pod together.

Requests: OIP v2 ``POST /v2/models/{model_name}/infer`` with one BYTES input, one
encoded image per element (raw with the binary tensor extension; base64 in JSON). The
answer: a BYTES output ``result``, the service's JSON per image. A request the service
rejects (status 4xx) answers 400 with its message; any other failure 500.

KServe's server binds every interface (``0.0.0.0``, hard-coded in kserve 0.21's
``RESTServer``); ``--host`` rebinds it (default 127.0.0.1; the pod's manifest passes
0.0.0.0), and KServe's gRPC server (``[::]``) stays off.
"""

from __future__ import annotations

import argparse
import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np

from splitserve.runtime.invoke import invoke_service
from splitserve.service import Request, Tensors, load_service

import kserve  # isort: skip  (the optional dependency, after the project's own imports)
from kserve import InferInput, InferOutput, InferRequest, InferResponse
from kserve.errors import InferenceError, InvalidInput
from kserve.utils.numpy_codec import from_np_dtype


def _image_bytes(element: Any) -> bytes:
    """One BYTES element: raw bytes (binary extension) or base64 text (JSON)."""
    if isinstance(element, bytes | bytearray):
        return bytes(element)
    try:
        return base64.b64decode(str(element), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"a BYTES element in JSON must be a base64 image: {exc}") from None


class ServiceTransformer(kserve.Model):
    """The service's ``handle`` as a KServe model, its ``infer`` calls sent to the predictor."""

    def __init__(self, name: str, service: str) -> None:
        super().__init__(name)
        cls = load_service(service)
        self.service_name = cls.service_name()
        self.service = cls()
        self.service.setup()
        self.ready = True

    async def infer_engine(self, model: str, inputs: Mapping[str, np.ndarray]) -> Tensors:
        """Run one engine model on the predictor (OIP v2, binary tensors)."""
        tensors = []
        for name, array in inputs.items():
            tensor = InferInput(name, list(array.shape), from_np_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array), binary_data=True)
            tensors.append(tensor)
        engine_model = f"{self.service_name}.{model}"
        request = InferRequest(model_name=engine_model, infer_inputs=tensors)
        config = self.predictor_config
        if config is None or not config.predictor_host:
            raise InferenceError("no --predictor_host given")
        response = await self._http_client.infer(
            config.predictor_base_url, data=request, model_name=engine_model
        )
        return {output.name: output.as_numpy() for output in response.outputs}

    async def predict(
        self,
        payload: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("send an OIP v2 request: POST /v2/models/{model}/infer")
        if len(payload.inputs) != 1 or payload.inputs[0].datatype != "BYTES":
            raise InvalidInput("expected one BYTES input: one encoded image per element")
        images = [_image_bytes(e) for e in payload.inputs[0].data]
        results = []
        for body in images:
            reply = await invoke_service(self.service, Request(body), self.infer_engine)
            if reply.status >= 500:
                raise InferenceError(reply.body.decode(errors="replace"))
            if reply.status >= 400:
                raise InvalidInput(reply.body.decode(errors="replace"))
            results.append(reply.body)
        output = InferOutput("result", [len(results)], "BYTES", results)
        return InferResponse(payload.id or "", self.name, [output])


def bind_rest_server(host: str) -> None:
    """Make kserve's ModelServer listen on ``host`` (it hard-codes 0.0.0.0)."""
    from kserve import model_server
    from kserve.protocol.rest import server as rest_server

    class BoundRESTServer(rest_server.RESTServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = host

    model_server.RESTServer = BoundRESTServer


def main(argv: list[str] | None = None) -> None:
    from kserve import model_server

    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__)
    parser.add_argument("--service", required=True, help="module:Class")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    args, _ = parser.parse_known_args(argv)
    bind_rest_server(args.host)
    transformer = ServiceTransformer(args.model_name, args.service)
    # --protocol is KServe's older spelling of --predictor_protocol (both default to v1).
    protocol = args.predictor_protocol if args.predictor_protocol != "v1" else args.protocol
    server = kserve.ModelServer(
        http_port=args.http_port,
        enable_grpc=False,
        predictor_config=kserve.PredictorConfig(
            args.predictor_host,
            protocol,
            args.predictor_use_ssl,
            args.predictor_request_timeout_seconds,
        ),
    )
    server.start([transformer])


if __name__ == "__main__":
    main()
