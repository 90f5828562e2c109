"""Hostile and broken input over real HTTP: every bad request gets a clear 4xx, nothing dies.

First the cases that once answered 500 (a JPEG cut after a few hundred bytes, a PNG
header claiming 60000x60000 pixels, JSON nested 100,000 deep) and their family (odd
image modes and sizes, animations, EXIF, huge BMP/GIF/WebP headers, base64 in JSON,
content types, empty bodies). Then a property-based test: hypothesis generates random
bodies, content types, JSON documents and image files (valid ones of random modes and
sizes, truncated at random points, with corrupted bytes) and sends them, a few at a
time, while good requests run alongside. An oracle written from the API's contract (not
from the server's code) says which inputs are certainly bad (a 4xx is due), certainly
good (200 with the right answer) or either (a truncated PNG may still decode); every
answer is also checked to be JSON on error, and no server process may die.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from splitserve.media import HEAD_BYTES, image_type
from tests.conftest import TEST_SERVICES, Server

MAX_PIXELS = 200_000  # the servers' --max-image-pixels: a 413 costs little to provoke
SERVICES = [*TEST_SERVICES, "tests.services:ImageStats"]
NUMBER_SERVICES = ("echo", "fixed_one", "padded", "pipeline")
KNOBS = frozenset({"rows", "sleep_ms", "crash"})  # Echo's test knobs: never sent at random
OCR = "examples.ocr.service:OCRService"


@pytest.fixture(scope="module", params=["split", "threaded"])
def server(request) -> Iterator[Server]:
    mode_args = ["--cpu-workers", "2"] if request.param == "split" else ["--mode", "threaded"]
    server = Server(
        SERVICES, *mode_args, "--max-image-pixels", str(MAX_PIXELS), "--max-body-bytes", "4000000"
    )
    yield server
    server.stop()


# --- images ---------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRC) for ``width`` x ``height``, with hardly any data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def claiming(fmt: str, width: int, height: int) -> bytes:
    """A small real file of ``fmt`` whose header is edited to claim width x height."""
    if fmt == "PNG":
        return png_claiming(width, height)
    if fmt == "BMP":  # BITMAPINFOHEADER: signed 32-bit width and height at offset 18
        data = bytearray(encode(Image.new("RGB", (4, 4)), "BMP"))
        struct.pack_into("<ii", data, 18, width, height)
    elif fmt == "GIF":  # logical screen: 16-bit width and height at offset 6
        data = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
        struct.pack_into("<HH", data, 6, width, height)
    elif fmt == "WEBP":  # lossy VP8 frame header: 14-bit width and height after the start code
        data = bytearray(encode(Image.new("RGB", (16, 16)), "WEBP", quality=80))
        struct.pack_into("<HH", data, data.index(b"VP8 ") + 14, width, height)
    else:
        raise ValueError(fmt)
    return bytes(data)


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def mean_bgr(rgb: np.ndarray) -> list[float]:
    return rgb.reshape(-1, 3).mean(axis=0)[::-1].tolist()


def expect_image(
    width: int, height: int, mean: list[float] | None = None
) -> Callable[[httpx.Response], None]:
    """Check an ImageStats answer: the size, and the mean colour when it is known exactly."""

    def check(r: httpx.Response) -> None:
        got = r.json()
        assert (got["width"], got["height"]) == (width, height), got
        if mean is not None:
            assert np.allclose(got["mean_bgr"], mean, rtol=1e-5, atol=1e-3), (got, mean)

    return check


# --- the oracle -----------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What a request's answer must be: 200 (``ok``), a 4xx (not ``ok``), or either."""

    ok: bool | None
    status: int | None = None  # the exact 4xx when the contract fixes it
    check: Callable[[httpx.Response], None] | None = None  # of a 200 answer


EITHER = Expect(None)


def good(check: Callable[[httpx.Response], None] | None = None) -> Expect:
    return Expect(True, 200, check)


def bad(status: int | None = None) -> Expect:
    return Expect(False, status)


