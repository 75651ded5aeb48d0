"""make bench-edge's set-up without running it: the unit's settings, the chroot, readiness."""

from __future__ import annotations

from pathlib import Path

from bench.edge_rounds import serving
from bench.edge_setup import UNIT, Layout, unit_environment
from fedbell.wire.protocol import DeviceStatus


def test_the_doorbell_runs_with_the_units_environment_but_not_its_specifiers() -> None:
    env = unit_environment(UNIT)
    assert env["MALLOC_ARENA_MAX"] == "2"
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    assert "HOME" not in env  # %S/...: a systemd specifier, meaningless here


def test_in_a_chroot_paths_and_the_python_are_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    work = root / "var" / "tmp" / "bench"
    layout = Layout(work, root, "/opt/fedbell/venv/bin/python", {"MALLOC_ARENA_MAX": "2"})
    assert layout.inside(work / "edge.yaml") == "/var/tmp/bench/edge.yaml"
    command = layout.command("-m", "edge")
    assert command[:4] == ["chroot", str(root), "/usr/bin/env", "-i"]
    assert "MALLOC_ARENA_MAX=2" in command
    assert command[-3:] == ["/opt/fedbell/venv/bin/python", "-m", "edge"]
    assert layout.cwd is None
    here = Layout(tmp_path, None, "python3")
    assert here.command("-m", "edge") == ["python3", "-m", "edge"]
    assert here.inside(tmp_path / "x") == str(tmp_path / "x")


def test_the_doorbell_is_ready_once_it_serves_a_model() -> None:
    def status(detail: str) -> DeviceStatus:
        return DeviceStatus(state="online", model_version=0, detail=detail)

    assert serving(status("model v0: 5 people, 40 photos; camera connected"))
    assert not serving(status("5 people, 40 photos; waiting for a model"))
    assert not serving(status(""))
