"""Fault-injection harness: a live coordinator, real worker processes, and faults at named
points between and inside them (see README "Testing under faults").

    from trainfleet.testing import LiveFleet, wait_until
    with LiveFleet(tmp_path) as fleet:
        w = fleet.start_worker("cpu-a")
        w.proxy.drop_reply("POST", r"/claim$")
"""

from trainfleet.testing.disk import DiskFaultUnavailable, disk_faults_unavailable
from trainfleet.testing.fleet import LiveFleet, trainfleet_argv
from trainfleet.testing.proxy import Exchange, FaultProxy
from trainfleet.testing.served import ServedFleet
from trainfleet.testing.wait import wait_until
from trainfleet.testing.worker import WorkerHandle, kill_tree

__all__ = [
    "DiskFaultUnavailable",
    "Exchange",
    "FaultProxy",
    "LiveFleet",
    "ServedFleet",
    "WorkerHandle",
    "disk_faults_unavailable",
    "kill_tree",
    "trainfleet_argv",
    "wait_until",
]
