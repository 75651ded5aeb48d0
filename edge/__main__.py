"""`python -m edge` / `fedbell-edge`: run a doorbell node, or enroll a person.

    python -m edge --config config/edge.yaml            # same as `run`
    python -m edge run --config config/edge.yaml [--log-level DEBUG]
    python -m edge enroll --config config/edge.yaml --person ann [--from-folder DIR]
    python -m edge enroll --config config/edge.yaml --from-folder DIR   # DIR/<person>/<photo>
    python -m edge enroll --config config/edge.yaml --remove ann

Enrollment changes only the gallery: a running doorbell names (or forgets) the
person within a second, and nothing is sent to the aggregator.

SIGTERM (systemd stop) and SIGINT (Ctrl-C) end `run` cleanly: the node
publishes its offline status and disconnects.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# edge.runtime first: it sets what numpy and OpenCV read as they load (the unit's
# environment, for a doorbell started from a shell).
from edge import runtime
from edge.camera import CameraError
from edge.config import EdgeConfig
from fedbell.config import load_config
from fedbell.errors import ConfigError
from fedbell.redact import redact_logging

SUBCOMMANDS = ("run", "enroll")


def _run(args: argparse.Namespace) -> int:
    from edge.camera import check_available
    from edge.node import EdgeNode  # imported here so `enroll` starts without it

    # Handlers first: a stop that arrives while the node loads its models still
    # ends the run cleanly (run() returns at once on a set event).
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        logging.getLogger("edge").info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    config = load_config(args.config, EdgeConfig)  # errors: see main()
    if config.camera.enabled:
        check_available(config.camera)  # picamera2 off a Pi: one line, before connecting
    if "host" not in config.mqtt.model_fields_set:  # never a silent default broker
        logging.getLogger("edge").warning(
            "%s names no broker (mqtt.host): trying %s:%d",
            args.config,
            config.mqtt.host,
            config.mqtt.port,
        )
    node = EdgeNode(config)
    node.run(stop)
    return 0


def _add_run_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("run", help="run the doorbell node (the default)")
    parser.add_argument("--config", type=Path, required=True, help="the node's YAML config")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    parser.set_defaults(func=_run)


def _enroll_settings(path: Path) -> Any:
    """Enrollment reads its camera, detection and gallery from the node's own config."""
    from edge.enroll import EnrollSettings

    config = load_config(path, EdgeConfig)
    return EnrollSettings(config.camera, config.detection, config.gallery_dir, config.state_dir)


def _add_enroll_parser(subparsers: Any) -> None:
    # Recognition side's subcommand (edge/enroll.py): plugged in here with the
    # node's config loader, so one YAML file per doorbell serves both.
    from edge.enroll import add_enroll_parser

    add_enroll_parser(subparsers, _enroll_settings)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedbell-edge", description="Run a fedbell doorbell node."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(subparsers)
    _add_enroll_parser(subparsers)
    arguments = list(argv)
    # `run` is the default: `python -m edge --config X` is what the systemd unit says.
    if not arguments or arguments[0] not in (*SUBCOMMANDS, "-h", "--help"):
        arguments.insert(0, "run")
    return parser.parse_args(arguments)


def main(argv: Sequence[str] | None = None) -> int:
    runtime.tune_malloc()  # before any thread starts
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact_logging()  # no camera password in the journal, whoever logs the URL
    try:
        return int(args.func(args))
    except (ConfigError, CameraError) as err:
        print(f"fedbell-edge: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.command == "run":
            raise  # a crash of the service: the journal wants the traceback
        print(f"fedbell-edge {args.command}: {err}", file=sys.stderr)  # a CLI reports
        return 2


if __name__ == "__main__":
    sys.exit(main())
