"""Prefect flows: each composes the tasks of one pipeline stage.

Telemetry is switched off before Prefect or Great Expectations are imported;
values already set in the environment win.

Importing this package does not import Prefect: ``python -m flows.stage``, the command of
every DVC stage, is a client that hands its stage to the stage server and must start in
milliseconds (importing ``prefect.context`` took 0.7 s of every stage). The heartbeat
setting below is applied the moment Prefect is imported, whoever imports it.
"""

import importlib.abc
import importlib.util
import os
import sys

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


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``hook`` right after module ``name`` is executed, the first time anything imports it."""

    def __init__(self, name: str, hook) -> None:
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and the search below does not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, hook = spec.loader, self.hook

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                hook()

        spec.loader = _Loader()
        return spec


if "prefect.context" in sys.modules:
    _quiet_heartbeats()
elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport("prefect.context", _quiet_heartbeats))
