"""pi-check, inside the arm64 root: what the doorbell's venv was installed from.

Every distribution with compiled code must have come as an aarch64 wheel
(nothing built from an sdist under emulation, nothing x86), and TensorFlow
must be absent. Exit status 1 otherwise. Run with the venv's Python.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
import sysconfig


def wheel_tags(dist: importlib.metadata.Distribution) -> list[str]:
    text = dist.read_text("WHEEL") or ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]


def main() -> int:
    ok = platform.machine() == "aarch64"
    print(f"    machine {platform.machine()}, Python {platform.python_version()}")
    compiled, pure = [], 0
    # The venv's own packages only: apt's (seen through --system-site-packages) are Debian's.
    venv = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    dists = importlib.metadata.distributions(path=venv)
    for dist in sorted(dists, key=lambda d: d.metadata["Name"].lower()):
        name = f"{dist.metadata['Name']} {dist.version}"
        tags = wheel_tags(dist)
        if dist.metadata["Name"] == "fedbell":
            continue  # built here from the checkout: pure Python
        if not tags:
            print(f"    NOT FROM A WHEEL: {name}")
            ok = False
        elif all(t.endswith("-none-any") for t in tags):
            pure += 1
        elif any("aarch64" in t for t in tags):
            compiled.append(f"{name} ({tags[0].rsplit('-', 1)[-1]})")
        else:
            print(f"    WRONG PLATFORM: {name}: {', '.join(tags)}")
            ok = False
    print(f"    {pure} pure-Python wheels; aarch64 wheels: {', '.join(compiled)}")
    for module in ("tensorflow", "keras", "tflite_runtime"):
        if importlib.util.find_spec(module) is not None:
            print(f"    {module} is installed: a doorbell must not carry it")
            ok = False
    print("    no TensorFlow, Keras or tflite-runtime in the venv" if ok else "    FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
