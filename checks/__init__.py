"""The data checks (Great Expectations suites) that gate what enters the pipeline: the prepared stream
(:mod:`checks.stream`) and the dreams a sleep may promote (:mod:`checks.dreams`), on shared GX plumbing
(:mod:`checks.suite`). A library: no Prefect, no flows; the tasks that run them write their reports."""

from __future__ import annotations

from checks.dreams import CHECKS, DreamGateError, DreamValidation, gate_dream_table, gate_dreams, validate_dreams
from checks.stream import StreamValidation, StreamValidationError, validate_stream
from checks.suite import failing_rows

__all__ = [
    "CHECKS",
    "DreamGateError",
    "DreamValidation",
    "StreamValidation",
    "StreamValidationError",
    "failing_rows",
    "gate_dream_table",
    "gate_dreams",
    "validate_dreams",
    "validate_stream",
]
