"""Child processes with a log file each, and a shutdown that leaves no orphans.

Each child runs in its own session (process group), so stopping it also stops
anything it started: SIGTERM to the group first (a clean shutdown: the node
publishes its offline status), SIGKILL to the group after a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAY_POLL_S = 1.0
"""While staying up: how often to look for a child that died (nothing else to wait on)."""


class ProcessDied(RuntimeError):
    """A child exited while the simulation still needed it."""

    def __init__(self, name: str, returncode: int, log: Path) -> None:
        super().__init__(
            f"{name} exited with code {returncode}; log: {log}\n"
            f"--- last lines of {log.name} ---\n{tail(log)}"
        )
        self.name = name
        self.log = log


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Child:
    """One process run as `command`, output to a log file, in a session of its own."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = PROJECT_ROOT,
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def check(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise ProcessDied(self.name, code, self.log)

    def signal_group(self, sig: signal.Signals) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):  # exited since the poll
                os.killpg(self.process.pid, sig)


class Fleet:
    """The children of one simulation, stopped together on exit whatever happened."""

    def __init__(self, stop_timeout: float = 10.0) -> None:
        self.children: list[Child] = []
        self.stop_timeout = stop_timeout
        """How long a clean shutdown may take before SIGKILL."""
        self.stay_message: str | None = None
        """Set (by `simulation.stack`) to keep the fleet running after a successful
        run until Ctrl-C: printed, then `__exit__` waits before stopping anyone."""

    def start(
        self,
        name: str,
        module: str,
        args: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """`python -m module args...` with this interpreter, from the project's folder."""
        return self.launch(Child(name, [sys.executable, "-m", module, *args], log, env))

    def launch(self, child: Child) -> Child:
        """Stopped with the others (any command: a doorbell in a chroot, say)."""
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise ProcessDied for the first child that is no longer running."""
        for child in self.children:
            child.check()

    def stop(self) -> None:
        """SIGTERM to every group at once, then SIGKILL whatever outlives `stop_timeout`."""
        for child in self.children:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.signal_group(signal.SIGKILL)
                child.process.wait()
        self.children.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self.stay_message is not None:
                self._stay(self.stay_message)
        finally:
            self.stop()

    def _stay(self, message: str) -> None:
        """Until Ctrl-C (or SIGTERM, which the simulation turns into one), or a child dies.

        The broker outlives this: it is the outer `with` of the runner.
        """
        print(message, flush=True)
        try:
            while True:
                self.check()  # a dead child ends the wait with its log
                time.sleep(STAY_POLL_S)
        except KeyboardInterrupt:
            print("stopping the federation", flush=True)
