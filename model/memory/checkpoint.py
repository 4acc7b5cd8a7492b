"""Saving and loading the continuum-memory state: safetensors + a JSON manifest.

A state directory holds::

    experts.safetensors   every memory-level parameter (the base model is not saved) and the
                          routing prototypes (``routing.*``, model/memory/prototypes.py) when there are any
    train.safetensors     optimiser moments and mid-chunk gradients (exact resume of eq. 2)
    dream_policy.*        the dream generator's own adapter (model/sleep/dream_policy.py) when the state has one
    manifest.json         levels, experts (slot, active, when/why unlocked, SHA-256 of the
                          expert's weights), step counter, file digests, free-form metadata

Loading verifies the file digests and each expert's digest before touching the
model, and refuses a state made for a different CMS layout. Directories are
written atomically, so a crash leaves the previous state as it was.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.errors import UserError
from model.io import atomic_dir, sha256_bytes, sha256_file
from model.memory.cms import CMSError, ContinuumMemory, ExpertInfo, attach_cms
from model.memory.optimizer import ChunkedOptimizer
from model.memory.prototypes import PROTOTYPE_KEYS, SENTENCE_DIM, SENTENCE_LAYER, Prototypes
from model.sleep.dream_policy import (
    POLICY_JSON,
    POLICY_TENSORS,
    DreamPolicy,
    attach_policy,
    check_policy_tensors,
    copy_policy_tensors,
    load_policy,
    read_policy,
    write_policy_files,
)

if TYPE_CHECKING:
    from model.config import Params
    from model.decoding.loading import LoadedModel

FORMAT_VERSION = 1
EXPERTS_FILE = "experts.safetensors"
TRAIN_FILE = "train.safetensors"
MANIFEST_FILE = "manifest.json"


class CheckpointError(UserError, ValueError):
    """A state directory that cannot be loaded; the message names the file and the field."""


def expert_digest(cms: ContinuumMemory, level: int, slot: int) -> str:
    """SHA-256 over one expert's weights in every layer (A, B and router row, fp32 bytes)."""
    parts = []
    for bank in cms.banks(level):
        for p in (bank.A[slot], bank.B[slot], bank.router[slot]):
            parts.append(p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return sha256_bytes(b"".join(parts))


def save_state(
    cms: ContinuumMemory,
    dest: str | Path,
    optimizer: ChunkedOptimizer | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the CMS (and optionally optimiser) state to directory ``dest`` atomically."""
    dest = Path(dest)
    tensors = {name: p.detach().cpu().contiguous().clone() for name, p in cms.named_memory_parameters()}
    if cms.prototypes is not None:  # prototype routing's state (model/memory/prototypes.py), checksummed with the experts
        tensors.update({k: v.detach().cpu().contiguous().clone() for k, v in cms.prototypes.to_tensors().items()})
    manifest = cms.manifest()
    for li, level in enumerate(manifest["levels"]):
        for e in level["experts"]:
            e["sha256"] = expert_digest(cms, li, e["slot"])
    manifest["format_version"] = FORMAT_VERSION
    manifest["metadata"] = metadata or {}
    with atomic_dir(dest) as tmp:
        save_file(tensors, str(tmp / EXPERTS_FILE))
        files = {EXPERTS_FILE: sha256_file(tmp / EXPERTS_FILE)}
        if optimizer is not None:
            save_file({k: v.cpu() for k, v in optimizer.state_tensors().items()}, str(tmp / TRAIN_FILE))
            files[TRAIN_FILE] = sha256_file(tmp / TRAIN_FILE)
        policy: DreamPolicy | None = getattr(cms, "dream_policy", None)
        if policy is not None:  # the dream generator's adapter travels with the memory it dreams for
            files.update(write_policy_files(policy, tmp))
            manifest["dream_policy"] = {"rounds": policy.rounds, "sha256": policy.digest()}
        manifest["files"] = files
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dest


def read_manifest(src: str | Path) -> dict[str, Any]:
    """Parse and sanity-check a state directory's manifest."""
    path = Path(src) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a CMS state directory)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    for key in ("format_version", "layers", "d", "step", "levels", "files"):
        if key not in manifest:
            raise CheckpointError(f"{path}: field '{key}' missing")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: field 'format_version' is {manifest['format_version']}, expected {FORMAT_VERSION}"
        )
    return manifest


