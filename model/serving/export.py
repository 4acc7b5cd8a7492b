"""Exporting a trained state as a directory a Hugging Face user loads with ``trust_remote_code``.

The memory levels are gated, routed low-rank experts (nonlinear in the hidden state), so they
cannot be merged into the base weights; the export ships them as code plus weights::

    config.json               the base Llama config, ``model_type: lm_sleep``, ``lm_sleep`` (layers,
                              activation, each level's top_k, d_low and its experts' periods, the
                              routing layer) and ``auto_map`` -> modeling_lm_sleep.py
    model.safetensors         base weights + every active expert (model.layers.I.mlp.levels.L.{A,B,router})
                              + the routing prototypes (lm_sleep_router.*) when the state has them
    modeling_lm_sleep.py      the self-contained model class (torch + transformers only)
    tokenizer files           the base model's tokenizer
    lm_sleep_export.json      what was exported (state, its period, labels, template) and the SHA-256
                              of every other file

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

gives the logits of the in-process memory model with every level on; with prototype routing each
sequence is answered by the experts of its routed period, as ``predict`` and ``generate`` do. The
directory is written atomically: a failed export leaves the previous one as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from model.errors import UserError
from model.io import atomic_dir, sha256_file
from model.memory.prototypes import SENTENCE_LAYER

if TYPE_CHECKING:
    from model.serving.serving import TrainedModel

MODELING_FILE = "modeling_lm_sleep.py"
WEIGHTS_FILE = "model.safetensors"
EXPORT_MANIFEST = "lm_sleep_export.json"
FORMAT_VERSION = 1


class ExportError(UserError, ValueError):
    """An export that cannot be written where asked; the message names the directory."""


def memory_spec(trained: "TrainedModel") -> dict[str, Any]:
    """The ``lm_sleep`` entry of the exported config: where the levels are and what each holds."""
    cms, protos = trained.cms, trained.cms.prototypes
    levels = []
    for li, lvl in enumerate(cms.cfg.levels):
        periods = [-1 if e.period is None else int(e.period) for e in cms.experts[li] if e.active]
        levels.append({"name": lvl.name, "top_k": lvl.top_k, "d_low": lvl.d_low, "periods": periods})
    return {"format_version": FORMAT_VERSION, "layers": cms.layer_ids, "activation": cms.cfg.activation,
            "levels": levels, "prototype_layer": None if protos is None else protos.layer,
            "n_prototypes": 0 if protos is None else int(protos.centroids.shape[0]),
            "prototype_metric": None if protos is None else protos.metric}


def export_tensors(trained: "TrainedModel") -> dict[str, torch.Tensor]:
    """Every tensor of the exported model, by its name there (tied weights once)."""
    model, cms = trained.loaded.model, trained.cms
    memory = {id(p) for _, p in cms.named_memory_parameters()}
    skip = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in memory}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():  # tied weights share one parameter: keep the first name
        if name in skip or id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    for i, block in cms.blocks.items():
        for li, bank in enumerate(block.levels):
            slots = cms.active_slots(li)
            if not slots:
                continue
            at = f"model.layers.{i}.mlp.levels.{li}"
            out[f"{at}.A"] = torch.cat([bank.A[s] for s in slots], dim=1).detach()  # (d, E * d_low)
            out[f"{at}.B"] = torch.cat([bank.B[s] for s in slots], dim=0).detach()  # (E * d_low, d)
            out[f"{at}.router"] = torch.stack([bank.router[s] for s in slots]).detach()  # (E, d)
    if cms.prototypes is not None:
        p = cms.prototypes
        out.update({"lm_sleep_router.mean": p.mean, "lm_sleep_router.scale": p.scale,
                    "lm_sleep_router.centroids": p.centroids, "lm_sleep_router.periods": p.periods.long()})
        if p.metric == "mahalanobis":
            out["lm_sleep_router.whiten"] = p.whiten()
    return {k: v.to("cpu").contiguous().clone() for k, v in out.items()}


def _is_export(path: Path) -> bool:
    return (path / EXPORT_MANIFEST).is_file()


def export_model(trained: "TrainedModel", out: str | Path) -> Path:
    """Write ``trained`` as a Hugging Face directory ``out`` (format: module docstring); returns ``out``.

    An existing ``out`` is replaced only when it is an earlier export or empty, never another directory.
    """
    out = Path(out)
    protos = trained.cms.prototypes
    if protos is not None and protos.layer == SENTENCE_LAYER:
        raise ExportError(f"{out}: the state routes by the sentence model's embedding (cms.routing.feature: "
                          "sentence), which the exported transformers model cannot compute; export a state that "
                          "routes by a decoder layer (feature: decoder), or ask this one in process "
                          "(lm-sleep predict / generate)")
    if out.exists() and not (out.is_dir() and (_is_export(out) or not any(out.iterdir()))):
        raise ExportError(f"{out}: exists and is not an lm-sleep export; choose a new or empty directory")
    from model.serving.modeling_lm_sleep import LMSleepConfig  # noqa: PLC0415 (only an export needs it)

    base = trained.loaded.model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        base.pop(key, None)
    config = LMSleepConfig(**base, lm_sleep=memory_spec(trained))
    config.architectures = ["LMSleepForCausalLM"]
    config.auto_map = {"AutoConfig": "modeling_lm_sleep.LMSleepConfig",
                       "AutoModelForCausalLM": "modeling_lm_sleep.LMSleepForCausalLM"}
    state = trained.state.resolve()
    if state.is_relative_to(trained.root.resolve()):
        state = state.relative_to(trained.root.resolve())
    meta = {"format_version": FORMAT_VERSION, "state": str(state), "period": trained.period,
            "model": trained.loaded.name, "template": trained.params.wake.template,
            "experts_sha256": trained.manifest["files"].get("experts.safetensors")}
    try:
        meta["labels"] = trained.labels
    except ValueError:  # a state with no label record and no stream plan: the export still writes
        meta["labels"] = None
    with atomic_dir(out) as tmp:
        save_file(export_tensors(trained), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        trained.loaded.tokenizer.save_pretrained(tmp)
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), tmp / MODELING_FILE)
        meta["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def verify_export(path: str | Path) -> dict[str, Any]:
    """Check an export's files against its manifest; returns the manifest (ExportError naming the file)."""
    path = Path(path)
    try:
        meta = json.loads((path / EXPORT_MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path / EXPORT_MANIFEST}: unreadable ({e})") from None
    for name, digest in meta["files"].items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            raise ExportError(f"{path / name}: missing or checksum mismatch")
    return meta


__all__ = ["EXPORT_MANIFEST", "ExportError", "export_model", "export_tensors", "memory_spec", "verify_export"]
