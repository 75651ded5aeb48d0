"""Issue 12: what a Raspberry Pi install gets (the full run is `make pi-check`, opt-in)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from deploy import provision

REPO = Path(__file__).resolve().parents[1]


def test_a_provisioned_doorbell_uses_the_pi_camera(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge.config import EdgeConfig
    from fedbell.config import load_config

    site = tmp_path / "site"
    provision.run(["init", "--site", "home", "--broker-host", "hub.lan", "--site-dir", str(site)])
    provision.run(["add-device", "door1", "--site-dir", str(site), "--no-reload"])
    bundle = site / "clients" / "door1"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(bundle))
    assert load_config(bundle / "edge.yaml", EdgeConfig).camera.kind == "picamera2"


def test_the_pi_extra_has_no_tensorflow_and_its_own_simplejpeg() -> None:
    """apt's simplejpeg is built for Debian's numpy 1.24; the venv's numpy 2 breaks it
    (picamera2 issues 1088, 1211): the venv brings a simplejpeg built for numpy 2."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pi = project["optional-dependencies"]["pi"]
    assert any(req.startswith("simplejpeg==") for req in pi)
    everything = [*project["dependencies"], *pi]
    assert not any(req.lower().startswith(("tensorflow", "keras")) for req in everything)
    install = (REPO / "deploy" / "install-pi.sh").read_text()
    assert 'make_venv "$PYTHON" "$VENV" yes "$PIP" "pi"' in install  # system site: picamera2


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing")
def test_pi_check_script_is_clean_and_uses_the_install_flags() -> None:
    script = REPO / "deploy" / "pi-check.sh"
    subprocess.run(["shellcheck", str(script)], check=True)
    text = script.read_text()
    assert "--no-systemd --no-camera" in text
    assert "debootstrap --foreign --arch arm64" in text
    help_text = subprocess.run(
        ["bash", str(REPO / "deploy" / "install-pi.sh"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--no-systemd" in help_text
    assert "--no-camera" in help_text