#: The fields of an expert entry and their types (None allowed where the slot was never unlocked).
EXPERT_FIELDS: dict[str, tuple[type, bool]] = {"slot": (int, False), "active": (bool, False),
                                               "unlocked_at_step": (int, True), "origin": (str, True),
                                               "history": (list, False)}


def _check_experts(mpath: Path, level: int, experts: Any, n_experts: int) -> None:
    """A level's expert entries name distinct slots below ``n_experts`` and carry every field (CheckpointError)."""
    where = f"{mpath}: field 'levels[{level}].experts"
    if not isinstance(experts, list):
        raise CheckpointError(f"{where}' must be a list")
    seen: set[int] = set()
    for i, e in enumerate(experts):
        if not isinstance(e, dict):
            raise CheckpointError(f"{where}[{i}]' must be an object")
        for key, (typ, nullable) in EXPERT_FIELDS.items():
            if key not in e:
                raise CheckpointError(f"{where}[{i}].{key}' missing")
            value = e[key]
            if (value is None and not nullable) or (value is not None and (
                    not isinstance(value, typ) or (typ is int and isinstance(value, bool)))):
                raise CheckpointError(f"{where}[{i}].{key}' must be a {typ.__name__}")
        if not 0 <= e["slot"] < n_experts or e["slot"] in seen:
            raise CheckpointError(f"{where}[{i}].slot' is {e['slot']}: not a free slot of 0..{n_experts - 1}")
        seen.add(e["slot"])


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; anything else (a pickle, a truncated file) is a CheckpointError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None


def _check_train_tensors(path: Path, train: dict[str, torch.Tensor], own: dict[str, torch.nn.Parameter]) -> None:
    """Optimiser tensors are ``grad/<param>`` or ``opt/<stat>/<param>`` of a memory parameter, shaped like it (the
    ``step`` counters are scalars): anything else is a CheckpointError naming the file and the tensor."""
    for key, t in train.items():
        kind, _, rest = key.partition("/")
        name = rest if kind == "grad" else rest.partition("/")[2]
        stat = None if kind == "grad" else rest.partition("/")[0]
        if kind not in ("grad", "opt") or name not in own:
            raise CheckpointError(f"{path}: tensor '{key}' is not of a memory parameter of this model")
        want = () if stat == "step" else tuple(own[name].shape)
        if tuple(t.shape) != want and not (stat == "step" and t.numel() == 1):
            raise CheckpointError(f"{path}: tensor '{key}' has shape {tuple(t.shape)}, expected {want}")


