"""`make bench-edge`'s secure rounds: the measured doorbell's own time in each phase.

After the plain rounds the aggregator restarts on the same state and keys with
secure aggregation on (the product's defaults: min_cohort 5, the round's shared
10 % subset), and min_cohort - 1 helper doorbells join: real `python -m edge`
processes on this machine (bench.secure_rounds's: a generated house each, no
camera), so real secure rounds run. The measured doorbell keeps recognising the
porch video through them, as through its plain rounds.

Its time in a secure round, each span between two times on one clock: the
observer's (a phase's announcement, the doorbell's answer on its secagg topic)
or the doorbell's own log (where it trains):

    advert    keys announced -> its signed key advert (the round's base model and
              training data at hand, X25519 keys made and signed)
    training  its log's "keys sent" -> "update ready to mask" (train_delta, then
              the round's subset of the delta clipped, noised and encoded)
    shares    its encrypted seed shares for its neighbours, from when it could start
              them, the later of the shares announcement and its training's end: the
              shorter of shares announced -> its shares (observer) and "update ready
              to mask" -> "shares sent" (log)
    masked    send announced -> its masked update (its inbox's shares decrypted,
              the pairwise masks expanded and added)
    unmask    unmask announced -> its answer

Their sum is its time per secure round; its time per plain round is announced
-> its update (base model and data, train_delta, top-k, signing). Training is
the same train_delta on both sides and varies most from round to round (under
qemu 0.2 to 3.7 s, with recognition beside it on the same interpreter), so the
extra time per secure round is taken outside it: the exchange (advert, shares,
masked, unmask) against a plain round's announced -> update less its
train_delta (median against median). The masked-ready update against top-k and
signing stays inside the two training figures, shown side by side. The helpers
and the aggregator run here: under `make pi-check` only the measured doorbell
is emulated.
"""

from __future__ import annotations

import re
import signal
import statistics
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from aggregator.config import RoundSettings
from aggregator.secure import LEAF_OF_PHASE
from bench.edge_probes import fps, mb
from bench.edge_rounds import Bench, drain
from bench.edge_setup import DEVICE, SITE, Configs
from bench.edge_traffic import wait_status
from bench.secure_rounds import Statuses
from fedbell.wire.topics import SecAggLeaf
from simulation.processes import Child, Fleet

PHASES = ("advert", "training", "shares", "masked", "unmask")
"""The doorbell's parts of a secure round, in order (see the module docstring)."""
EXCHANGE = tuple(phase for phase in PHASES if phase != "training")
HELPERS_READY_S = 300.0
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ edge\.\w+: (.*)$")
_READY = re.compile(r"round (\d+): trained in .*; update ready to mask$")


def doorbell_phases(
    announced: Mapping[str, float],
    answered: Mapping[SecAggLeaf, float],
    logged: Mapping[str, float],
) -> dict[str, float]:
    """Seconds of each of the doorbell's parts of a round (PHASES, see the module docstring)
    from when each phase was announced (by phase) and answered (by the doorbell's message),
    on the observer's clock, and the `logged_times` of its log; KeyError names what is
    missing."""
    return {
        "advert": answered["keys"] - announced["keys"],
        "training": logged["ready"] - logged["keys"],
        "shares": min(answered["shares"] - announced["shares"], logged["shares"] - logged["ready"]),
        "masked": answered["masked"] - announced["send"],
        "unmask": answered["unmask"] - announced["unmask"],
    }


