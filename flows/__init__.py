"""Prefect flows: each composes the tasks of one pipeline stage.

Telemetry is switched off before Prefect or Great Expectations are imported;
values already set in the environment win.
"""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
