"""Training items and how a batch of them becomes the decoder's input.

An item is one sequence right-padded to ``seq_len + 1`` ids (:func:`pad_item`): ``ids``
[seq_len + 1], ``weights`` [seq_len] (loss weight of predicting ``ids[t + 1]``, 0 on padding)
and ``length`` (its real ids). A batch is either

* **padded** (``packing: false``): the items stacked, ``[B, seq_len + 1]``; or
* **packed** (``packing: true``, the default; :class:`PackedCollate`): the same ``B`` sequences
  laid first-fit decreasing into as few rows of ``seq_len + 1`` as hold them, with ``doc_ids``
  and ``positions`` so that each sequence attends only to itself and its positions restart at
  0 (:func:`lit_cm3leon.objective.sequence.pack`). Every sequence's logits and loss are those
  of the padded batch (``tests/test_packing.py``); the step computes fewer rows of padding (the
  shapes world's retrieval-augmented sequences are 43% padding at ``seq_len`` 384).

The number of sequences per step stays ``batch_size`` either way; only the rows vary.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import default_collate

from lit_cm3leon.objective.sequence import pack


def pad_item(ids, weights, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to ``seq_len + 1`` ids; ``weights`` are per target (``seq_len``), 0 on pads."""
    ids = np.asarray(ids, dtype=np.int64)[: seq_len + 1]
    w = np.asarray(weights, dtype=np.float32)[1 : seq_len + 1]  # weight of predicting ids[t+1]
    out_ids = np.full(seq_len + 1, pad_id, dtype=np.int64)
    out_w = np.zeros(seq_len, dtype=np.float32)
    out_ids[: len(ids)] = ids
    out_w[: len(w)] = w
    return {
        "ids": torch.from_numpy(out_ids),
        "weights": torch.from_numpy(out_w),
        "length": torch.tensor(len(ids)),
    }


class PackedCollate:
    """Collate padded items into packed rows (``collate_fn`` of the training data loaders).

    Returns ``ids`` [N, L], ``weights`` [N, L - 1], ``doc_ids`` [N, L] (``-1`` on padding) and
    ``positions`` [N, L], with ``L = seq_len + 1`` and ``N <= B`` rows; other per-item fields
    (e.g. the SFT task) are collated as usual, one entry per sequence, and a ``task`` is also
    given per token as ``token_task`` [N, L] (``-1`` on padding).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = items[0]["ids"].numel()
        lengths = [int(it["length"]) for it in items]
        order = sorted(range(len(items)), key=lambda i: -lengths[i])  # first fit decreasing
        seqs = [items[i]["ids"][: lengths[i]].numpy() for i in order]
        # per token: the weight of predicting it (0 on each sequence's first token, whose
        # predecessor in a packed row is another sequence)
        tok_w = [
            np.concatenate([[0.0], items[i]["weights"][: lengths[i] - 1].numpy()]).astype(
                np.float32
            )
            for i in order
        ]
        ids, doc_ids, positions = pack(seqs, width, self.pad_id)
        weights = pack(tok_w, width, 0.0)[0]
        out = default_collate(
            [{k: v for k, v in it.items() if k not in ("ids", "weights")} for it in items]
        )
        out.update(
            ids=torch.from_numpy(ids),
            weights=torch.from_numpy(weights[:, 1:]),
            doc_ids=torch.from_numpy(doc_ids),
            positions=torch.from_numpy(positions),
        )
        if "task" in items[0]:  # each token's sequence's task, laid out as the ids (-1: padding)
            tasks = [np.full(lengths[i], int(items[i]["task"]), dtype=np.int64) for i in order]
            out["token_task"] = torch.from_numpy(pack(tasks, width, -1)[0])
        return out


def collate_fn(packing: bool, pad_id: int):
    """The data loaders' ``collate_fn``: packed rows, or torch's default stacking."""
    return PackedCollate(pad_id) if packing else None
