"""What the pipeline's tests hand it instead of a broker and a wall clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedbell.faces.images import Box

Frame = npt.NDArray[np.uint8]


@dataclass
class VisitorEvent:
    person: str
    confidence: float
    box: Box | None


@dataclass
class RecordingSink:
    """An EventSink that records every event (the doorbell publishes them to the broker)."""

    visitors: list[VisitorEvent] = field(default_factory=list)
    rings: list[tuple[str, str | None]] = field(default_factory=list)
    present_states: list[bool] = field(default_factory=list)
    frames: list[Frame | None] = field(default_factory=list)
    """The frame handed over with each visitor and ring event (for its snapshot)."""

    def visitor(
        self,
        person: str,
        confidence: float,
        box: Box | None,
        crop: Frame | None = None,
        frame: Frame | None = None,
    ) -> str:
        self.visitors.append(VisitorEvent(person, confidence, box))
        self.frames.append(frame)
        return "event"

    def ring(self, source: str, person: str | None = None, frame: Frame | None = None) -> str:
        self.rings.append((source, person))
        self.frames.append(frame)
        return "ring"

    def present(self, present: bool) -> None:
        self.present_states.append(present)

    @property
    def persons(self) -> list[str]:
        """Who each visitor event named, in order."""
        return [event.person for event in self.visitors]


class FrameClock:
    """One tick per frame, advanced by the test, so debounce and presence do not depend on
    machine speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
