"""Calibration text for the sentence encoder: made-up sentences, standard-library prose, vocabulary salads.

Recovery fits weights to the calibration data, and a transformer's layers need many real tokens over many
different words: thousands of sentences, far more than bench/tasks.py's lists hold. Nothing is downloaded:
everyday sentences are made from templates and word lists, plain sentences are taken from the docstrings of
Python's standard library, and strings of random whole words from the tokenizer's vocabulary cover the
words neither uses. All are seeded, and the caller passes the sentences to leave out (the evaluation's).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

__all__ = ["docstring_sentences", "made_sentences", "vocabulary_salad"]


def _words(text: str) -> list[str]:
    return text.split("|")


_PEOPLE = _words(
    "my sister|our teacher|the old man|a young woman|the doctor|his friend|the driver|my neighbour|"
    "the children|the manager|a tourist|the farmer|her brother|the students|the nurse|my father|"
    "the waiter|a police officer|the pilot|our guests"
)
_THINGS = _words(
    "the letter|a new car|the kitchen window|an umbrella|the blue bag|a cold drink|the garden gate|"
    "the map|some fresh bread|the old piano|a birthday cake|the red door|his laptop|the tickets|"
    "a warm coat|the keys|the newspaper|a small boat|the lamp|the photos"
)
_PLACES = _words(
    "the station|the park|the market|the hospital|the beach|the airport|the school|the bank|the village|"
    "the museum|the bridge|the hotel|the river|the city centre|the office|the cinema|the bakery|"
    "the library|the stadium|the farm"
)
_TIMES = _words(
    "this morning|last night|every sunday|after lunch|before dinner|next week|in the evening|on monday|"
    "at noon|yesterday|tomorrow|twice a week|in the summer|during the storm|at the weekend"
)
_VERBS_THING = _words(
    "bought|found|lost|painted|carried|opened|cleaned|sold|borrowed|fixed|dropped|forgot|ordered|wrapped|moved"
)
_VERBS_PLACE = _words("walked to|drove to|ran past|arrived at|waited near|left|visited|looked for|stayed at|cycled to")
_ADJECTIVES = _words("tired|happy|late|hungry|busy|worried|quiet|angry|excited|cold|lucky|careful|nervous|proud|sleepy")
_QUESTIONS = _words("where is|have you seen|who took|can you bring|why did they sell|when will we get|do you like")

_TEMPLATES = [
    "{person} {verb_thing} {thing} {time}",
    "{person} {verb_place} {place} {time}",
    "{person} was {adjective} when {person2} {verb_place} {place}",
    "{question} {thing}",
    "{question} {thing} from {place}",
    "{time} {person} {verb_thing} {thing} near {place}",
    "i think {person} is {adjective} today",
    "{person} and {person2} {verb_place} {place} together",
    "please put {thing} next to {thing2}",
    "{person} felt {adjective} because {person2} {verb_thing} {thing}",
    "we {verb_place} {place} {time} but it was closed",
    "it is too {adjective} to go to {place} {time}",
]


def made_sentences(count: int, seed: int, avoid: Collection[str] = ()) -> list[str]:
    """`count` distinct made-up sentences (a tenth are two sentences joined by "and"), none of them in `avoid`."""
    rng = np.random.default_rng(seed)

    def pick(words: list[str]) -> str:
        return words[int(rng.integers(len(words)))]

    def one() -> str:
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        return template.format(
            person=pick(_PEOPLE), person2=pick(_PEOPLE), thing=pick(_THINGS), thing2=pick(_THINGS),
            place=pick(_PLACES), time=pick(_TIMES), verb_thing=pick(_VERBS_THING), verb_place=pick(_VERBS_PLACE),
            adjective=pick(_ADJECTIVES), question=pick(_QUESTIONS),
        )  # fmt: skip

    excluded = set(avoid)
    sentences: dict[str, None] = {}
    while len(sentences) < count:
        sentence = f"{one()} and {one()}" if rng.random() < 0.1 else one()
        if sentence not in excluded:
            sentences[sentence] = None
    return list(sentences)


_MODULES = (
    "argparse", "bisect", "calendar", "collections", "contextlib", "csv", "datetime", "decimal", "difflib",
    "email.message", "fractions", "functools", "heapq", "http.client", "itertools", "json", "logging", "pathlib",
    "queue", "random", "shutil", "sqlite3", "statistics", "string", "tarfile", "textwrap", "threading",
    "unittest", "urllib.parse", "zipfile",
)  # fmt: skip


def docstring_sentences(count: int, seed: int, avoid: Collection[str] = ()) -> list[str]:
    """`count` sentences of 5 to 20 plain words from the docstrings of Python's standard library (varied words)."""
    import importlib
    import inspect
    import re

    found: dict[str, None] = {}
    for name in _MODULES:
        module = importlib.import_module(name)
        for member in [module, *vars(module).values()]:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join((inspect.getdoc(member) or "").split())):
                words = sentence.rstrip(".!?").lower().split()
                if 5 <= len(words) <= 20 and all(w.isalpha() for w in words):
                    found[" ".join(words)] = None
    pool = sorted(set(found) - set(avoid))
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.permutation(len(pool))[:count]]


def vocabulary_salad(vocabulary: Collection[str], count: int, seed: int) -> list[str]:
    """`count` strings of 4 to 14 whole words drawn from a tokenizer's vocabulary (alphabetic, no sub-word pieces)."""
    words = sorted(w for w in vocabulary if w.isalpha() and w.isascii() and len(w) > 1)
    rng = np.random.default_rng(seed)
    return [" ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(4, 15)))) for _ in range(count)]
