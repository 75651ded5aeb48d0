"""The accuracy bars a release must clear, and the warning for an evaluation set too small
to measure them (aggregator/gates.py)."""

from __future__ import annotations

from aggregator.config import RoundSettings
from aggregator.gates import accuracy_bar, bars_finer_than_a_face


def test_a_release_is_refused_against_the_published_version_then_the_start() -> None:
    settings = RoundSettings(max_accuracy_drop=0.05, max_accuracy_loss=0.01)
    assert accuracy_bar(0.90, published=0.92, start=0.90, settings=settings) is None
    drop = accuracy_bar(0.80, published=0.90, start=0.70, settings=settings)
    assert drop is not None
    assert (drop.reason, drop.reference) == ("accuracy_drop", 0.90)
    loss = accuracy_bar(0.88, published=0.90, start=0.895, settings=settings)
    assert loss is not None
    assert (loss.reason, loss.bar) == ("accuracy_loss", 0.01)


def test_no_bar_and_no_reference_refuse_nothing() -> None:
    settings = RoundSettings(max_accuracy_drop=None, max_accuracy_loss=None)
    assert accuracy_bar(0.1, published=0.9, start=0.9, settings=settings) is None
    assert accuracy_bar(0.1, published=None, start=None, settings=RoundSettings()) is None


def test_bars_finer_than_one_face_of_the_evaluation_set_are_named() -> None:
    settings = RoundSettings(max_accuracy_drop=0.05, max_accuracy_loss=0.01)
    # 10 faces: a face is 10 points, finer than both bars.
    assert bars_finer_than_a_face(10, settings) == [
        "rounds.max_accuracy_drop (0.05)",
        "rounds.max_accuracy_loss (0.01)",
    ]
    # 50 faces: 2 points a face, only the 1-point bar is finer.
    assert bars_finer_than_a_face(50, settings) == ["rounds.max_accuracy_loss (0.01)"]
    # 150 faces (LFW's held-out people in the demo): 0.7 points a face, both measurable.
    assert bars_finer_than_a_face(150, settings) == []
    assert (
        bars_finer_than_a_face(3, RoundSettings(max_accuracy_drop=None, max_accuracy_loss=None))
        == []
    )