@dataclass(frozen=True)
class Case:
    what: str
    service: str
    body: bytes
    content_type: str | None
    expect: Expect

    def __repr__(self) -> str:  # hypothesis prints failing examples; keep them short
        body = self.body if len(self.body) <= 80 else self.body[:80] + b"..."
        return f"Case({self.what!r}, {self.service!r}, {self.content_type!r}, {body!r})"


def media_type(content_type: str | None) -> str:
    return (content_type or "application/octet-stream").partition(";")[0].strip().lower()


def is_json_type(content_type: str | None) -> bool:
    kind = media_type(content_type)
    return kind == "application/json" or kind.endswith("+json")


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def parse_json(body: bytes) -> tuple[bool, Any]:
    """(parsed, document) by RFC 8259 (UTF-8, an optional BOM; no NaN or Infinity)."""
    try:
        return True, json.loads(body.decode("utf-8-sig"), parse_constant=_refuse)
    except (ValueError, RecursionError):
        return False, None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def values_check(service: str, values: list) -> Callable[[httpx.Response], None]:
    """Check a number service's answer: the values back as float32 (doubled by pipeline)."""
    with np.errstate(over="ignore"):  # beyond float32: inf, answered as null
        expected = np.asarray(values, dtype=np.float64).astype(np.float32)
        if service == "pipeline":
            expected = expected * np.float32(2)

    def check(r: httpx.Response) -> None:
        got = r.json()["values"]
        row = got if service == "pipeline" else got[0]
        if service == "padded":  # a batch with longer rows pads this one with zeros
            assert all(v == 0.0 for v in row[len(expected) :]), row
            row = row[: len(expected)]
        assert len(row) == len(expected), (row, expected)
        for g, e in zip(row, expected.tolist(), strict=True):
            assert g == e if math.isfinite(e) else g is None, (row, expected)  # inf is null

    return check


def numbers_expectation(service: str, doc: Any) -> Expect:
    """A JSON document's fate at a number service: {"values": [numbers...]} only."""
    if not isinstance(doc, dict) or not isinstance(doc.get("values"), list):
        return bad(422)
    values = doc["values"]
    if KNOBS & doc.keys():
        return EITHER  # Echo's knobs are not modelled here
    if any(isinstance(v, str | list | dict) or v is None for v in values):
        return bad(422)
    if not values or any(isinstance(v, bool) for v in values):
        return bad(422) if values and all(isinstance(v, bool) for v in values) else EITHER
    if any(isinstance(v, int) and abs(v) > 2**53 for v in values):
        return EITHER  # beyond exact float conversion, or beyond 64-bit integers
    return good(values_check(service, values))


def raw_floats_check(service: str, body: bytes) -> Callable[[httpx.Response], None]:
    def check(r: httpx.Response) -> None:
        assert r.content[: len(body)] == body
        if service != "padded":  # padding, when batched with a longer row
            assert len(r.content) == len(body)
        assert not any(r.content[len(body) :])

    return check


def expectation(service: str, body: bytes, content_type: str | None) -> Expect:
    """The contract, for any body: what ``service`` must answer."""
    if service == "image_stats":
        if is_json_type(content_type):
            parsed, doc = parse_json(body)
            if not parsed:
                return bad(400)
            if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
                return bad(422)
            try:
                image = base64.b64decode(doc["image"], validate=True)
            except ValueError:
                return bad(422)
            return EITHER if image else bad(422)
        kind = media_type(content_type)
        form = kind == "application/x-www-form-urlencoded"
        if form and image_type(body[:HEAD_BYTES]):  # curl's default label: the bytes say image
            return EITHER
        if kind.startswith(("text/", "multipart/")) or form:
            return bad(415)
        return EITHER if body else bad(400)
    if service == "pipeline" or is_json_type(content_type):  # pipeline reads any body as JSON
        parsed, doc = parse_json(body)
        return numbers_expectation(service, doc) if parsed else bad(400)
    if not body or len(body) % 4:  # raw float32 values
        return bad(400)
    return good(raw_floats_check(service, body))


# --- sending and checking -------------------------------------------------------------


def send(server: Server, case: Case) -> httpx.Response:
    headers = {} if case.content_type is None else {"content-type": case.content_type}
    return server.post(case.service, content=case.body, headers=headers)


