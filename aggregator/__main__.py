"""`python -m aggregator --config PATH` (console script `fedbell-aggregator`)."""

from __future__ import annotations

import os

# Before anything can import TensorFlow (the backbone's one-off conversion, and its
# version in the cache key): no C++ banners (cpu_feature_guard, oneDNN, absl's "All log
# messages before absl::InitializeLog()") in the service's log. Errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# (so these imports come after it)
import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from aggregator.config import AggregatorConfig
from fedbell.config import load_config
from fedbell.errors import FedbellError
from fedbell.redact import redact_logging

log = logging.getLogger("aggregator")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedbell-aggregator",
        description="Run federated rounds for one fedbell site: average the doorbells' "
        "updates and publish the global model.",
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML configuration file")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact_logging()
    for noisy in ("tensorflow", "absl", "h5py", "keras"):  # their Python loggers: errors only
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        config = load_config(args.config, AggregatorConfig)
    except FedbellError as err:
        print(f"fedbell-aggregator: {err}", file=sys.stderr)
        return 2

    from aggregator.service import AggregatorService  # imports TensorFlow: after the config

    # Handlers first: a stop that arrives while the service starts (reading its state,
    # maybe converting the backbone) ends the run cleanly instead of killing it.
    stop_requested = threading.Event()
    service: AggregatorService | None = None

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop_requested.set()
        if service is not None:
            service.stop()

    def reload_keys(_signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP: re-reading the trusted device keys")
        if service is not None:
            service.reload_keys()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, reload_keys)  # systemctl reload fedbell-aggregator
    try:
        service = AggregatorService(config)
    except FedbellError as err:
        log.error("%s", err)
        return 2
    if stop_requested.is_set():
        log.info("stopped before serving")
        return 0
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
