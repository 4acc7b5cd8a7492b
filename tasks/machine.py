"""Which machine a run computed on: its processor, the kernels torch picks there, torch's version, threads, device.

Floating-point results are not the same on every machine. The same code, stream and seed give losses that
agree to 4-5 digits on two of this project's 2-core machines and then drift apart, and a class-incremental
run's discrete choices (which dream a gate keeps, which label wins by a hair) turn that drift into a
different final accuracy: up to 0.06 on one seed (docs/results.md, issue #13). So every comparison run
records its machine, and a report says when its runs came from more than one: a paired difference
between two methods is only a clean comparison where both runs of a seed share a machine.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

from model.decoding.sampling import native_bf16

CPUINFO = Path("/proc/cpuinfo")


def processor() -> str:
    """The processor's name with its family, model and stepping (Linux), else what ``platform`` knows."""
    try:
        fields: dict[str, str] = {}
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        name = fields.get("model name") or fields.get("Processor") or platform.processor()
        ident = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
        return ", ".join([name, *ident]) if ident else name
    except OSError:
        return platform.processor() or platform.machine()


def machine(device: str | torch.device = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What a run's floating point depends on besides its code and inputs, and the fingerprint of it (``id``).

    ``threads``: the torch threads the run computed with (default: this process's current number)."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "processor": processor(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "device": dev.type,
        "native_bf16": native_bf16(dev),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    info["id"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    return info


__all__ = ["machine", "processor"]
