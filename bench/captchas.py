"""Labelled captchas for ddddocr's character detector: images with the true box of every character.

The detector (``ddddocr/common_det.onnx``) finds the characters of click captchas. These captchas are drawn
here, so the box of each character is known and the detector's task metric is measured against the truth,
not only against the fp32 model's own boxes. Each captcha: 3-6 characters of 28-60 px, each in its own ink
colour and rotated by up to 25 degrees, on a noisy two-colour gradient crossed by a few lines; the true box
is the bounding box of the character's ink. Images are laid out as ddddocr's ``DetectionEngine`` feeds them:
letterboxed onto a 416 x 416 canvas of grey 114, BGR (OpenCV's channel order), raw 0-255 float32 pixels.

The rendering uses Pillow's built-in scalable font, so nothing depends on the fonts a machine has.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["SIZE", "captcha", "labelled", "letterbox"]

SIZE = 416  # the detector's fixed input side
_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt23456789"


@functools.cache
def _font(size: int) -> object:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _glyph(char: str, size: int, angle: float, ink: tuple[int, ...]) -> object:
    """The character rotated by `angle` degrees on a transparent tile cropped to its ink."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGBA", (2 * size, 2 * size), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((size // 2, size // 2), char, font=_font(size), fill=(*ink, 255))  # type: ignore[arg-type]
    tile = tile.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    return tile.crop(tile.getchannel("A").point(lambda a: 255 if a > 96 else 0).getbbox())


def captcha(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One captcha: (HxWx3 uint8 RGB image, [n, 4] true boxes x1 y1 x2 y2 of its characters)."""
    from PIL import Image, ImageDraw

    w, h = int(rng.integers(260, SIZE + 1)), int(rng.integers(120, 261))
    ramp = np.linspace(0.0, 1.0, w)[None, :, None]
    start, end = rng.integers(120, 256, 3), rng.integers(120, 256, 3)
    background = start * (1 - ramp) + end * ramp + rng.normal(0, 8, (h, w, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        ends = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(ends, fill=tuple(int(v) for v in rng.integers(60, 200, 3)), width=int(rng.integers(1, 3)))
    wanted, boxes = int(rng.integers(3, 7)), []
    for _ in range(10 * wanted):
        if len(boxes) == wanted:
            break
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        glyph = _glyph(_CHARS[int(rng.integers(len(_CHARS)))], int(rng.integers(28, 61)), rng.uniform(-25, 25), ink)
        gw, gh = glyph.size  # type: ignore[attr-defined]
        if gw >= w or gh >= h:
            continue
        x, y = int(rng.integers(0, w - gw)), int(rng.integers(0, h - gh))
        box = np.array([x, y, x + gw, y + gh], float)
        if any(box[0] < o[2] + 4 and o[0] < box[2] + 4 and box[1] < o[3] + 4 and o[1] < box[3] + 4 for o in boxes):
            continue  # characters do not touch: each true box holds one character
        image.paste(glyph, (x, y), glyph)  # type: ignore[arg-type]
        boxes.append(box)
    return np.asarray(image), np.array(boxes, float).reshape(-1, 4)


def letterbox(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ddddocr's preprocessing: [1, 3, SIZE, SIZE] float32 BGR on grey 114, and the boxes in its pixels."""
    from PIL import Image

    scale = min(SIZE / image.shape[0], SIZE / image.shape[1])
    rh, rw = int(image.shape[0] * scale), int(image.shape[1] * scale)
    canvas = np.full((SIZE, SIZE, 3), 114.0, np.float32)
    canvas[:rh, :rw] = np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.BILINEAR))
    bgr = canvas[..., ::-1].transpose(2, 0, 1)
    return np.ascontiguousarray(bgr[None], dtype=np.float32), boxes * scale


def labelled(count: int, seed: int) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """`count` captchas drawn from `seed`: the detector's feeds ({"images": ...}) and the true boxes of each."""
    rng = np.random.default_rng(seed)
    feeds, truth = [], []
    for _ in range(count):
        images, boxes = letterbox(*captcha(rng))
        feeds.append({"images": images})
        truth.append(boxes)
    return feeds, truth
