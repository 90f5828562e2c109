"""Generate synthetic document images for the OCR example, its tests and benchmarks.

Each image holds several lines of English text (words and numbers) drawn with DejaVu
fonts of several faces and sizes; some lines are upside down, so the angle classifier
matters, and some images sit on a photo-like background (gradients, noise, blur) rather
than clean paper. Next to every image a ``<stem>.json`` file records the ground truth
(each line's text, whether it is rotated, and its box), which ``load_truth`` reads.

Output is deterministic for a seed (same Pillow / FreeType / libjpeg versions).

    python examples/ocr/make_images.py OUT_DIR --count 20 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/share/fonts/TTF"),
    Path("/usr/local/share/fonts"),
    Path("/Library/Fonts"),
)
# Faces that OCR reads reliably at these sizes (no extra-light, no slashed-zero mono).
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSerifCondensed.ttf",
    "DejaVuSans-Oblique.ttf",
)

_WORD_TEXT = """
account address amount annual balance bank before billing board budget business
capital card cash center change charge city client company contract cost credit
current customer daily date delivery department deposit design details document due
energy estimate expense export factory final finance fiscal form freight fund garden
general good growth health hotel import income insurance interest invoice item
journal label letter limit loan local market medical meeting member method model
monthly north notice number office online order owner package paid paper parcel
payment period personal phone plan price print product project public quarter rate
receipt record region rental report request return revenue review river room safety
sales sample school season second service shipping signal south station status stock
storage store street summary supply system table tax team total trade travel unit
update value vendor water weekly window winter year
"""
WORDS = tuple(_WORD_TEXT.split())


@cache
def font_paths() -> tuple[Path, ...]:
    """The DejaVu font files of this machine (fc-list first, then the usual folders)."""
    found: dict[str, Path] = {}
    if shutil.which("fc-list"):
        try:
            listing = subprocess.run(
                ["fc-list", ":", "file"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        for line in listing.splitlines():
            path = Path(line.split(":")[0].strip())
            if path.name in FONT_FILES:
                found.setdefault(path.name, path)
    for folder in FONT_DIRS:
        for name in FONT_FILES:
            if name not in found and (folder / name).is_file():
                found[name] = folder / name
    if not found:
        raise FileNotFoundError(
            "no DejaVu fonts found (install fonts-dejavu-core / dejavu-sans-fonts)"
        )
    return tuple(found[name] for name in FONT_FILES if name in found)


@cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def _number(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return f"{rng.randint(1, 9999)}"
    if kind == 1:
        return f"${rng.randint(1, 99)},{rng.randint(0, 999):03d}.{rng.randint(0, 99):02d}"
    if kind == 2:
        return f"{rng.randint(1, 99)}.{rng.randint(0, 9)}%"
    if kind == 3:
        return f"{rng.randint(2001, 2029)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == 4:
        return f"No.{rng.randint(100, 99999)}"
    return f"{rng.randint(200, 999)}-{rng.randint(1000, 9999)}"


def _line_text(rng: random.Random) -> str:
    words: list[str] = []
    for _ in range(rng.randint(2, 6)):
        if rng.random() < 0.25:
            words.append(_number(rng))
        else:
            word = rng.choice(WORDS)
            words.append(word.capitalize() if rng.random() < 0.3 else word)
    return " ".join(words)


def _paper(rng: random.Random, np_rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Clean, slightly tinted paper."""
    tint = np.array([rng.randint(238, 255) for _ in range(3)], dtype=np.float32)
    img = np.broadcast_to(tint, (h, w, 3)).copy()
    img += np_rng.normal(0.0, 1.5, size=(h, w, 1)).astype(np.float32)
    return img


