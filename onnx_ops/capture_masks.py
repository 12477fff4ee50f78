"""Row masks of activation capture: which rows of a padded transformer batch are real tokens (see capture)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_ops.feeds import Feed

__all__ = ["AUTO", "find_row_mask", "rows_of"]

AUTO = "auto"  # row_mask: find the attention-mask input among the feeds (find_row_mask)


def find_row_mask(feeds: Sequence[Feed]) -> str | None:
    """The feeds' attention-mask input: 2-D integer or boolean, only 0s and 1s, at least one 1 in every row.

    When several inputs qualify (a single-segment token_type_ids of 0s and 1s could), the one whose name
    says "mask"; None when there is no such input or the choice stays ambiguous.
    """
    if not feeds:
        return None
    found = [name for name in feeds[0] if all(_is_mask(feed.get(name)) for feed in feeds)]
    if len(found) > 1:
        found = [name for name in found if "mask" in name.lower()]
    return found[0] if len(found) == 1 else None


def _is_mask(array: np.ndarray | None) -> bool:
    if array is None or array.ndim != 2 or array.dtype.kind not in "iub" or not array.size:
        return False
    ones = array == 1
    return bool(np.all(ones | (array == 0)) and np.all(ones.any(axis=1)))


def _feed_mask(feed: Feed, name: str | None) -> np.ndarray | None:
    """One feed's [batch, seq] boolean row mask (None: no mask, or it is all ones)."""
    if name is None:
        return None
    if name not in feed:
        raise ValueError(f"the row mask input {name!r} is not in the calibration feeds")
    mask = np.asarray(feed[name]) != 0
    if mask.ndim != 2:
        raise ValueError(f"the row mask input {name!r} is not [batch, seq] but {list(mask.shape)}")
    return None if mask.all() else mask


def rows_of(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[rows, last] of an activation: every leading position, or those the mask keeps when its shape is theirs."""
    rows: np.ndarray = array[mask] if mask is not None and array.shape[:-1] == mask.shape else array
    return rows.reshape(-1, array.shape[-1])
