"""The user contract: a ``Service`` with its ``Model`` declarations, and the ``Request``.

A service runs in CPU worker processes (split mode) or in request threads (threaded
mode); the same class serves both. It never runs a model itself: it declares them,
and calls ``infer`` to have an engine process run them.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from splitserve.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from splitserve.importing import add_working_directory_to_path

Tensors = dict[str, np.ndarray]
InferFn = Callable[[str, Mapping[str, np.ndarray]], Awaitable[Tensors]]

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


# The least share of a service's answers (its own ``agreement`` measure) that a lower
# precision build must keep equal to fp32's, unless a model says otherwise.
DEFAULT_MIN_AGREEMENT = 0.98


@dataclass(frozen=True)
class Model:
    """A model a service uses, and how its engine batches it.

    ``path`` is a model file (ONNX for the default backend), absolute or relative to the
    service's module. ``precision`` other than fp32 makes the server serve an engine
    built by ``splitserve build`` (from the engine cache, built on start when missing)
    with ``calibration`` (a folder of request bodies or .npy/.npz inputs, relative like
    ``path``), ``keep_fp32`` (node names, op types, or ``("auto",)``), ``tolerance``
    (largest relative L2 error of any output on held-out inputs) and ``min_agreement``
    (the service's own ``agreement`` ratio with fp32 on held-out requests); ``int8_ops``
    is ``"compute"`` (Conv/MatMul/Gemm in int8) or ``"all"`` (every layer that can be).

    ``pad_axes`` names, per input, the axes along which requests of different sizes may
    be zero-padded (``pad_value``) to share a batch; requests whose shapes differ
    elsewhere are batched separately. ``pad_bucket`` (> 0) limits padding to requests
    whose sizes along a pad axis fall in the same bucket of that many elements, for
    models whose results move with padding. ``threads`` overrides the engine's intra-op
    thread count for this model.
    """

    path: str = ""
    backend: str = "onnxruntime"
    max_batch_size: int = 8
    max_delay_ms: float = 2.0
    replicas: int = 1
    pad_axes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    pad_value: float = 0.0
    pad_bucket: int = 0
    threads: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    calibration: str = ""
    keep_fp32: tuple[str, ...] = ()
    tolerance: float | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    int8_ops: str = "compute"

    @property
    def needs_build(self) -> bool:
        """Served from an engine ``splitserve build`` makes (not the model file as is)."""
        return self.precision != "fp32" or self.backend == "tensorrt"

    def __post_init__(self) -> None:
        if not self.path and self.backend != "simulated":
            raise ValueError(f"a {self.backend} model needs a path")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.pad_bucket < 0:
            raise ValueError(f"pad_bucket must be >= 0, got {self.pad_bucket}")
        if self.precision not in ("fp32", "fp16", "bf16", "int8"):
            raise ValueError(f"precision must be fp32, fp16, bf16 or int8, got {self.precision!r}")
        if self.precision != "fp32" and self.backend not in ("onnxruntime", "tensorrt"):
            raise ValueError(
                f"precision={self.precision!r} is built into ONNX graphs (onnxruntime or "
                f"tensorrt); the {self.backend} backend takes it from options (torch: dtype)"
            )
        if isinstance(self.keep_fp32, str):
            raise ValueError("keep_fp32 is a tuple of names, e.g. ('auto',) or ('Softmax',)")
        for name, axes in self.pad_axes.items():
            if any(a < 1 for a in axes):
                raise ValueError(f"pad_axes[{name!r}]: axis 0 is the batch axis; pad axes are >= 1")


class Request:
    """One HTTP request as user code sees it: the raw body plus helpers to decode it."""

    __slots__ = ("_json", "body", "content_type", "headers", "max_image_pixels")

    def __init__(
        self,
        body: bytes,
        content_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.headers = dict(headers or {})
        self.max_image_pixels = max_image_pixels
        self._json: Any = None

    @property
    def is_json(self) -> bool:
        return self.content_type.split(";")[0].strip().lower() == "application/json"

    def json(self) -> Any:
        """The body parsed as JSON (400 when it is not JSON)."""
        if self._json is None:
            try:
                self._json = json.loads(self.body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest(f"body is not valid JSON: {exc}") from None
        return self._json

    def json_field(self, name: str, kind: type | tuple[type, ...]) -> Any:
        """A required top-level field of a JSON object body, checked for its type (422)."""
        doc = self.json()
        if not isinstance(doc, dict):
            raise Unprocessable(f"JSON body must be an object, got {type(doc).__name__}")
        if name not in doc:
            raise Unprocessable(f"JSON body lacks the field {name!r}")
        value = doc[name]
        if not isinstance(value, kind):
            raise Unprocessable(f"JSON field {name!r} has the wrong type {type(value).__name__}")
        return value

    def image_bytes(self) -> bytes:
        """The encoded image: the raw body, or base64 in a JSON body's ``image`` field."""
        if self.is_json:
            import base64
            import binascii

            text = self.json_field("image", str)
            try:
                return base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise Unprocessable(f"JSON field 'image' is not valid base64: {exc}") from None
        if self.content_type.startswith("text/"):
            raise UnsupportedMediaType(
                f"content type {self.content_type!r} is not an image; send the image bytes "
                'or JSON {"image": <base64>}'
            )
        return self.body

    def image(self, mode: str = "BGR") -> np.ndarray:
        """Decode the image (HxWx3 uint8, BGR by default, as OpenCV code expects).

        The pixel count is checked from the header before any pixel is decoded, so a
        decompression bomb costs nothing; a truncated or unreadable file is a 400.
        """
        return decode_image(self.image_bytes(), self.max_image_pixels, mode)


def decode_image(data: bytes, max_pixels: int, mode: str = "BGR") -> np.ndarray:
    """Decode encoded image bytes into an array, with clear errors for bad input."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadRequest("empty body: expected an encoded image")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadRequest("body is not a recognised image (JPEG, PNG, BMP, WebP, TIFF...)") from None
    width, height = img.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadRequest(f"image could not be decoded ({img.format}): {exc}") from None
    if mode == "RGB":
        return np.asarray(img.convert("RGB"))
    if mode != "BGR":
        raise ValueError(f"mode must be 'BGR' or 'RGB', got {mode!r}")
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA").convert("RGB")
    arr = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(arr[:, :, ::-1])


class Service:
    """Base class of a served service.

    One-model services set ``model`` and write ``preprocess`` / ``postprocess``.
    Pipelines set ``models`` and write ``async handle(request, infer)``. ``setup`` runs
    once per CPU worker (or once in threaded mode) before the first request.
    """

    name: ClassVar[str | None] = None
    model: ClassVar[Model | None] = None
    models: ClassVar[Mapping[str, Model]] = {}

    def setup(self) -> None:
        """Per-process initialisation (tables, tokenizers...). Models run in engines, not
        here; reading a model file's metadata is fine (the OCR service reads its
        recogniser's character table)."""

    def preprocess(self, request: Request) -> Mapping[str, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} must define preprocess() or handle()")

    def postprocess(self, outputs: Tensors, request: Request) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define postprocess() or handle()")

    async def handle(self, request: Request, infer: InferFn) -> Any:
        """The request's whole path; by default preprocess -> the one model -> postprocess."""
        (model_name,) = self.declared_models()
        outputs = await infer(model_name, self.preprocess(request))
        return self.postprocess(outputs, request)

    def agreement(self, reference: Any, candidate: Any) -> tuple[int, int] | None:
        """How much of ``candidate``'s answer matches ``reference``'s, as (matching, total).

        Both are one request's decoded answers, from fp32 engines and from a lower
        precision build; ``splitserve build`` gates on the summed ratio (for OCR: text
        lines whose text is equal). ``None``: the service has no such check, and the
        build gates on the models' output errors only.
        """
        return None

    @classmethod
    def service_name(cls) -> str:
        return cls.name or cls.__name__.lower()

    @classmethod
    def declared_models(cls) -> dict[str, Model]:
        """The service's models by name; a lone ``model`` is named ``model``."""
        if cls.model is not None and cls.models:
            raise TypeError(f"{cls.__name__}: declare either `model` or `models`, not both")
        if cls.model is not None:
            return {"model": cls.model}
        if not cls.models and cls.handle is Service.handle:
            raise TypeError(f"{cls.__name__}: declares no model; set `model` or `models`")
        return dict(cls.models)

    @classmethod
    def model_path(cls, model: Model, path: str | None = None) -> Path:
        """The model file (or ``path``), resolved relative to the service's module."""
        path = Path(model.path if path is None else path)
        if not path.is_absolute():
            module = importlib.import_module(cls.__module__)
            path = Path(module.__file__ or ".").resolve().parent / path
        return path


def load_service(spec: str) -> type[Service]:
    """Import ``module:Class`` (or ``path/to/file.py:Class``) and check it is a Service."""
    if ":" not in spec:
        raise ValueError(f"service must be given as module:Class, got {spec!r}")
    module_name, _, class_name = spec.rpartition(":")
    add_working_directory_to_path()  # what a service file imports may live there
    if module_name.endswith(".py"):
        file = Path(module_name).resolve()
        mod_name = f"splitserve_user_{file.stem}"
        if mod_name not in sys.modules:
            loader_spec = importlib.util.spec_from_file_location(mod_name, file)
            if loader_spec is None or loader_spec.loader is None:
                raise ValueError(f"cannot import {file}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        module = sys.modules[mod_name]
    else:
        module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise ValueError(f"{spec!r} is not a splitserve.Service subclass")
    cls.declared_models()  # fail early on a malformed declaration
    return cls
