"""The aggregator's inbox (issue 18 item 4): a flooding sender loses its own excess only.

The process-level proof is tests/test_flood.py; these pin the rules it relies on,
with real threads where waiting is the point.
"""

from __future__ import annotations

import threading
import time

from aggregator.inbox import COMMAND_LANE_FACTOR, FairInbox


def drain(inbox: FairInbox[str]) -> list[str]:
    taken = []
    while (item := inbox.get(timeout=0.05)) is not None:
        taken.append(item)
    return taken


def test_a_full_lane_drops_its_own_newest_and_the_lanes_are_served_in_turn() -> None:
    inbox: FairInbox[str] = FairInbox(size=32, per_sender=2)
    assert inbox.put("status door1", "status/door1")
    for n in range(5):  # mallory floods: two wait, three are dropped
        assert inbox.put(f"junk {n}", "update/mallory") == (n < 2)
    assert inbox.put("update door1", "update/door1")
    assert inbox.put("start_round", "control", commands=True)
    inbox.signal("subscribed")
    assert drain(inbox) == [
        "subscribed",  # signals first
        "status door1",  # then one message per lane, in the order the lanes filled
        "junk 0",
        "update door1",
        "start_round",
        "junk 1",
    ]
    assert inbox.take_dropped() == {"update/mallory": 3}
    assert inbox.take_dropped() == {}


def test_commands_may_queue_more_than_a_doorbell() -> None:
    inbox: FairInbox[str] = FairInbox(size=1000, per_sender=2)
    kept = [inbox.put(f"cmd {n}", "control", commands=True) for n in range(40)]
    assert sum(kept) == 2 * COMMAND_LANE_FACTOR


def test_a_full_inbox_holds_a_new_sender_back_and_drops_one_already_waiting() -> None:
    inbox: FairInbox[str] = FairInbox(size=2, per_sender=4)
    assert inbox.put("a1", "update/a")
    assert inbox.put("b1", "update/b")
    assert not inbox.put("a2", "update/a")  # full, and a already has one waiting: dropped
    done = threading.Event()

    def honest() -> None:  # c has nothing waiting: it waits for room (TCP backpressure)
        inbox.put("c1", "update/c")
        done.set()

    thread = threading.Thread(target=honest)
    thread.start()
    time.sleep(0.2)
    assert not done.is_set()
    assert inbox.get(timeout=1) == "a1"
    assert done.wait(5)
    thread.join()
    assert drain(inbox) == ["b1", "c1"]
    assert inbox.take_dropped() == {"update/a": 1}
