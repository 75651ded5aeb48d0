"""The doorbell push button on a GPIO pin (gpiozero, only on a Pi)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

GPIOZERO_HELP = (
    "the GPIO ring button needs gpiozero on a Raspberry Pi: "
    "pip install 'fedbell[pi]' (or apt install python3-gpiozero), "
    "or leave recognition.ring_button_pin unset"
)


class GpioError(RuntimeError):
    """The button cannot be set up."""


def watch_button(
    pin: int, on_press: Callable[[], None], button_factory: Callable[..., Any] | None = None
) -> Any:
    """Call `on_press` (from gpiozero's thread) each time the button on BCM `pin` is pressed.

    Returns the button object; keep a reference or it stops working, close() it at exit.
    """
    if button_factory is None:
        try:
            from gpiozero import Button
        except ImportError as err:
            raise GpioError(GPIOZERO_HELP) from err
        button_factory = Button
    try:
        # bounce_time: a mechanical switch chatters for a few ms; one press, one ring.
        button = button_factory(pin, pull_up=True, bounce_time=0.05)
    except Exception as err:  # gpiozero raises its own hierarchy for missing pins/pins factory
        raise GpioError(f"GPIO pin {pin}: {err}") from err
    button.when_pressed = on_press
    return button
