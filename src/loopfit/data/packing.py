"""Pack tokenised documents into fixed-length rows.

Each document is followed by one EOS separator. A document (with its separator) that fits in a row is never split:
if it does not fit in what is left of the current row, that rest is padded and masked and the document starts a
new row. A longer document fills the rest of the current row and continues over as many rows as it needs. Nothing
is dropped. Per-document position ids restart at 0 at every document start and at every row start (a document
continued from the previous row cannot attend to its earlier part, so its positions restart too); padding counts
as one more segment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from loopfit.data.chat import TokenizedDocument

IGNORE_INDEX = -100


@dataclass
class PackedRows:
    """Packed rows as arrays of shape (rows, seq_len)."""

    input_ids: np.ndarray
    labels: np.ndarray
    """Unshifted targets (HF convention: the model shifts); IGNORE_INDEX where there is no loss."""
    position_ids: np.ndarray
    """Per-document positions (restarting at each document and row start)."""
    num_tokens: np.ndarray
    """Per row: how many leading tokens are real (the rest is padding)."""


def pack_documents(docs: Iterable[TokenizedDocument], seq_len: int, eos_id: int, pad_id: int) -> PackedRows:
    """Pack documents in the given order (see the module docstring for the rules)."""
    ids_rows: list[list[int]] = []
    lab_rows: list[list[int]] = []
    pos_rows: list[list[int]] = []
    ids: list[int] = []
    lab: list[int] = []
    pos: list[int] = []

    def flush() -> None:
        nonlocal ids, lab, pos
        if ids:
            ids_rows.append(ids)
            lab_rows.append(lab)
            pos_rows.append(pos)
        ids, lab, pos = [], [], []

    for doc in docs:
        tokens = [*doc.input_ids, eos_id]
        targets = [t if m else IGNORE_INDEX for t, m in zip(doc.input_ids, doc.trainable)]
        targets.append(eos_id if doc.train_separator else IGNORE_INDEX)
        if len(tokens) <= seq_len and len(ids) + len(tokens) > seq_len:
            flush()
        offset = 0
        while offset < len(tokens):
            if len(ids) == seq_len:
                flush()
            take = min(seq_len - len(ids), len(tokens) - offset)
            ids.extend(tokens[offset : offset + take])
            lab.extend(targets[offset : offset + take])
            pos.extend(range(take))
            offset += take
    flush()

    n = len(ids_rows)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    position_ids = np.zeros((n, seq_len), dtype=np.int32)
    num_tokens = np.zeros(n, dtype=np.int32)
    for r, (i, t, p) in enumerate(zip(ids_rows, lab_rows, pos_rows)):
        k = len(i)
        input_ids[r, :k] = i
        labels[r, :k] = t
        position_ids[r, :k] = p
        position_ids[r, k:] = np.arange(seq_len - k)
        num_tokens[r] = k
    return PackedRows(input_ids, labels, position_ids, num_tokens)
