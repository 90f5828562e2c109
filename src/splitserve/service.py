"""The user contract: a ``Service`` with its ``Model`` declarations, and the ``Request``.

A service runs in CPU worker processes (split mode) or in request threads (threaded
mode); the same class serves both. It never runs a model itself: it declares them,
and calls ``infer`` to have an engine process run them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib
import importlib.util
import io
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import numpy as np
from numpy.typing import DTypeLike

from splitserve.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from splitserve.importing import add_working_directory_to_path
from splitserve.media import HEAD_BYTES, image_type

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
    """One HTTP request as user code sees it: the raw body plus helpers to decode it.

    Every helper turns bad input into a ``ServiceError`` with a 4xx status and a message
    for the client, so a service built on them answers garbage with a clear error.
    """

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
        self._json: Any = _UNPARSED

    @property
    def media_type(self) -> str:
        """The content type without its parameters, lower case (``application/json``)."""
        return self.content_type.partition(";")[0].strip().lower()

    @property
    def is_json(self) -> bool:
        media_type = self.media_type
        return media_type == "application/json" or media_type.endswith("+json")

    def json(self) -> Any:
        """The body parsed as JSON (400 when it is not JSON, or nested too deeply).

        msgspec parses strict RFC 8259 (no NaN, no lone surrogates, which would fail
        later when a result echoes them), and raises ``RecursionError`` past the
        interpreter's recursion limit (about a thousand levels), long before the C stack
        could overflow: that is a 400 too.
        """
        if self._json is _UNPARSED:
            try:
                self._json = _json_decoder.decode(self.body.removeprefix(_UTF8_BOM))
            except msgspec.DecodeError as exc:
                raise BadRequest(f"body is not valid JSON: {exc}") from None
            except RecursionError:
                raise BadRequest("JSON body is nested too deeply to parse") from None
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

    def json_array(
        self, name: str, dtype: DTypeLike = np.float32, ndim: int | None = None
    ) -> np.ndarray:
        """A required field holding numbers (nested lists of equal lengths) as an array.

        422 unless the lists are rectangular, with ``ndim`` dimensions when given, and
        hold numbers: strings, nulls, objects and lists of only booleans are refused.
        """
        values = self.json_field(name, list)
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError, OverflowError, RecursionError):
            arr = None
        if arr is None or (arr.dtype.kind not in "iuf" and arr.size > 0):
            raise Unprocessable(
                f"JSON field {name!r} must hold numbers, in nested lists of equal lengths"
            )
        if ndim is not None and arr.ndim != ndim:
            raise Unprocessable(
                f"JSON field {name!r} must have {ndim} dimension(s), got shape {list(arr.shape)}"
            )
        with np.errstate(over="ignore"):  # a value beyond the dtype's range saturates (inf)
            return arr.astype(dtype, copy=False)

    def image_bytes(self) -> bytes:
        """The encoded image: the raw body, or base64 in a JSON body's ``image`` field."""
        if self.is_json:
            text = self.json_field("image", str)
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise Unprocessable(f"JSON field 'image' is not valid base64: {exc}") from None
            if not data:
                raise Unprocessable("JSON field 'image' is empty: expected a base64 image")
            return data
        media_type = self.media_type
        if media_type in _FORM_TYPES and image_type(self.body[:HEAD_BYTES]):
            # curl --data-binary and urllib label every body a form: the bytes say image
            return self.body
        if media_type.startswith(("text/", "multipart/")) or media_type in _FORM_TYPES:
            raise UnsupportedMediaType(
                f"content type {self.content_type!r} is not an image; send the image bytes "
                'as the body, or JSON {"image": <base64>}'
            )
        return self.body

    def image(self, mode: str = "BGR") -> np.ndarray:
        """Decode the image (HxWx3 uint8, BGR by default, as OpenCV code expects).

        The pixel count is checked from the header before any pixel is decoded, so a
        decompression bomb costs nothing (413); a truncated, corrupt or unknown file is
        a 400. See ``decode_image`` for how odd images are read.
        """
        return decode_image(self.image_bytes(), self.max_image_pixels, mode)


