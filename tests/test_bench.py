"""bench.py's own arithmetic, without a broker: how a detection's time is split into hops, and which partitions count
as routed again after a copy was stopped. (The figures themselves belong to the benchmark, not to tests.)"""

import pytest

import bench
from contracts import NOTIFICATION_COMMAND, THIRD_PARTY

pytestmark = pytest.mark.no_broker  # runs in `make check`


def test_a_detections_time_is_split_into_its_hops():
    # Given one detection sent at t=10.000 s, seen on each topic (visible at, sent by its writer at)
    path = [bench.DETECTIONS, NOTIFICATION_COMMAND, THIRD_PARTY]
    sent = {"w": 10.000}
    seen = {"p_" + bench.DETECTIONS: {"w": (10.002, 10.000)},
            "p_" + NOTIFICATION_COMMAND: {"w": (10.030, 10.012)},  # the orchestrator sent at 10.012, visible at .030
            "p_" + THIRD_PARTY: {"w": (10.050, 10.035)}}
    # Then each part is the time between those moments (ms)
    parts = {name: figures["p50"] for name, figures in bench.hops("p_", path, sent, seen, ["w"]).items()}
    assert parts == {"detection visible": 2.0, "orchestrator: fetched and handled": 10.0,
                     "orchestrator: committed and visible": 18.0, "notification service: fetched and handled": 5.0,
                     "notification service: committed and visible": 15.0}


def test_a_partition_counts_as_routed_again_by_its_first_detection_sent_after_the_signal():
    # Given detections on two partitions, before and after a copy was stopped at t=100
    detections = [(99.0, 0, "a"), (100.5, 0, "b"), (100.6, 1, "c"), (100.7, 0, "d")]
    routed = {"a": [99.01], "b": [106.0], "d": [106.1]}  # c is not routed yet
    # Then partition 0 is routed again when "b" was, partition 1 not yet
    assert bench.Bench.resumed(100.0, detections, routed) == {0: 106.0}