def load_state(cms: ContinuumMemory, src: str | Path, optimizer: ChunkedOptimizer | None = None) -> dict[str, Any]:
    """Load a state directory into ``cms`` (and ``optimizer``) after verifying every checksum.

    Nothing in ``cms`` changes unless every check passes. Returns the manifest.
    """
    src = Path(src)
    manifest = read_manifest(src)
    mpath = src / MANIFEST_FILE
    if manifest["layers"] != cms.layer_ids or manifest["d"] != cms.d:
        raise CheckpointError(
            f"{mpath}: field 'layers'/'d' ({manifest['layers']}, d={manifest['d']}) does not match this "
            f"model's CMS ({cms.layer_ids}, d={cms.d})"
        )
    if len(manifest["levels"]) != cms.n_levels:
        raise CheckpointError(f"{mpath}: field 'levels' has {len(manifest['levels'])} levels, CMS has {cms.n_levels}")
    for li, (lv, cfg) in enumerate(zip(manifest["levels"], cms.cfg.levels)):
        if (lv["n_experts"], lv["d_low"]) != (cfg.n_experts, cfg.d_low):
            raise CheckpointError(
                f"{mpath}: field 'levels[{li}]' has n_experts={lv['n_experts']}, d_low={lv['d_low']}; "
                f"params.yaml has n_experts={cfg.n_experts}, d_low={cfg.d_low}"
            )
    for li, lv in enumerate(manifest["levels"]):
        _check_experts(mpath, li, lv.get("experts"), lv["n_experts"])
    for name, digest in manifest["files"].items():
        fpath = src / name
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: missing (listed in {MANIFEST_FILE})")
        if sha256_file(fpath) != digest:
            raise CheckpointError(f"{fpath}: checksum mismatch (file corrupted or modified)")
    tensors = _load_tensors(src / EXPERTS_FILE)
    routing = {k: tensors.pop(k) for k in PROTOTYPE_KEYS if k in tensors}
    try:
        prototypes = Prototypes.from_tensors(routing, str(src / EXPERTS_FILE)) if routing else None
    except CMSError as e:
        raise CheckpointError(str(e)) from None
    if prototypes is not None:  # (the scatter's shape is checked against the mean's)
        sentence = prototypes.layer == SENTENCE_LAYER
        want = SENTENCE_DIM if sentence else cms.d
        if prototypes.mean.shape[0] != want:
            raise CheckpointError(f"{src / EXPERTS_FILE}: tensor 'routing.mean' has {prototypes.mean.shape[0]} "
                                  "features, " + (f"the sentence model's embedding has {want}" if sentence else
                                                  f"the model's hidden size is {cms.d}"))
    own = dict(cms.named_memory_parameters())
    if set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise CheckpointError(f"{src / EXPERTS_FILE}: tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            raise CheckpointError(f"{src / EXPERTS_FILE}: tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(own[name].shape)}")
    train = _load_tensors(src / TRAIN_FILE) if optimizer is not None and TRAIN_FILE in manifest["files"] else None
    if train is not None:
        _check_train_tensors(src / TRAIN_FILE, train, own)
    policy: DreamPolicy | None = getattr(cms, "dream_policy", None)
    policy_read = None
    if policy is not None and POLICY_JSON in manifest["files"]:  # checked in full before anything changes
        policy_read = read_policy(src, policy.base_model, policy.cfg)
        check_policy_tensors(policy, *policy_read, src / POLICY_TENSORS)

    backup = {name: p.detach().clone() for name, p in own.items()}
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)
    try:
        for li, lv in enumerate(manifest["levels"]):
            for e in lv["experts"]:
                if expert_digest(cms, li, e["slot"]) != e.get("sha256"):
                    raise CheckpointError(
                        f"{mpath}: field 'levels[{li}].experts[{e['slot']}].sha256' does not match the weights"
                    )
    except CheckpointError:
        with torch.no_grad():
            for name, t in backup.items():
                own[name].copy_(t)
        raise
    for li, lv in enumerate(manifest["levels"]):
        cms.experts[li] = [
            ExpertInfo(
                slot=e["slot"],
                active=e["active"],
                unlocked_at_step=e["unlocked_at_step"],
                origin=e["origin"],
                history=list(e["history"]),
                frozen=bool(e.get("frozen", False)),
                period=e.get("period"),
            )
            for e in lv["experts"]
        ]
        cms.refresh_routing(li)
    cms.step = int(manifest["step"])
    cms.period = int(manifest.get("period", 0))
    cms.prototypes = prototypes
    if policy_read is not None:
        copy_policy_tensors(policy, *policy_read)
    for p in own.values():
        p.grad = None
    if train is not None:
        optimizer.load_state_tensors(train)
    return manifest