_UNPARSED = object()  # Request._json before the body is parsed (the body may be `null`)
_UTF8_BOM = b"\xef\xbb\xbf"  # tolerated before a JSON body, as the json module does
_json_decoder = msgspec.json.Decoder()
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded"})

# The formats a request image may be in: the common raster formats. Pillow opens many
# more, but the rarely used decoders are attack surface with little use in serving
# (EPS even runs Ghostscript; AVIF's decoder raises RuntimeError on corrupt files), so
# their files are refused as unrecognised.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")

# What Pillow raises for malformed data while identifying or decoding a file, besides
# UnidentifiedImageError (an OSError), DecompressionBombError and MemoryError: its own
# fuzzing tests accept OSError, SyntaxError, ValueError, NotImplementedError and
# OverflowError; its plugins also let EOFError, struct.error, IndexError, KeyError,
# TypeError and ZeroDivisionError escape on crafted headers.
_PILLOW_DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    NotImplementedError,
    OverflowError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)


@functools.cache
def _register_image_formats() -> None:
    """Load the Pillow plugins of ``IMAGE_FORMATS``, and only those: ``Image.init()``
    (what ``Image.open`` does for a format it has not loaded) imports all ~45 plugins,
    +1.8 MiB in every CPU worker."""
    from PIL import (  # noqa: F401
        BmpImagePlugin,
        GifImagePlugin,
        JpegImagePlugin,
        PngImagePlugin,
        PpmImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )


def _allow_pillow_pixels(max_pixels: int) -> None:
    """Keep Pillow's own decompression-bomb limit from refusing what ours allows.

    Pillow refuses files above twice ``Image.MAX_IMAGE_PIXELS`` (about 179 M pixels by
    default) while opening them. Raised to at least our limit, its check only fires on
    files that ours refuses too, and ``decode_image`` answers those with our 413.
    """
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, max_pixels: int, mode: str = "BGR") -> np.ndarray:
    """Decode encoded image bytes into an HxWx3 uint8 array, with 4xx errors for bad input.

    Only the first frame of an animation or multi-page file is read. EXIF orientation
    is not applied (pixels as stored, as OpenCV and RapidOCR read them). Alpha is
    dropped; 16-bit grey keeps its high byte, as Pillow reads 16-bit colour; other modes
    (CMYK, 1-bit, palette, 32-bit int, float) convert as Pillow converts them to RGB.
    """
    from PIL import Image, UnidentifiedImageError

    if mode not in ("BGR", "RGB"):
        raise ValueError(f"mode must be 'BGR' or 'RGB', got {mode!r}")
    if not data:
        raise BadRequest("empty body: expected an encoded image")
    _register_image_formats()
    _allow_pillow_pixels(max_pixels)
    img = None
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = img.size
        if width < 1 or height < 1:
            raise BadRequest(f"image is {width}x{height} pixels: it has no pixels")
        if width * height > max_pixels:
            raise PayloadTooLarge(
                f"image is {width}x{height} = {width * height} pixels, "
                f"above the limit of {max_pixels}"
            )
        img.load()
        rgb = _rgb_pixels(img)
    except UnidentifiedImageError:
        raise BadRequest(f"body is not a recognised image ({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image is above the limit of {max_pixels} pixels: {exc}") from None
    except MemoryError:
        raise PayloadTooLarge("image needs more memory to decode than the server has") from None
    except _PILLOW_DATA_ERRORS as exc:
        what = "image" if img is None else f"{img.format} image"
        raise BadRequest(f"{what} could not be decoded: {exc or type(exc).__name__}") from None
    if mode == "RGB":
        return rgb
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _rgb_pixels(img: Any) -> np.ndarray:
    """A loaded Pillow image as an HxWx3 uint8 RGB array."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    elif img.mode in ("RGBA", "LA", "PA", "P"):  # through RGBA: palette transparency too
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"))


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
        precision build; ``splitserve build`` gates on the summed ratio (for OCR:
        1 - the character error rate against fp32's text). ``None``: the service has no
        such check, and the build gates on the models' output errors only.
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
