"""Bounds on what an upload can make us store or show: one helper cuts a text, one bounds a JSON-like tree.

A model's names, domains and data keys are the uploader's strings, of any length. Every message, record and
report that may carry them goes through these helpers where it is created or serialized, so that no field
(including ones added later) can make a stored record or an answer grow with the upload.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_ITEMS", "MAX_TEXT_CHARS", "bound_tree", "bound_within", "cut"]

MAX_TEXT_CHARS = 1000  # any one message, name or label
MAX_ITEMS = 1000  # entries of any one list or mapping
_ELLIPSIS = "…"
# Each pass keeps at most this many items per list and chars per string; a tree still too big gets the next one.
_LEVELS = ((MAX_ITEMS, MAX_TEXT_CHARS), (200, 200), (50, 80), (10, 40), (10, 24))
# Mappings keep at least this many keys of at least this many chars: a record's own field names and its
# fields stay whole (they are fewer and shorter), so a bounded record still has its shape.
_MIN_KEYS, _MIN_KEY_CHARS = 64, 64


def cut(text: object, limit: int = MAX_TEXT_CHARS) -> str:
    """The text (str() of anything else) cut to `limit` characters: its head, "…" and its tail.

    Both ends are kept because messages say what is wrong at the start and ONNX names differ at the end.
    """
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return s
    if limit <= 1:
        return _ELLIPSIS[:limit]
    head = (limit - 1) * 2 // 3
    tail = limit - 1 - head
    return s[:head] + _ELLIPSIS + (s[-tail:] if tail else "")


def bound_tree(value: Any, items: int = MAX_ITEMS, chars: int = MAX_TEXT_CHARS, notes: list[str] | None = None) -> Any:
    """A copy of a JSON-like tree with every string (keys too) cut to `chars` and every list and dict to `items`.

    Mappings keep at least 64 keys of 64 chars (a record's own fields stay whole). Each list or dict that
    lost entries is named in `notes` as "PATH: first N of M kept". Numbers, booleans and None are kept.
    """
    return _walk(value, items, chars, notes if notes is not None else [], "")


def bound_within(value: Any, max_bytes: int) -> tuple[Any, list[str]]:
    """A bounded copy of a JSON-like tree whose JSON text (indented by 2) has about `max_bytes` bytes at most.

    Returns the copy and the notes naming what was cut.

    The first pass uses the general bounds (MAX_ITEMS, MAX_TEXT_CHARS); a tree still larger is cut harder,
    pass after pass. The last pass's tree is returned in any case (its size then depends only on the
    tree's depth, which the caller's schema fixes).
    """
    notes: list[str] = []
    bounded = value
    for items, chars in _LEVELS:
        notes = []
        bounded = _walk(value, items, chars, notes, "")
        if _json_size(bounded) <= max_bytes:
            break
    return bounded, notes


def _walk(value: Any, items: int, chars: int, notes: list[str], path: str) -> Any:
    if isinstance(value, str):
        return cut(value, chars)
    if isinstance(value, dict):
        keys, keep = list(value), max(items, _MIN_KEYS)
        if len(keys) > keep:
            notes.append(f"{path or 'the top level'}: first {keep} of {len(keys)} entries kept")
        out: dict[Any, Any] = {}
        for key in keys[:keep]:
            name = cut(key, max(chars, _MIN_KEY_CHARS)) if isinstance(key, str) else key
            out[name] = _walk(value[key], items, chars, notes, f"{path}.{name}" if path else str(name))
        return out
    if isinstance(value, list | tuple):
        if len(value) > items:
            notes.append(f"{path or 'the top level'}: first {items} of {len(value)} items kept")
        return [_walk(v, items, chars, notes, f"{path}[{i}]") for i, v in enumerate(value[:items])]
    return value


def _json_size(value: Any) -> int:
    """Bytes of the tree as indented JSON (an upper bound of its compact form)."""
    return len(json.dumps(value, default=str, ensure_ascii=False, indent=2).encode())
