"""`python -m simulation`: a whole federation of doorbells on one machine.

Starts a private Mosquitto, the aggregator and N doorbell nodes as separate
processes, drives R federated rounds, compares with centralised training,
writes a JSON report and a plot, then replays visitors through one doorbell.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from rich.console import Console

from broker.local import BrokerError
from fedbell.errors import ConfigError
from fedbell.wire.codecs import TENSOR_CODECS
from simulation import config as settings
from simulation import runner
from simulation.driver import SimulationTimeout
from simulation.processes import ProcessDied

DEFAULT_CONFIG = Path("config/simulation.yaml")
EXPECTED_FAILURES = (
    ConfigError,
    BrokerError,
    ProcessDied,
    SimulationTimeout,
    FileNotFoundError,
    ValueError,
    RuntimeError,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"YAML settings (default: {DEFAULT_CONFIG} if it exists)",
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        help="a <person>/<image> folder (default: ../shared/datasets/lfw_dev beside the "
        "checkout, else generated identities)",
    )
    parser.add_argument("--nodes", type=int, help="doorbell processes")
    parser.add_argument("--rounds", type=int, help="federated rounds")
    parser.add_argument(
        "--strangers",
        type=Path,
        help="real stranger photos to calibrate 'unknown' on (default: "
        "../shared/datasets/lfw_strangers beside the checkout, else generated strangers)",
    )
    parser.add_argument(
        "--generated",
        action="store_true",
        default=None,
        help="generated faces even when real photos lie beside the checkout",
    )
    parser.add_argument("--codec", choices=TENSOR_CODECS, help="update codec")
    parser.add_argument("--seed", type=int, help="seed of data, split, model and training")
    parser.add_argument("--epochs", type=int, help="local epochs per round")
    parser.add_argument(
        "--seeds", type=int, help="seeds the gain over the start is measured on (0: skip)"
    )
    parser.add_argument("--report", type=Path, help="JSON report path (plot: same name .png)")
    parser.add_argument("--workdir", type=Path, help="an empty folder for this run's files")
    parser.add_argument(
        "--keep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the temporary work folder (--no-keep: delete it even after --stay)",
    )
    parser.add_argument("--no-live", action="store_true", help="skip the live recognition demo")
    parser.add_argument(
        "--stay",
        action="store_true",
        default=None,
        help="after the rounds, keep the federation and its console running until Ctrl-C",
    )
    return parser.parse_args(argv)


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every `with`: every child is stopped


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the baseline's TensorFlow: no chatter
    args = parse_args(argv)
    console = Console(soft_wrap=True)  # piped output: one line per line, no re-wrapping
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    overrides = {
        key: getattr(args, key)
        for key in (
            "dataset",
            "nodes",
            "rounds",
            "strangers",
            "generated",
            "codec",
            "seed",
            "epochs",
            "seeds",
            "report",
            "workdir",
            "keep",
            "stay",
        )
    }
    try:
        config = settings.load(path, overrides)
    except (ConfigError, ValueError) as err:
        console.print(f"[bold red]configuration:[/] {err}")
        return 2
    if args.no_live:
        config = config.model_copy(
            update={"live": config.live.model_copy(update={"enabled": False})}
        )
    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C must stop the run even when a parent started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        runner.run(config, console)
    except KeyboardInterrupt:
        console.print("interrupted: the broker, the aggregator and every node were stopped")
        return 130
    except EXPECTED_FAILURES:
        return 1  # runner already explained what failed and where the logs are
    return 0


if __name__ == "__main__":
    sys.exit(main())
