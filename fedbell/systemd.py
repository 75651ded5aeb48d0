"""A tiny sd_notify(3) client: readiness, watchdog pings and status for systemd.

The units in `systemd/` are `Type=notify` with `WatchdogSec=`: the program
says READY=1 once it is connected and serving, then pings WATCHDOG=1 from its
main loop at least every `watchdog_interval()` seconds, or systemd kills and
restarts it. Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op, so
the same code runs in tests, the simulation and on a Pi.

Written against the protocol (a datagram of `KEY=value` lines on a unix
socket) rather than a library, because it is twenty lines and a C binding is
a dependency the Pi would have to build.
"""

from __future__ import annotations

import os
import socket

__all__ = [
    "notify",
    "notify_ready",
    "notify_status",
    "notify_stopping",
    "notify_watchdog",
    "watchdog_interval",
]


def _socket_address() -> str | bytes | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    # "@name" is a socket in Linux's abstract namespace: a leading NUL byte.
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def notify(message: str) -> bool:
    """Send one sd_notify message; True if it was sent, False outside systemd.

    Never raises: a failed readiness or watchdog message must not take the
    doorbell down (systemd acts on the missing ping itself).
    """
    address = _socket_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def notify_ready() -> bool:
    """Start-up is complete: systemd marks the unit active and arms the watchdog."""
    return notify("READY=1")


def notify_watchdog() -> bool:
    """Keep-alive ping; call from the main loop every `watchdog_interval()`."""
    return notify("WATCHDOG=1")


def notify_status(text: str) -> bool:
    """One line shown by `systemctl status` (e.g. "round 12: 3/5 updates")."""
    single_line = " ".join(text.splitlines())
    return notify(f"STATUS={single_line}")


def notify_stopping() -> bool:
    """Shutdown has begun (so a slow clean exit is not mistaken for a hang)."""
    return notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WatchdogSec=), or None if no watchdog.

    Pinging at half the deadline, as sd_watchdog_enabled(3) advises, leaves
    room for one slow loop iteration. WATCHDOG_PID, when set, names the
    process the watchdog is meant for; a child that inherited the
    environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2_000_000