def _photo(rng: random.Random, np_rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A photo-like background: a light colour gradient plus soft low-frequency blotches."""
    c0 = np.array([rng.randint(170, 250) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(170, 250) for _ in range(3)], dtype=np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * np.cos(angle) / w + ys * np.sin(angle) / h
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    blotch = np_rng.normal(0.0, 18.0, size=(6, 8, 3)).astype(np.float32)
    blotch_img = Image.fromarray(np.clip(blotch + 128.0, 0, 255).astype(np.uint8))
    img += np.asarray(blotch_img.resize((w, h), Image.Resampling.BICUBIC), np.float32) - 128.0
    return img


def _render(
    rng: random.Random, np_rng: np.random.Generator, index: int
) -> tuple[Image.Image, dict[str, Any]]:
    width = rng.randint(800, 1300)
    height = rng.randint(700, 1200)
    photo = index % 3 == 2
    canvas = (_photo if photo else _paper)(rng, np_rng, width, height)
    # Each line is drawn on its own coverage layer, then blended in with its colour.
    colours: list[tuple[Image.Image, tuple[int, int, int]]] = []
    fonts = font_paths()
    # Every image but each fourth has upside-down lines (the first two always do).
    n_rotated = 0 if index % 4 == 3 else rng.randint(1, 2)
    margin_x = rng.randint(40, 90)
    y = rng.randint(40, 80)
    lines: list[dict[str, Any]] = []
    while True:
        size = rng.randint(26, 42)
        font = _font(rng.choice(fonts), size)
        text = _line_text(rng)
        while len(text.split()) > 1 and font.getlength(text) > width - 2 * margin_x:
            text = text.rsplit(" ", 1)[0]
        left, top, right, bottom = font.getbbox(text)
        box_w, box_h = right - left + 8, bottom - top + 8
        if y + box_h > height - 40 or box_w > width - 2 * margin_x:
            break
        x = margin_x + rng.randint(0, max(0, width - 2 * margin_x - box_w) // 3)
        layer = Image.new("L", (box_w, box_h), 0)
        ImageDraw.Draw(layer).text((4 - left, 4 - top), text, font=font, fill=255)
        lines.append({"text": text, "rotated": False, "box": [x, y, x + box_w, y + box_h]})
        colour = tuple(rng.randint(0, 70) for _ in range(3))
        colours.append((layer, colour))  # type: ignore[arg-type]
        y += box_h + int(size * rng.uniform(0.7, 1.2))
    for i in rng.sample(range(len(lines)), min(n_rotated, len(lines))):
        lines[i]["rotated"] = True
        colours[i] = (colours[i][0].rotate(180), colours[i][1])

    for line, (layer, colour) in zip(lines, colours, strict=True):
        x0, y0 = line["box"][:2]
        alpha = np.asarray(layer, np.float32)[..., None] / 255.0
        region = canvas[y0 : y0 + layer.height, x0 : x0 + layer.width]
        region[:] = region * (1.0 - alpha) + np.array(colour, np.float32) * alpha
    if photo:
        canvas += np_rng.normal(0.0, rng.uniform(5.0, 10.0), size=canvas.shape).astype(np.float32)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    if photo:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.1)))
    truth = {"width": width, "height": height, "photo": photo, "lines": lines}
    return image, truth


def generate_documents(
    out_dir: Path, count: int, seed: int = 0, *, truth: bool = True
) -> list[Path]:
    """Write ``count`` document images (alternately JPEG and PNG) and their truth files
    (``truth=False``: images only, e.g. a calibration folder of requests)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index in range(count):
        rng = random.Random(seed * 1_000_003 + index)
        np_rng = np.random.default_rng([seed, index])
        image, labels = _render(rng, np_rng, index)
        if index % 2 == 0:
            path = out_dir / f"doc_{index:04d}.jpg"
            image.save(path, "JPEG", quality=rng.randint(85, 95))
        else:
            path = out_dir / f"doc_{index:04d}.png"
            image.save(path, "PNG")
        if truth:
            path.with_suffix(".json").write_text(json.dumps(labels, indent=1))
        paths.append(path)
    return paths


def load_truth(image_path: Path) -> dict[str, Any]:
    """The ground truth ``generate_documents`` wrote next to an image."""
    return json.loads(Path(image_path).with_suffix(".json").read_text())


def blank_image(width: int = 800, height: int = 600) -> bytes:
    """A PNG of plain, faintly shaded paper with no text on it."""
    shade = np.linspace(235, 250, width, dtype=np.float32)
    img = np.broadcast_to(shade[None, :, None], (height, width, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, "PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blank", action="store_true", help="also write blank.png")
    parser.add_argument("--no-truth", action="store_true", help="images only, no .json truth")
    args = parser.parse_args(argv)
    paths = generate_documents(args.out_dir, args.count, args.seed, truth=not args.no_truth)
    if args.blank:
        (args.out_dir / "blank.png").write_bytes(blank_image())
    print(f"wrote {len(paths)} images to {args.out_dir}")


if __name__ == "__main__":
    main()