def check_answer(case: Case, r: httpx.Response) -> None:
    expect = case.expect
    assert r.status_code < 500, f"{case!r}: {r.status_code} {r.text[:300]}"
    if r.status_code == 200:
        assert expect.ok is not False, f"{case!r}: 200 where a 4xx is due: {r.text[:300]}"
        if expect.check is not None:
            expect.check(r)
        return
    assert 400 <= r.status_code < 500, f"{case!r}: {r.status_code}"
    assert expect.ok is not True, f"{case!r}: {r.status_code} {r.text[:300]}"
    if expect.status is not None:
        assert r.status_code == expect.status, f"{case!r}: {r.status_code} {r.text[:300]}"
    error = r.json()["error"]
    assert error["type"] and error["message"], r.text


class GoodTraffic:
    """Good requests sent in a loop from threads alongside a test; each must be a 200."""

    IMAGE = noise(23, 17, seed=5)

    def __init__(self, server: Server, threads: int = 2) -> None:
        self.server = server
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.sent = 0
        self.threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(threads)]
        self.png = encode(Image.fromarray(self.IMAGE), "PNG")

    def _loop(self, index: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            if (i + index) % 2:
                case = Case(
                    "good echo",
                    "echo",
                    json.dumps({"values": [i, i + 0.5]}).encode(),
                    "application/json",
                    good(values_check("echo", [i, i + 0.5])),
                )
            else:
                check = expect_image(23, 17, mean_bgr(self.IMAGE))
                case = Case("good image", "image_stats", self.png, "image/png", good(check))
            try:
                check_answer(case, send(self.server, case))
            except (AssertionError, httpx.HTTPError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.sent += 1
            time.sleep(0.005)

    def __enter__(self) -> GoodTraffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


@contextlib.contextmanager
def nothing_dies(server: Server) -> Iterator[None]:
    """The server's processes are the same ones after the block, and none logged a crash."""
    before = server.children()
    log_start = len(server.log())
    yield
    assert server.proc.poll() is None, server.log()[-3000:]
    assert server.children() == before, (before, server.children())
    if server.mode == "split":
        assert any(name.startswith("splitserve-cpu") for name in before), before
    assert "Traceback" not in server.log()[log_start:], server.log()[log_start:][-3000:]
    assert server.client.get("/health/ready").status_code == 200


# --- the cases that answered 500, and their family ------------------------------------

JPEG = encode(Image.fromarray(noise(160, 120)), "JPEG")


def animated(fmt: str, **options: Any) -> bytes:
    """Three frames of 12x10 noise (the first of seed 0) as one file."""
    frames = [Image.fromarray(noise(12, 10, seed)) for seed in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **options)


DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"


def _named_cases() -> list[Case]:
    png = encode(Image.fromarray(noise(40, 30, seed=2)), "PNG")
    palette = Image.new("P", (9, 7), 3)
    gray16 = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    cases = [
        Case("JPEG cut after 300 bytes", "image_stats", JPEG[:300], "image/jpeg", bad(400)),
        Case("JPEG cut in the scan", "image_stats", JPEG[: len(JPEG) // 2], None, bad(400)),
        Case(
            "PNG header of 60000x60000", "image_stats", png_claiming(60000, 60000), None, bad(413)
        ),
        Case("JSON 100,000 deep", "echo", DEEP_ARRAY, "application/json", bad(400)),
        Case(
            "JSON values 100,000 deep",
            "pipeline",
            b'{"values":' + DEEP_ARRAY + b"}",
            "application/json",
            bad(400),
        ),
        Case("deep JSON with an image", "image_stats", DEEP_ARRAY, "application/json", bad(400)),
        Case("PNG header of 0x0", "image_stats", png_claiming(0, 0), None, bad(400)),
        Case("BMP header of 0x4", "image_stats", claiming("BMP", 0, 4), None, bad(400)),
        Case("EPS (runs Ghostscript) is refused", "image_stats", EPS, None, bad(400)),
        Case(
            "1x1 image",
            "image_stats",
            encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"),
            None,
            good(expect_image(1, 1, [7, 8, 9])),
        ),
        Case(
            "16-bit grey keeps its high byte",
            "image_stats",
            encode(Image.fromarray(gray16), "PNG"),
            None,
            good(expect_image(4, 1, [(0 + 3 + 156 + 255) / 4] * 3)),
        ),
        Case(
            "CMYK JPEG",
            "image_stats",
            encode(Image.new("CMYK", (8, 6)), "JPEG"),
            None,
            good(expect_image(8, 6)),
        ),
        Case(
            "float TIFF",
            "image_stats",
            encode(Image.new("F", (5, 4), 3.5), "TIFF"),
            None,
            good(expect_image(5, 4)),
        ),
        Case(
            "LA PNG",
            "image_stats",
            encode(Image.new("LA", (5, 4)), "PNG"),
            None,
            good(expect_image(5, 4)),
        ),
        Case(
            "palette PNG with transparency",
            "image_stats",
            encode(palette, "PNG", transparency=3),
            None,
            good(expect_image(9, 7)),
        ),
        Case(
            "1-bit BMP",
            "image_stats",
            encode(Image.new("1", (17, 3), 1), "BMP"),
            None,
            good(expect_image(17, 3, [255, 255, 255])),
        ),
        Case(
            "20000x1 image",
            "image_stats",
            encode(Image.new("L", (20000, 1), 50), "PNG"),
            None,
            good(expect_image(20000, 1, [50, 50, 50])),
        ),
        Case(
            "EXIF orientation is not applied",
            "image_stats",
            encode(Image.new("RGB", (10, 4)), "JPEG", exif=exif_orientation(6)),
            None,
            good(expect_image(10, 4)),
        ),
        Case(
            "base64 image in JSON",
            "image_stats",
            json.dumps({"image": base64.b64encode(png).decode()}).encode(),
            "application/json",
            good(expect_image(40, 30, mean_bgr(noise(40, 30, seed=2)))),
        ),
        Case("empty body", "image_stats", b"", None, bad(400)),
        Case("empty base64", "image_stats", b'{"image": ""}', "application/json", bad(422)),
        Case("invalid base64", "image_stats", b'{"image": "%%%"}', "application/json", bad(422)),
        Case(
            "image of the wrong JSON type",
            "image_stats",
            b'{"image": 12}',
            "application/json",
            bad(422),
        ),
        Case("JSON array instead of object", "image_stats", b"[1]", "application/json", bad(422)),
        Case("text/plain image", "image_stats", png, "text/plain", bad(415)),
        Case(
            "multipart image",
            "image_stats",
            b"--x\r\n\r\n" + png,
            "multipart/form-data; b=x",
            bad(415),
        ),
        Case(
            "form-encoded image",
            "image_stats",
            b"image=abc",
            "application/x-www-form-urlencoded",
            bad(415),
        ),
        Case(  # what `curl --data-binary @page.png` sends
            "image bytes under curl's default label",
            "image_stats",
            png,
            "application/x-www-form-urlencoded",
            good(),
        ),
        Case("values of strings", "echo", b'{"values": ["a"]}', "application/json", bad(422)),
        Case(
            "values of unequal lists",
            "pipeline",
            b'{"values": [[1], [2, 3]]}',
            "application/json",
            bad(422),
        ),
        Case("values of nulls", "fixed_one", b'{"values": [null]}', "application/json", bad(422)),
        Case("NaN is not JSON", "echo", b'{"values": [NaN]}', "application/json", bad(400)),
        Case(
            "JSON with a UTF-8 BOM",
            "echo",
            b'\xef\xbb\xbf{"values": [2]}',
            "application/json; charset=utf-8",
            good(values_check("echo", [2])),
        ),
        Case(
            "rows of the wrong type",
            "echo",
            b'{"values": [1], "rows": "x"}',
            "application/json",
            bad(422),
        ),
        Case("negative rows", "echo", b'{"values": [1], "rows": -1}', "application/json", bad(422)),
    ]
    first_frame = mean_bgr(noise(12, 10, seed=0))
    cases += [
        Case("animated GIF", "image_stats", animated("GIF"), None, good(expect_image(12, 10))),
        Case(
            "animated WebP",
            "image_stats",
            animated("WEBP", lossless=True),
            None,
            good(expect_image(12, 10, first_frame)),
        ),
        Case(
            "TIFF of three pages",
            "image_stats",
            animated("TIFF"),
            None,
            good(expect_image(12, 10, first_frame)),
        ),
    ]
    cases += [
        Case(f"{fmt} header of {w}x{h}", "image_stats", claiming(fmt, w, h), None, bad(413))
        for fmt, w, h in [
            ("BMP", 60000, 60000),
            ("BMP", -4, 4),
            ("GIF", 65535, 65535),
            ("GIF", 1000, 1000),
            ("WEBP", 16383, 16383),
            ("WEBP", 1000, 1000),
        ]
    ]
    return cases


NAMED_CASES = _named_cases()


@pytest.mark.parametrize("case", NAMED_CASES, ids=[c.what for c in NAMED_CASES])
def test_named_hostile_inputs(server: Server, case: Case) -> None:
    r = send(server, case)
    check_answer(case, r)
    assert expectation(case.service, case.body, case.content_type).ok in (None, case.expect.ok)


def test_the_messages_say_what_is_wrong(server: Server) -> None:
    messages = {
        "image could not be decoded: Truncated File Read": (JPEG[:300], None),
        "above the limit of 200000 pixels": (png_claiming(60000, 60000), None),
        "not a recognised image": (b"GIF87 but not quite", None),
        "nested too deeply": (DEEP_ARRAY, "application/json"),
        "not an image": (b"abc", "text/plain"),
    }
    for message, (body, content_type) in messages.items():
        service = "echo" if content_type == "application/json" else "image_stats"
        r = send(server, Case("", service, body, content_type, EITHER))
        assert message in r.json()["error"]["message"], (message, r.text)


# --- the property-based test ----------------------------------------------------------

# Modes each format can store (Pillow's writers); the exact mean is checked for RGB and L
# in lossless formats.
FORMAT_MODES = {
    "PNG": ("RGB", "L", "LA", "RGBA", "P", "1", "I;16"),
    "JPEG": ("RGB", "L", "CMYK"),
    "BMP": ("RGB", "L", "P", "1"),
    "GIF": ("RGB", "L", "P"),
    "WEBP": ("RGB", "RGBA"),
    "TIFF": ("RGB", "L", "LA", "RGBA", "CMYK", "1", "I;16", "I", "F"),
    "PPM": ("RGB", "L", "1"),
}
LOSSLESS = frozenset({"PNG", "BMP", "TIFF", "PPM", "WEBP"})
MULTI_FRAME = frozenset({"GIF", "WEBP", "TIFF"})

CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            None,
            "application/octet-stream",
            "image/jpeg",
            "image/png",
            "text/plain",
            "text/html; charset=utf-8",
            "multipart/form-data; boundary=xyz",
            "application/x-www-form-urlencoded",
            "application/json",
            "Application/JSON; charset=UTF-8",
            "application/vnd.api+json",
            "",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip),
)

KEYS = st.text(max_size=8).filter(lambda k: k not in KNOBS)
NUMBERS = st.one_of(st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | NUMBERS | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=12,
)


@dataclass(frozen=True)
class ImageFile:
    data: bytes
    width: int
    height: int
    mean_bgr: list[float] | None  # when the format and mode keep the pixels exactly

    def check(self, *, pixels: bool = True) -> Callable[[httpx.Response], None]:
        return expect_image(self.width, self.height, self.mean_bgr if pixels else None)


@st.composite
def images(draw: st.DrawFn) -> ImageFile:
    """A valid image file of a random format, mode, size (some very flat or tall) and
    frame count; JPEGs may carry an EXIF orientation."""
    fmt = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[fmt]))
    width, height = draw(
        st.one_of(
            st.tuples(st.integers(1, 48), st.integers(1, 48)),
            st.tuples(st.integers(1, 3), st.integers(100, 3000)),
            st.tuples(st.integers(100, 3000), st.integers(1, 3)),
        )
    )
    rgb = noise(width, height, draw(st.integers(0, 2**16)))
    if mode == "L":
        rgb = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[:, :, None], 3, axis=2)
    first = Image.fromarray(rgb).convert(mode)
    options: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    if fmt in MULTI_FRAME and draw(st.booleans()):
        more = [Image.new(mode, (width, height))] * draw(st.integers(1, 2))
        options |= {"save_all": True, "append_images": more}
    if fmt == "JPEG" and draw(st.booleans()):
        options["exif"] = exif_orientation(draw(st.integers(1, 8)))
    exact = mode in ("RGB", "L") and fmt in LOSSLESS
    return ImageFile(encode(first, fmt, **options), width, height, mean_bgr(rgb) if exact else None)


