"""The glue of the commands that use a trained model (``lm-sleep predict``, ``generate`` and ``export``): a state
opened by period or directory, its answers as JSON-ready rows, its export written.

The model work is model/serving/serving.py and model/serving/export.py. Nothing here starts Prefect: a command that
answers a few texts should not wait for an API server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.serving.export import ExportError, export_model
from model.serving.serving import TrainedModel, load_state


def open_state(state: int | str, params_path: str) -> TrainedModel:
    """The state of period ``state`` (its sleep state) or the state directory ``state``, with ``params_path``'s
    model and paths; a missing or corrupt state is a UserError naming the file."""
    return load_state(state, params_path)


def prediction_rows(trained: TrainedModel, texts: list[str], labels: list[str] | None, top_k: int) -> list[dict[str, Any]]:
    """{"text", "labels": [{"label", "score"}, ...]} per text: its ``top_k`` labels, best first."""
    answers = trained.predict(texts, labels, top_k)
    return [{"text": t, "labels": [{"label": lab, "score": s} for lab, s in a]} for t, a in zip(texts, answers)]


def generation_rows(trained: TrainedModel, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                    seed: int) -> list[dict[str, Any]]:
    """{"prompt", "text"} per prompt: its continuation, every memory level on."""
    texts = trained.generate(prompts, max_new_tokens, temperature, top_p, seed)
    return [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]


def write_export(trained: TrainedModel, out: str) -> Path:
    """The state as a Hugging Face directory at ``out`` (replaced atomically); a directory that cannot be written
    is an ExportError naming it."""
    try:
        return export_model(trained, out)
    except OSError as e:
        raise ExportError(f"{out}: cannot write: {e.strerror or e}") from None
