"""Face folders: listing `<person>/<image>` (the aggregator's stranger and held-out
folders, the simulation's datasets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbell.faces.dataset import Sample, list_samples


def samples(persons: int, each: int) -> list[Sample]:
    return [Sample(f"p{p}", Path(f"p{p}/{i}.png")) for p in range(persons) for i in range(each)]


def test_list_samples_takes_images_of_person_folders_only(tmp_path: Path) -> None:
    for relative in ("bob/2.jpg", "bob/1.PNG", "ann/a.pgm", "ann/.hidden.png", "ann/notes.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / ".cache" / "x.png").parent.mkdir()
    (tmp_path / ".cache" / "x.png").write_bytes(b"x")
    (tmp_path / "loose.png").write_bytes(b"x")  # not in a person's folder
    assert list_samples(tmp_path) == [
        Sample("ann", tmp_path / "ann" / "a.pgm"),
        Sample("bob", tmp_path / "bob" / "1.PNG"),
        Sample("bob", tmp_path / "bob" / "2.jpg"),
    ]


def test_list_samples_says_what_is_wrong_with_a_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_samples(tmp_path / "absent")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "notes.txt").write_text("no photos")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_samples(tmp_path)
