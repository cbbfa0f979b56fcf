"""A Document: the unit the model reads, an ordered list of text and image segments.

Text segments are strings; they may carry location tokens written as ``<loc:N>`` inline
(spatially grounded tasks). Image segments are VQ code grids ``int64[h, w]`` with codes in
``[0, n_image)`` (not yet offset into the shared id space; the codec does that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True, eq=False)
class Image:
    codes: np.ndarray  # int64[h, w], VQ codes in [0, n_image)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and np.array_equal(self.codes, other.codes)

    __hash__ = None  # type: ignore[assignment]


Segment = Text | Image


@dataclass
class Document:
    segments: list[Segment] = field(default_factory=list)

    @property
    def is_multimodal(self) -> bool:
        kinds = {type(s) for s in self.segments}
        return Text in kinds and Image in kinds

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.segments if isinstance(s, Text)]

    @property
    def images(self) -> list[np.ndarray]:
        return [s.codes for s in self.segments if isinstance(s, Image)]