def open_memory_model(
    params: "Params", root: Path = Path("."), state: str | Path | None = None, with_optimizer: bool = False
) -> tuple["LoadedModel", ContinuumMemory, ChunkedOptimizer | None]:
    """The base model from params, with its memory levels attached and ``state`` loaded.

    With ``state=None`` the levels are fresh (``initial_experts`` unlocked per level). The dream policy
    (model/sleep/dream_policy.py) is attached when ``dream.policy.enabled`` or the state carries one (so it is
    carried on): the state's, else ``dream.policy.source`` for a fresh state, else a fresh one.
    """
    from model.decoding.loading import load_base_model, resolve_device

    if (checked := _take_checked(params, root, state, with_optimizer)) is not None:
        return checked
    loaded = load_base_model(params.model, root=root)
    cms = attach_cms(loaded.model, params.cms, seed=params.seed)
    loaded.model.to(resolve_device(params.model.device))
    optimizer = ChunkedOptimizer(cms, grad_clip=params.wake.grad_clip) if with_optimizer else None
    pcfg = params.dream.policy
    has_policy = state is not None and POLICY_JSON in read_manifest(state).get("files", {})
    if pcfg.enabled or has_policy:
        cms.dream_policy = attach_policy(loaded.model, pcfg, loaded.name, seed=params.seed)
        if state is None and pcfg.source is not None:
            src = Path(pcfg.source)
            load_policy(cms.dream_policy, src if src.is_absolute() else root / src)
    if state is not None:
        state = Path(state)
        made_with = read_manifest(state).get("metadata", {}).get("model")
        if made_with is not None and made_with != loaded.name:  # its experts are deltas of another model's weights
            raise CheckpointError(f"{state / MANIFEST_FILE}: field 'metadata.model' is {made_with!r}, but this "
                                  f"project's base model is {loaded.name!r} (model.source {params.model.source!r}): "
                                  "a state of another base model")
        load_state(cms, state, optimizer)
    return loaded, cms, optimizer


#: The state :func:`check_state` opened last, kept for the stage that checked it: (key, model, levels, optimiser).
_checked: tuple[tuple, "LoadedModel", ContinuumMemory, ChunkedOptimizer] | None = None


def _checked_key(params: "Params", root: Path, state: str | Path) -> tuple:
    state = Path(state)
    return (params.model_dump_json(), str(Path(root).resolve()), str(state.resolve()),
            sha256_file(state / MANIFEST_FILE) if (state / MANIFEST_FILE).is_file() else None)


def _take_checked(params: "Params", root: Path, state: str | Path | None, with_optimizer: bool):
    """The model :func:`check_state` opened, if it is this one (same params, root, state and manifest); it is
    handed out once, and the next opening lets it go whatever it asks for, so it is never held longer."""
    global _checked
    held, _checked = _checked, None
    if held is None:
        return None
    if state is None or held[0] != _checked_key(params, root, state):
        del held
        gc.collect()  # the model's reference cycles: free it before the caller loads its own
        return None
    _, loaded, cms, optimizer = held
    return loaded, cms, optimizer if with_optimizer else None


def check_state(params: "Params", root: Path, state: str | Path, needed_by: str) -> dict[str, Any]:
    """Open ``state`` exactly as a stage will (base model, memory levels, optimiser, every check of
    :func:`load_state`) and keep it for the stage; return its manifest.

    A stage calls this before it starts its flow, so a missing, damaged or foreign state is one
    CheckpointError naming the file and the field, not a failure in the middle of a run. ``needed_by``
    says which stage needs it (for the message of a missing state). The opened model is kept, and the stage's
    own :func:`open_memory_model` of the same state (same params, root and manifest) takes it instead of opening
    it a second time (about 1 s of each stage: the base model's load and checksums, and freeing the copy).
    """
    global _checked
    state = Path(state)
    if not state.is_dir():
        raise CheckpointError(f"{state}: missing; {needed_by}")
    loaded, cms, optimizer = open_memory_model(params, root, state, with_optimizer=True)
    routing, protos = params.cms.routing, cms.prototypes
    if routing.by_prototype and protos is not None and protos.metric != routing.metric:  # the next wake adds to them
        raise CheckpointError(f"{state / EXPERTS_FILE}: its routing prototypes use the {protos.metric} metric, but "
                              f"params' cms.routing.metric is {routing.metric}; a state keeps the metric it started "
                              f"with (set cms.routing.metric: {protos.metric} to go on from it)")
    _checked = (_checked_key(params, root, state), loaded, cms, optimizer)
    return read_manifest(state)