def logged_times(log: str, round_id: int) -> dict[str, float]:
    """From the doorbell's log (python -m edge's format), in seconds on its clock: round
    `round_id`'s "update ready to mask" (`ready`), the last "keys sent" before it (`keys`) and
    the first "shares sent" after it (`shares`); ValueError if the log lacks one."""
    found: dict[str, float] = {}
    for line in log.splitlines():
        if (parts := _LOG_LINE.match(line)) is None:
            continue
        stamp = datetime.strptime(parts[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        message = parts[2]
        if "ready" not in found and message.startswith("secure round: keys sent"):
            found["keys"] = stamp
        elif (ready := _READY.match(message)) is not None and int(ready[1]) == round_id:
            found["ready"] = stamp
        elif "ready" in found and message.startswith("secure round: shares sent"):
            found["shares"] = stamp
            break
    if missing := {"keys", "ready", "shares"} - set(found):
        raise ValueError(
            f"round {round_id}: the doorbell's log lacks its {', '.join(sorted(missing))}"
        )
    return found


def go_secure(bench: Bench, fleet: Fleet, configs: Configs, version: int) -> None:
    """Restart the aggregator with secure aggregation on; start the helpers and wait until
    they run the doorbell's model version."""
    old = bench.aggregator
    old.signal_group(signal.SIGTERM)
    old.process.wait(60)
    work, env = bench.layout.work, {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    # Other machines on a site (the aggregator's, the other houses' doorbells): the
    # lowest priority, every thread of them, so they take no CPU the doorbell wants.
    low = ["nice", "-n", "19", sys.executable, "-m"]
    command = [*low, "aggregator", "--config", str(configs.secure_aggregator)]
    statuses = Statuses(bench.observer.port, SITE)  # before: it sees the old one go offline
    bench.aggregator = fleet.launch(Child("aggregator", command, work / "aggregator.log", env))
    try:
        for name, path in configs.helpers.items():
            command = [*low, "edge", "--config", str(path)]
            fleet.launch(Child(name, command, work / f"{name}.log", env))
        statuses.wait(list(configs.helpers), version, HELPERS_READY_S)
        # The helpers take the head from the broker, not from it: with stranger photos to
        # load, the aggregator may come online after them.
        statuses.wait_aggregator(HELPERS_READY_S)
    finally:
        statuses.close()
    print(
        f"secure aggregation on: the aggregator restarted, {len(configs.helpers)} helper "
        f"doorbells here at v{version}"
    )
    time.sleep(bench.args.pause)  # the aggregator sees the helpers online


def secure_round(bench: Bench, version: int) -> int:
    """A real secure round, recognition running; returns the doorbell's new model version."""
    observer, timeout = bench.observer, bench.args.round_timeout
    drain(observer.secagg)  # a late answer of an earlier round is not this one's
    begun = time.monotonic()
    seen, announcement = observer.start_round("keys")
    number, announced = announcement.round, {"keys": seen}
    while (metrics := observer.metrics.get(timeout=timeout)).round != number:
        pass
    if metrics.outcome != "published":
        raise RuntimeError(f"secure round {number}: {metrics.outcome}; see the aggregator's log")
    installed, status = wait_status(
        observer, f"the head of round {number}", lambda s: (s.model_version or 0) > version, timeout
    )
    while len(announced) < len(LEAF_OF_PHASE):
        at, later = observer.announcements.get(timeout=timeout)
        if later.round == number and later.phase in LEAF_OF_PHASE:
            announced.setdefault(later.phase, at)
    answered: dict[SecAggLeaf, float] = {}
    sizes: dict[SecAggLeaf, int] = {}
    while len(answered) < len(LEAF_OF_PHASE):  # its unmask answer may come after the sum
        at, leaf, size = observer.secagg.get(timeout=timeout)
        if leaf not in answered:
            answered[leaf], sizes[leaf] = at, size
    logged = logged_times(bench.doorbell.log.read_text(errors="replace"), number)
    parts = doorbell_phases(announced, answered, logged)
    bench.secure.append((seen, installed))
    time.sleep(bench.args.pause)
    t = observer.topics
    down = observer.bytes_down(
        begun, time.monotonic(), (t.round, t.global_model, t.secagg_inbox(DEVICE))
    )
    bench.secure_rounds.append(
        {
            "round": number,
            "outcome": metrics.outcome,
            "doorbells": metrics.participants,
            "seconds": round(installed - seen, 2),
            "doorbell_seconds": {name: round(value, 3) for name, value in parts.items()},
            "doorbell_total_s": round(sum(parts.values()), 3),
            "exchange_s": round(sum(parts[name] for name in EXCHANGE), 3),
            "bytes_up": sum(sizes.values()),
            "bytes_up_by_message": sizes,
            "bytes_down": down,
            "rss_mb": mb(bench.sampler.between(seen, installed)),
            "fps": round(fps(bench.counter, [(seen, installed)]), 2),
        }
    )
    print(
        f"secure round {number} ({metrics.participants} doorbells): announced -> new head on "
        f"the doorbell {installed - seen:.2f} s; the doorbell's part "
        + ", ".join(f"{name} {value:.3f}" for name, value in parts.items())
        + f" s; up {sum(sizes.values())} B, down {down} B"
    )
    return status.model_version or 0


def secure_summary(bench: Bench) -> dict[str, Any] | None:
    """The secure rounds' medians beside the plain rounds' (None: no secure round run)."""
    rounds, plain = bench.secure_rounds, bench.rounds
    if not rounds:
        return None
    exchange = statistics.median(r["exchange_s"] for r in rounds)
    plain_outside = statistics.median(
        r["announced_to_update_s"] - r["train_seconds"] for r in plain
    )
    leaves = rounds[0]["bytes_up_by_message"]
    return {
        "min_cohort": RoundSettings().min_cohort,
        "doorbell_seconds": {
            name: round(statistics.median(r["doorbell_seconds"][name] for r in rounds), 3)
            for name in PHASES
        },
        "doorbell_total_s": round(statistics.median(r["doorbell_total_s"] for r in rounds), 3),
        "plain_doorbell_total_s": round(
            statistics.median(r["announced_to_update_s"] for r in plain), 3
        ),
        "plain_train_s": round(statistics.median(r["train_seconds"] for r in plain), 3),
        "exchange_s": round(exchange, 3),
        "plain_outside_training_s": round(plain_outside, 3),
        "extra_seconds_per_round": round(exchange - plain_outside, 3),
        "round_seconds": round(statistics.median(r["seconds"] for r in rounds), 2),
        "plain_round_seconds": round(statistics.median(r["seconds"] for r in plain), 2),
        "bytes_up_per_round": int(statistics.median(r["bytes_up"] for r in rounds)),
        "bytes_up_by_message": {
            leaf: int(statistics.median(r["bytes_up_by_message"][leaf] for r in rounds))
            for leaf in leaves
        },
        "bytes_down_per_round": int(statistics.median(r["bytes_down"] for r in rounds)),
        "rss_peak_mb": mb([kb for w in bench.secure for kb in bench.sampler.between(*w)]),
        "fps": round(fps(bench.counter, bench.secure), 2),
        "rounds": rounds,
    }


def print_secure(secure: dict[str, Any] | None) -> None:
    if secure is None:
        return
    parts = ", ".join(f"{name} {secure['doorbell_seconds'][name]}" for name in PHASES)
    sizes = ", ".join(f"{leaf} {size}" for leaf, size in secure["bytes_up_by_message"].items())
    print(
        f"secure rounds ({secure['min_cohort']} doorbells, the measured one and helpers here):\n"
        f"  the doorbell's part {secure['doorbell_total_s']} s ({parts}); a plain round's "
        f"{secure['plain_doorbell_total_s']} s (train_delta {secure['plain_train_s']} s)\n"
        f"  outside training: the exchange (advert, shares, masked, unmask) "
        f"{secure['exchange_s']} s against {secure['plain_outside_training_s']} s: extra per "
        f"secure round {secure['extra_seconds_per_round']} s\n"
        f"  round (announced -> new head on the doorbell) {secure['round_seconds']} s, plain "
        f"{secure['plain_round_seconds']} s; up {secure['bytes_up_per_round']} B ({sizes}), "
        f"down {secure['bytes_down_per_round']} B; RSS peak {secure['rss_peak_mb']} MB; "
        f"{secure['fps']} frames/s"
    )