@st.composite
def image_cases(draw: st.DrawFn) -> Case:
    image = draw(images())
    data = image.data
    how = draw(st.sampled_from(["raw", "json", "truncated", "corrupted", "typed"]))
    if how == "raw":
        content_type = draw(st.sampled_from([None, "image/png", "application/octet-stream"]))
        return Case("image", "image_stats", data, content_type, good(image.check()))
    if how == "json":
        body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
        return Case("base64 image", "image_stats", body, "application/json", good(image.check()))
    if how == "truncated":  # if it still decodes (a PNG without its end), the size is right
        cut = draw(st.integers(0, len(data) - 1))
        expect = bad(400) if cut == 0 else Expect(None, check=image.check(pixels=False))
        return Case(f"image cut at {cut}", "image_stats", data[:cut], None, expect)
    if how == "corrupted":
        corrupted = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            corrupted[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return Case("corrupted image", "image_stats", bytes(corrupted), None, EITHER)
    content_type = draw(CONTENT_TYPES)
    expect = expectation("image_stats", data, content_type)
    if expect.ok is None:  # a valid image under a content type that allows one
        expect = good(image.check())
    return Case("image, any type", "image_stats", data, content_type, expect)


@st.composite
def huge_header_cases(draw: st.DrawFn) -> Case:
    fmt = draw(st.sampled_from(["PNG", "BMP", "GIF", "WEBP"]))
    limit = {"PNG": 2**31 - 1, "BMP": 2**31 - 1, "GIF": 65535, "WEBP": 16383}[fmt]
    width = draw(st.integers(MAX_PIXELS // 1000 + 1, limit))
    height = draw(st.integers(MAX_PIXELS // width + 1, limit))
    return Case(
        f"{fmt} claiming {width}x{height}",
        "image_stats",
        claiming(fmt, width, height),
        None,
        bad(413),
    )


@st.composite
def json_cases(draw: st.DrawFn) -> Case:
    service = draw(st.sampled_from([*NUMBER_SERVICES, "image_stats"]))
    doc = draw(
        st.one_of(
            JSON_VALUES,
            st.fixed_dictionaries({"values": JSON_VALUES}, optional={"x": JSON_VALUES}),
            st.fixed_dictionaries({"values": st.lists(NUMBERS, min_size=1, max_size=16)}),
            st.fixed_dictionaries({"image": JSON_VALUES | st.text(max_size=40)}),
        )
    )
    content_type = draw(st.sampled_from(["application/json", "application/json; charset=utf-8"]))
    body = json.dumps(doc).encode()
    return Case("JSON", service, body, content_type, expectation(service, body, content_type))


@st.composite
def deep_json_cases(draw: st.DrawFn) -> Case:
    depth = draw(st.integers(2_000, 200_000))
    opening = draw(st.sampled_from([b"[", b'{"a":']))
    closing = b"]" if opening == b"[" else b"}"
    body = opening * depth + b"1" + closing * depth
    service = draw(st.sampled_from([*NUMBER_SERVICES, "image_stats"]))
    return Case(f"JSON {depth} deep", service, body, "application/json", bad(400))


@st.composite
def raw_cases(draw: st.DrawFn) -> Case:
    service = draw(st.sampled_from([*NUMBER_SERVICES, "image_stats"]))
    float32_bits = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=16)
    body = draw(
        st.one_of(
            st.binary(max_size=256), float32_bits.map(lambda w: struct.pack(f"<{len(w)}I", *w))
        )
    )
    content_type = draw(CONTENT_TYPES)
    return Case("raw", service, body, content_type, expectation(service, body, content_type))


ANY_CASE = st.one_of(
    image_cases(), huge_header_cases(), json_cases(), deep_json_cases(), raw_cases()
)
PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_random_input_gets_a_4xx_and_good_requests_pass_alongside(server: Server) -> None:
    seen: set[tuple[str, bool, bool]] = set()  # (services, JSON body, answered 200)
    with nothing_dies(server), GoodTraffic(server) as traffic, ThreadPoolExecutor(3) as pool:

        @PROPERTY_SETTINGS
        @given(st.lists(ANY_CASE, min_size=1, max_size=3))
        def sent_together(cases: list[Case]) -> None:
            for case, r in zip(cases, pool.map(lambda c: send(server, c), cases), strict=True):
                check_answer(case, r)
                kind = "image" if case.service == "image_stats" else "numbers"
                seen.add((kind, is_json_type(case.content_type), r.status_code == 200))

        sent_together()
    assert traffic.sent > 20 and not traffic.failures, traffic.failures[:5]
    # the examples reached every kind of answer: good and bad images and numbers, raw and JSON
    assert len(seen) == 8, sorted(seen)


# --- the OCR demo on odd images -------------------------------------------------------


@pytest.fixture(scope="module")
def ocr_server() -> Iterator[Server]:
    server = Server([OCR], "--cpu-workers", "1", "--max-image-pixels", "3000000")
    yield server
    server.stop()


def _ocr_results(r: httpx.Response) -> None:
    assert isinstance(r.json()["results"], list), r.text


OCR_CASES = [
    ("1x1", encode(Image.new("RGB", (1, 1)), "PNG"), 200),
    ("all black page", encode(Image.new("RGB", (640, 480)), "JPEG"), 200),
    ("20000x1", encode(Image.new("L", (20000, 1), 255), "PNG"), 422),
    ("1x20000", encode(Image.new("L", (1, 20000), 255), "PNG"), 422),
    ("3x300, too narrow to detect in", encode(Image.new("RGB", (3, 300)), "PNG"), 422),
    ("16-bit grey", encode(Image.fromarray(np.full((40, 60), 40000, np.uint16)), "PNG"), 200),
    ("CMYK", encode(Image.new("CMYK", (50, 40)), "JPEG"), 200),
    ("animated GIF", animated("GIF"), 200),
]


@pytest.mark.parametrize(("what", "body", "status"), OCR_CASES, ids=[c[0] for c in OCR_CASES])
def test_ocr_answers_odd_images_without_a_5xx(ocr_server: Server, what, body, status) -> None:
    r = ocr_server.post("ocr", content=body)
    assert r.status_code == status, r.text
    if status == 200:
        _ocr_results(r)
    else:
        assert r.json()["error"]["message"], r.text


@st.composite
def ocr_cases(draw: st.DrawFn) -> Case:
    """Small images (the OCR pipeline is slow here) of any format and mode, some broken."""
    fmt = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[fmt]))
    width, height = draw(st.integers(8, 64)), draw(st.integers(8, 64))
    data = encode(
        Image.fromarray(noise(width, height, draw(st.integers(0, 99)))).convert(mode), fmt
    )
    how = draw(st.sampled_from(["good", "truncated", "corrupted"]))
    if how == "good":
        return Case(f"{mode} {fmt}", "ocr", data, None, good(_ocr_results))
    if how == "truncated":
        return Case("truncated", "ocr", data[: draw(st.integers(1, len(data) - 1))], None, EITHER)
    corrupted = bytearray(data)
    corrupted[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return Case("corrupted", "ocr", bytes(corrupted), None, EITHER)


def test_ocr_random_images_get_200_or_a_4xx(ocr_server: Server) -> None:
    with nothing_dies(ocr_server), ThreadPoolExecutor(2) as pool:

        @settings(PROPERTY_SETTINGS, max_examples=8)
        @given(st.lists(ocr_cases(), min_size=1, max_size=2))
        def sent_together(cases: list[Case]) -> None:
            for case, r in zip(cases, pool.map(lambda c: send(ocr_server, c), cases), strict=True):
                check_answer(case, r)

        sent_together()
