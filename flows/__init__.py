"""Prefect flows: each composes the tasks of one pipeline stage.

Telemetry is switched off before Prefect or Great Expectations are imported;
values already set in the environment win.
"""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _quiet_heartbeats() -> None:
    """Switch off Prefect's flow-run heartbeats, unless asked for.

    Prefect 3 starts a heartbeat thread for every flow run, subflows included (crash detection, one event
    every 180 s), and joins it when the run ends, which waits out the thread's one-second sleep: about 1 s
    per flow run (10 empty flows: 11.7 s with heartbeats, 1.8 s without). A lifecycle runs dozens of short
    subflows and a comparison hundreds, and this project configures no automation that reads heartbeats.
    ``LM_SLEEP_FLOW_HEARTBEATS=1``, or an explicit ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, keeps Prefect's.
    """
    if os.environ.get("LM_SLEEP_FLOW_HEARTBEATS") == "1" or "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ:
        return
    from prefect.context import GLOBAL_SETTINGS_CONTEXT

    GLOBAL_SETTINGS_CONTEXT.settings.flows.heartbeat_frequency = None


_quiet_heartbeats()
