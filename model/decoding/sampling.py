"""Sampling continuations from the model in whatever CMS view is active (teacher/student/dream).

One batched decoder serves every sampling site of a sleep: teacher samples and on-policy
student samples for distillation, Learning-to-Imitate continuations, and dreams.

* **Static KV cache.** Each decoder layer gets a preallocated key/value buffer
  ``(rows, kv_heads, S, head_dim)``, written in place; a decode step calls the layer's
  own submodules (norms, q/k/v/o projections, the model's rotary embedding, ``mlp``,
  which is a :class:`~model.memory.cms.CMSBlock` where memory levels are attached), found by
  :func:`model.decoding.architecture.decoder_of` (Llama, Qwen2, Qwen3), with SDPA
  over the buffer. So whatever view the CMS is in -- levels masked, experts hidden,
  random-expert dream routing -- is the view that samples, and none of ``generate``'s
  per-step machinery (cache concatenation, mask building) runs.
* **Continuous batching.** Rows live at buffer rows ``0..n-1``. A row that finishes
  (EOS, a stop string, ``max_new_tokens``) leaves at once: the waiting prompts fill the
  free rows (prefilled together, right-padded, causal attention), and when none wait
  the last rows move into the holes, so every step runs only on live rows.
* **Per-row randomness.** Row ``i`` of the expanded prompt list draws its tokens from
  its own uniform stream, seeded by ``(seed, i)``: a sample does not depend on the
  batch size or on which rows shared its batch (up to float rounding of the batched
  matmuls), and the caller's random state is untouched. The one exception is dream
  mode, whose router draws its random expert per token from one shared generator.
* **Non-finite logits** (NaN or +inf) raise :class:`NonFiniteLogitsError` naming the
  prompt: a model that produces them must not be trained on its own samples.

fp32 is the reference. ``dtype="bfloat16"`` computes with a bf16 copy of the frozen base
weights (cached per parameter; memory levels keep their fp32 weights), on a CPU with
native bf16 support or a GPU. Greedy decoding equals Hugging Face ``generate``
token for token in fp32 (tests/model/test_sampling.py, bench/decoding.py).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.decoding.architecture import decoder_of
from model.decoding.forward import trunk_signature
from model.memory.cms import ExpertBank

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREFILL_TOKENS = 8192  # most prompt tokens prefilled in one pass
NUCLEUS_K = (256, 4096)  # top-k tried before a full sort when looking for the top-p nucleus


@dataclass
class Sample:
    prompt: str
    text: str
    finished: bool  # ended with EOS or a stop string (False: cut at max_new_tokens)
    tokens: tuple[int, ...] = ()  # the new token ids, EOS excluded (a stop string's tokens included)


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or +inf logits for a sequence being sampled."""


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V) and one uniform in [0, 1) per row (B,).

    Greedy at temperature 0 (the uniforms are unused); else inverse-CDF sampling from
    softmax(logits / T) restricted to the top-p nucleus (the most likely tokens up to and
    including the one whose cumulative probability reaches ``top_p``). The nucleus is
    looked for in the top 256, then 4096 tokens of each row, and only rows it does not
    fit in are fully sorted (a sort of the 49k vocabulary costs more than a decode step).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return _inverse_cdf(probs, uniforms)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    todo = torch.arange(probs.shape[0], device=probs.device)
    for k in (*NUCLEUS_K, probs.shape[-1]):
        k = min(k, probs.shape[-1])
        top, order = probs[todo].topk(k, dim=-1) if k < probs.shape[-1] else probs[todo].sort(dim=-1, descending=True)
        before = top.cumsum(dim=-1) - top  # mass of the more likely tokens
        fits = before[:, -1] + top[:, -1] >= top_p if k < probs.shape[-1] else torch.ones_like(todo, dtype=torch.bool)
        if bool(fits.any()):
            kept = top[fits].masked_fill(before[fits] >= top_p, 0.0)
            out[todo[fits]] = order[fits].gather(1, _inverse_cdf(kept, uniforms[todo[fits]])[:, None]).squeeze(1)
        todo = todo[~fits]
        if todo.numel() == 0:
            break
    return out


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index (B,) drawn from the unnormalised weights (B, K) >= 0 with one uniform per row (B,)."""
    cdf = weights.cumsum(dim=-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).clamp(max=weights.shape[-1] - 1).squeeze(1)
    # Float rounding can land on a zero-weight tail token: take the last positive one instead.
    zero = weights.gather(1, idx[:, None]).squeeze(1) <= 0
    if bool(zero.any()):
        pos = torch.arange(weights.shape[-1], device=weights.device).expand_as(weights)
        idx[zero] = torch.where(weights[zero] > 0, pos[zero], -1).max(dim=-1).values
    return idx


def row_uniforms(seed: int, n_rows: int, n_steps: int) -> torch.Tensor:
    """Uniforms (n_rows, n_steps) in [0, 1); row i depends only on (seed, i)."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, i]).random(n_steps) for i in range(n_rows)]))


# ------------------------------------------------------------------ weights in another dtype
_CAST_CACHE: dict[int, tuple[int, int, torch.dtype, torch.Tensor]] = {}  # id(parameter) -> its cast copy


def base_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The base model's parameters: every parameter outside the CMS expert banks."""
    memory = {id(p) for m in model.modules() if isinstance(m, ExpertBank) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in memory]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CPU with AVX512-BF16 or AMX (oneDNN's check), or a GPU with bf16."""
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


def resolve_dtype(dtype: str | None, device: torch.device) -> str | None:
    """The compute dtype that ``dtype`` names on ``device``: ``"auto"`` is bfloat16 where the device runs it
    natively (:func:`native_bf16`) and the model's own dtype (None) elsewhere; any other value is itself."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else None
    return dtype


def check_dtype_supported(dtype: torch.dtype, device: torch.device) -> None:
    """Raise ValueError if ``dtype`` compute is not natively supported on ``device``."""
    if dtype != torch.bfloat16 or native_bf16(device):
        return
    if device.type == "cuda":
        raise ValueError("bfloat16 sampling needs a GPU with bf16 support; use float32 or auto")
    raise ValueError("bfloat16 sampling needs a CPU with native bf16 (AVX512-BF16 or AMX); use float32 or auto")


@contextlib.contextmanager
def base_weights_as(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Temporarily give the base model's parameters ``dtype`` copies (memory levels keep theirs).

    The copies are cached per parameter (and rebuilt if the parameter changed in place),
    so repeated calls cost nothing but memory; the original tensors are put back after.
    """
    swapped = []
    try:
        for p in base_parameters(model):
            if p.dtype == dtype:
                continue
            key = (p._version, p.data_ptr(), dtype)
            hit = _CAST_CACHE.get(id(p))
            if hit is None:
                weakref.finalize(p, _CAST_CACHE.pop, id(p), None)
            if hit is None or hit[:3] != key:
                hit = (*key, p.detach().to(dtype))
                _CAST_CACHE[id(p)] = hit
            swapped.append((p, p.data))
            p.data = hit[3]
        yield
    finally:
        for p, data in swapped:
            p.data = data


# ------------------------------------------------------------------ the static-cache decoder
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One new token per row attending over its cached slots, grouped-query: softmax(q k^T * scale) v.

    q (n, H, hd); k, v (n, KV, S, hd) with H a multiple of KV (the H / KV query heads of a group share
    their KV head); visible (n, 1, 1, S) bool, the cached slots of each row. Returns (n, H * hd).

    Two batched matmuls with the scores and the softmax in fp32. For a query of length one this is 2x
    (fp32) to 6x (bf16) faster on the CPU than ``F.scaled_dot_product_attention`` with a mask, whose
    flash kernel works block by block (bench/decoding.py; the decode step spent half its time there).
    """
    n, n_heads, hd = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(n, n_kv, n_heads // n_kv, hd).to(k.dtype)  # (n, KV, G, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (n, KV, G, S)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(n, n_heads * hd)


@dataclass(frozen=True)
class _TrunkEntry:
    keys: tuple[torch.Tensor, ...]  # per layer below start: (KV, T, hd)
    values: tuple[torch.Tensor, ...]
    hidden: torch.Tensor  # (T, d): the prompt's hidden states entering layer start


class PromptTrunk:
    """The layers below ``start`` of the prompts a sampler prefills again and again, kept across samplings.

    A consolidation samples on-policy continuations of the same prompts step after step while only its memory
    levels (decoder layers ``start`` and up) learn: below the first CMS layer a prompt's keys, values and hidden
    states are the same every time. Given to :func:`sample_groups`, a prompt computed once skips those layers
    after (its cached keys and values are copied into its row); the samples are the same up to the float
    rounding of another packing. Like :class:`~model.decoding.forward.TrunkCache` it empties itself when the
    embedding or a layer below ``start`` is not the same tensor as when it was filled (trained in place, cast to
    another dtype, another model), and layers below ``start`` must hold no memory level (ValueError); forward
    hooks that change a layer's output (the dream policy, active only while dreams are sampled) must be in the
    same state in every sampling that shares one. At most
    ``max_tokens`` prompt tokens are kept (the oldest prompts go first): a token costs
    ``start x 2 x kv_heads x head_dim + hidden_size`` floats (36 KB for SmolLM2-135M below layer 22).
    """

    def __init__(self, start: int, max_tokens: int = 8192) -> None:
        if start < 1 or max_tokens < 1:
            raise ValueError(f"start and max_tokens must be >= 1, got {start} and {max_tokens}")
        self.start, self.max_tokens = start, max_tokens
        self.hits = self.misses = self.tokens = 0
        self._store: dict[tuple[int, ...], _TrunkEntry] = {}
        self._signature: tuple | None = None

    def _signature_of(self, model: nn.Module) -> tuple:
        """:func:`~model.decoding.forward.trunk_signature`; ValueError if a memory level lies below ``start``."""
        arch = decoder_of(model)
        if self.start > len(arch.layers):
            raise ValueError(f"PromptTrunk start {self.start} is beyond the model's {len(arch.layers)} layers")
        below = [m for layer in arch.layers[: self.start] for m in layer.modules() if isinstance(m, ExpertBank)]
        if below:
            raise ValueError(f"PromptTrunk start {self.start}: a memory level lies below it; its layers must be frozen")
        return trunk_signature(model, self.start)

    def check(self, model: nn.Module) -> None:
        """Empty the cache if ``model``'s trunk is not the one it was filled with (a sampler about to fill it)."""
        signature = self._signature_of(model)
        if signature != self._signature:
            self._store.clear()
            self.tokens = 0
            self._signature = signature

    def get(self, prompt: Sequence[int]) -> _TrunkEntry | None:
        entry = self._store.get(tuple(prompt))
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, prompt: Sequence[int], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], row: int,
            hidden: torch.Tensor) -> None:
        """Keep ``prompt``'s keys and values (slots 0..len-1 of buffer row ``row`` of the layers below start) and
        its hidden states (len, d)."""
        t = len(prompt)
        if tuple(prompt) in self._store or t > self.max_tokens:
            return
        while self._store and self.tokens + t > self.max_tokens:
            self.tokens -= len(self._store.pop(next(iter(self._store))).hidden)
        self._store[tuple(prompt)] = _TrunkEntry(tuple(k[row, :, :t].clone() for k in keys[: self.start]),
                                                 tuple(v[row, :, :t].clone() for v in values[: self.start]),
                                                 hidden.detach().clone())
        self.tokens += t

    @torch.no_grad()
    def extend(self, model: nn.Module, prompts: Sequence[Sequence[int]],
               tails: Sequence[Sequence[int]]) -> list[torch.Tensor] | None:
        """The hidden states entering layer ``start`` of each prompt followed by its tail, (len(prompt) +
        len(tail), d) each: the prompt's from the cache, the tail's computed over the layers below ``start``
        attending to the prompt's cached keys and values (causal). None unless the cache holds every prompt for
        this ``model`` as it is now (then compute them whole: the sampler may have run with its weights in another
        dtype). What a sleep's training step needs below its memory levels for the prompts it has just sampled
        from, with their continuations as the tails."""
        if self._signature_of(model) != self._signature:
            return None
        entries = [self._store.get(tuple(p)) for p in prompts]
        if not entries or any(e is None for e in entries) or any(not t for t in tails):
            return None
        arch = decoder_of(model)
        device = arch.embed.weight.device
        n_prompt, n_tail = [len(p) for p in prompts], [len(t) for t in tails]
        h = arch.embed(torch.tensor([x for t in tails for x in t], dtype=torch.long, device=device))[None]
        cos, sin = arch.rotary_per_token(h, torch.cat([torch.arange(p, p + t) for p, t in zip(n_prompt, n_tail)])
                                         .to(device))
        bounds = list(itertools.accumulate(n_tail, initial=0))
        masks = [torch.ones(t, p + t, dtype=torch.bool, device=device).tril(p) for p, t in zip(n_prompt, n_tail)]
        for i, layer in enumerate(arch.views[: self.start]):
            q, k, v = layer.qkv(layer.attention_input(h), cos, sin)  # (N, H, hd), (N, KV, hd), (N, KV, hd)
            out = []
            for j, entry in enumerate(entries):  # token t of a tail sees the prompt and the tail up to t
                a, b = bounds[j], bounds[j + 1]
                keys = torch.cat([entry.keys[i], k[a:b].transpose(0, 1)], dim=1)[None]  # (1, KV, P + T, hd)
                values = torch.cat([entry.values[i], v[a:b].transpose(0, 1)], dim=1)[None]
                o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], keys, values, attn_mask=masks[j],
                                                   scale=arch.scaling, enable_gqa=True)
                out.append(o[0].transpose(0, 1).reshape(b - a, -1))
            h = h + layer.attention_output(torch.cat(out)[None])
            h = h + layer.feed_forward(h)
        return [torch.cat([entry.hidden.to(h.dtype), h[0, bounds[j] : bounds[j + 1]]])
                for j, entry in enumerate(entries)]

    def load(self, entry: _TrunkEntry, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], row: int) -> None:
        """Copy ``entry``'s keys and values into buffer row ``row`` of the layers below start."""
        t = entry.hidden.shape[0]
        for buf, cached in zip(keys, entry.keys):
            buf[row, :, :t] = cached
        for buf, cached in zip(values, entry.values):
            buf[row, :, :t] = cached


class StaticKVDecoder:
    """A decoder (Llama, Qwen2 or Qwen3: :func:`model.decoding.architecture.decoder_of`) run layer by layer over
    preallocated per-layer KV buffers.

    Rows ``0..n-1`` of the buffers hold the live sequences, each from slot 0 (no padding
    inside a row); ``lengths[r]`` is how many of row r's tokens are cached. One
    :meth:`forward` feeds the next token of every live row *and* the whole prompts of
    rows joining the batch, packed into one pass, so the weights are read once per step
    whether or not rows are being refilled.

    With a :class:`PromptTrunk`, a prompt it holds skips the layers below the trunk's ``start``: its keys and
    values there are copied into its row and its hidden states enter at layer ``start``; a prompt it does not
    hold is computed and then kept.
    """

    def __init__(self, model: PreTrainedModel, rows: int, max_len: int, trunk: PromptTrunk | None = None) -> None:
        self.arch = decoder_of(model)  # UnsupportedArchitectureError for a family it does not know
        self.trunk = trunk
        if trunk is not None:
            trunk.check(model)  # empties itself if the trunk changed since it was filled
        self._banks = [m for m in model.modules() if isinstance(m, ExpertBank)]  # dream mode: random experts
        self.views = self.arch.views  # each reads its layer's modules when called (CMS blocks, adapters)
        self.hd, self.scale = self.arch.head_dim, self.arch.scaling
        dtype, self.device = self.arch.embed.weight.dtype, self.arch.embed.weight.device
        shape = (rows, self.arch.n_kv_heads, max_len, self.hd)
        # Zeros, not empty: masked slots still enter the attention product (0 * NaN would be NaN).
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.arch.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.arch.layers]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)

    def forward(self, tokens: torch.Tensor, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Feed ``tokens`` (n,) to live rows 0..n-1 and ``prompts`` (g token-id lists) to rows n..n+g-1.

        Returns the next-token logits (n + g, V) in fp32: after each live row's token and
        after each prompt's last token. All N = n + sum(len(prompt)) tokens go through the
        projections and MLPs as one packed sequence (no padding); attention runs per
        group: the live rows over their cached slots, and each run of equally long
        prompts causally over itself (pass prompts sorted by length for few runs).
        A prompt given several times (several samples of one prompt) is computed once and
        its cache copied to the other rows: a sleep draws 4-6 continuations of a prompt of
        up to a few hundred tokens. Not in dream mode, where every token of every row draws
        its own random expert (the copies of a prompt are different computations there).
        """
        first: dict[tuple, int] = {}
        which = [first.setdefault(tuple(p), len(first)) for p in prompts]  # unique prompts in order of first use
        unique = list(first)
        if len(unique) == len(prompts) or any(b.random_generator is not None for b in self._banks):
            return self._forward(tokens, prompts)
        n = tokens.shape[0]
        logits = self._forward(tokens, unique)
        copies = [j for j in range(len(prompts)) if which[j] != j]
        if copies:  # one gather then one scatter: a row that is both a source and a destination is read first
            self.move([n + which[j] for j in copies], [n + j for j in copies])
        return torch.cat([logits[:n], logits[n:][torch.tensor(which, device=logits.device)]])

    def _forward(self, tokens: torch.Tensor, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        n, g = tokens.shape[0], len(prompts)
        lens = [len(p) for p in prompts]
        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long).to(self.device)
        old = self.lengths[:n]  # slot each live row's token goes to = its position
        pos = torch.cat([old, *(torch.arange(k, device=self.device) for k in lens)])  # (N,)
        ids = torch.cat([tokens, flat])
        rows = torch.arange(n, device=self.device)
        span = int(old.max()) + 1 if n else 0
        visible = (torch.arange(span, device=self.device)[None, :] <= old[:, None])[:, None, None, :]  # (n,1,1,S)
        offsets = list(itertools.accumulate(lens, initial=n))  # first token of each prompt in the packed pass
        live = (rows, old, span, visible)
        cut = self.trunk.start if self.trunk is not None and g else 0
        if cut:  # below the trunk's start: the live tokens and the prompts it does not hold
            held = [self.trunk.get(p) for p in prompts]
            todo = [j for j in range(g) if held[j] is None]
            keep = torch.cat([rows, *(torch.arange(offsets[j], offsets[j] + lens[j], device=self.device)
                                      for j in todo)])
            h = self.arch.embed(ids[keep])[None]
            if keep.numel():  # else every prompt is held and no row is live
                cos, sin = self.arch.rotary_per_token(h, pos[keep])
                h = self._layers(h, cos, sin, 0, cut, n, live,
                                 self._runs([lens[j] for j in todo], [n + j for j in todo], n))
            full = h.new_empty(1, ids.shape[0], h.shape[-1])
            full[0, keep] = h[0]
            for j, entry in enumerate(held):
                if entry is not None:
                    self.trunk.load(entry, self.k, self.v, n + j)
                    full[0, offsets[j] : offsets[j] + lens[j]] = entry.hidden
            for j in todo:
                self.trunk.put(prompts[j], self.k, self.v, n + j, full[0, offsets[j] : offsets[j] + lens[j]])
            h = full
        else:
            h = self.arch.embed(ids)[None]  # (1, N, d)
        cos, sin = self.arch.rotary_per_token(h, pos)  # (N, 1, hd)
        h = self._layers(h, cos, sin, cut, len(self.views), n, live, self._runs(lens, list(range(n, n + g)), n))
        self.lengths[:n] += 1
        self.lengths[n : n + g] = torch.tensor(lens, dtype=torch.long, device=self.device)
        ends = torch.tensor(lens, dtype=torch.long).cumsum(0) + n - 1
        last = torch.cat([rows, ends.to(self.device)])  # (n + g,)
        return self.arch.head(self.arch.norm(h[0, last])).float()

    @staticmethod
    def _runs(lens: Sequence[int], prompt_rows: Sequence[int], token: int) -> list[tuple[int, int, int, int]]:
        """(first token, first row, rows, length) of each run of prompts of equal length in consecutive rows,
        their tokens packed one after another from packed position ``token`` (after the live rows' tokens)."""
        runs: list[tuple[int, int, int, int]] = []
        for length, row in zip(lens, prompt_rows):
            if runs and runs[-1][3] == length and runs[-1][1] + runs[-1][2] == row:  # extends the last run
                t0, r0, count, _ = runs[-1]
                runs[-1] = (t0, r0, count + 1, length)
            else:
                runs.append((token, row, 1, length))
            token += length
        return runs

    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lo: int, hi: int, n: int,
                live: tuple, runs: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """Layers [lo, hi) on the packed tokens h (1, N, d): the ``n`` live rows' new tokens first, then the
        ``runs`` of whole prompts (:meth:`_runs`), causal; each token's keys and values go to its row's slot."""
        rows, old, span, visible = live
        for i in range(lo, hi):
            layer = self.views[i]
            q, k, v = layer.qkv(layer.attention_input(h), cos, sin)  # (N, H, hd), (N, KV, hd), (N, KV, hd)
            out = []
            if n:  # one new token per live row, attending over its cached slots
                self.k[i][rows, :, old] = k[:n]
                self.v[i][rows, :, old] = v[:n]
                out.append(decode_attention(q[:n], self.k[i][:n, :, :span], self.v[i][:n, :, :span], visible,
                                            self.scale))
            for t0, r0, count, t in runs:  # whole prompts, causal
                qp, kp, vp = (z[t0 : t0 + count * t].view(count, t, -1, self.hd).transpose(1, 2) for z in (q, k, v))
                self.k[i][r0 : r0 + count, :, :t] = kp
                self.v[i][r0 : r0 + count, :, :t] = vp
                o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=True)
                out.append(o.transpose(1, 2).reshape(count * t, -1))
            h = h + layer.attention_output(torch.cat(out)[None] if len(out) > 1 else out[0][None])
            h = h + layer.feed_forward(h)
        return h

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy buffer rows ``src`` onto rows ``dst`` (compaction, copies of a prompt); all rows are read before any
        is written."""
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        span = int(self.lengths[s].max())
        for buf in (*self.k, *self.v):
            buf[d, :, :span] = buf[s, :, :span]
        self.lengths[d] = self.lengths[s]


# ------------------------------------------------------------------ the sampler
@dataclass
class _Row:
    index: int  # position in the expanded prompt list
    tokens: list[int]  # generated so far
    text: str | None = None  # set when a stop string ended it


@dataclass(frozen=True)
class SampleGroup:
    """Prompts to sample ``n_per_prompt`` continuations of, with the seed of their rows."""

    prompts: Sequence[str]
    n_per_prompt: int = 1
    seed: int = 0


def sample_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    n_per_prompt: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    min_new_tokens: int = 0,
    *,
    stop: Sequence[str] = (),
    dtype: str | None = None,
    trunk: PromptTrunk | None = None,
) -> list[Sample]:
    """Sample ``n_per_prompt`` continuations of every prompt; temperature 0 means greedy.

    EOS cannot be drawn before ``min_new_tokens`` tokens (a model that learned to answer
    with one short label and stop can still be made to write more). A sequence also ends
    at the first of the ``stop`` strings in its text, which is cut before it (the stop
    string may span several tokens). At most ``batch_size`` sequences decode at once;
    ``dtype`` (None: the model's own; "float32", "bfloat16", or "auto": bf16 where the device runs it
    natively, else the model's own) is the base weights' compute dtype. Seeded per row (see the module
    docstring). ``trunk``: a :class:`PromptTrunk` kept across calls. Returns prompt-major order.

    Raises ValueError on bad arguments or a prompt that encodes to no tokens,
    NonFiniteLogitsError on NaN/+inf logits, UnsupportedArchitectureError on a model
    :func:`model.decoding.architecture.decoder_of` does not know.
    """
    return sample_groups(model, tokenizer, [SampleGroup(prompts, n_per_prompt, seed)], max_new_tokens, temperature,
                         top_p, batch_size, min_new_tokens, stop=stop, dtype=dtype, trunk=trunk)[0]


@torch.inference_mode()
def sample_groups(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    groups: Sequence[SampleGroup],
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    min_new_tokens: int = 0,
    *,
    stop: Sequence[str] = (),
    dtype: str | None = None,
    trunk: PromptTrunk | None = None,
) -> list[list[Sample]]:
    """:func:`sample_continuations` of several groups in one decode: each group's rows draw from the
    uniform streams of its own seed, so group g's samples are those ``sample_continuations(groups[g]...)``
    draws (up to the float rounding of batched matmuls), in its prompt-major order. On a small batch a
    decode step costs about as much as on one row twice its size (it reads every weight once), so two
    sampling sites of one training step (a sleep's on-policy and Learning-to-Imitate samples) share one.
    ``trunk``: a :class:`PromptTrunk` that keeps the prompts' layers below its start from one call to the next.
    """
    if not groups or any(not g.prompts for g in groups):
        raise ValueError("no prompts to sample from")
    if any(g.n_per_prompt < 1 for g in groups) or batch_size < 1:
        raise ValueError(f"n_per_prompt and batch_size must be >= 1, got "
                         f"{[g.n_per_prompt for g in groups]} and {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or any(g.seed < 0 for g in groups) or min_new_tokens < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, seed >= 0, min_new_tokens >= 0; got "
                         f"{temperature}, {top_p}, {[g.seed for g in groups]}, {min_new_tokens}")
    if isinstance(stop, str) or any(not s for s in stop):
        raise ValueError(f"stop must be a sequence of non-empty strings, got {stop!r}")
    if dtype is not None and dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be None, auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    dtype = resolve_dtype(dtype, model.device)
    expanded, ids, uniforms = [], [], []
    for g in groups:
        encoded = tokenizer(list(g.prompts))["input_ids"]
        empty = [p for p, x in zip(g.prompts, encoded) if not x]
        if empty:
            raise ValueError(f"prompt {empty[0]!r} encodes to no tokens")
        n = len(g.prompts) * g.n_per_prompt
        expanded += [p for p in g.prompts for _ in range(g.n_per_prompt)]
        ids += [encoded[i // g.n_per_prompt] for i in range(n)]
        uniforms.append(row_uniforms(g.seed, n, max_new_tokens) if temperature > 0 else torch.zeros(n, max_new_tokens))
    compute = DTYPES[dtype] if dtype else decoder_of(model).embed.weight.dtype
    check_dtype_supported(compute, model.device)
    was_training = model.training
    model.eval()
    try:
        with base_weights_as(model, compute):
            rows = _decode(model, tokenizer, ids, max_new_tokens, temperature, top_p, torch.cat(uniforms), batch_size,
                           min_new_tokens, list(stop), expanded, trunk)
    finally:
        model.train(was_training)
    eos = tokenizer.eos_token_id
    out = []
    for prompt, row in zip(expanded, rows):
        ended = bool(row.tokens) and row.tokens[-1] == eos
        body = tuple(row.tokens[:-1] if ended else row.tokens)
        if row.text is not None:
            out.append(Sample(prompt, row.text, True, body))
        else:
            out.append(Sample(prompt, tokenizer.decode(body, skip_special_tokens=True), ended, body))
    bounds = list(itertools.accumulate(len(g.prompts) * g.n_per_prompt for g in groups))
    return [out[a:b] for a, b in zip([0, *bounds], bounds)]


def _decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    uniforms: torch.Tensor,
    batch_size: int,
    min_new_tokens: int,
    stop: list[str],
    prompts: list[str],
    trunk: PromptTrunk | None = None,
) -> list[_Row]:
    """Continuous batching over the token id lists ``ids``; one finished :class:`_Row` per input, row i
    drawing its tokens with ``uniforms[i]`` (len(ids), max_new_tokens)."""
    n_all = len(ids)
    width = min(batch_size, n_all)
    dec = StaticKVDecoder(model, width, max(len(p) for p in ids) + max_new_tokens - 1, trunk)
    device = dec.device
    eos = tokenizer.eos_token_id
    waiting = sorted(range(n_all), key=lambda i: len(ids[i]))  # pop() takes the longest: long runs of equal lengths
    done: list[_Row | None] = [None] * n_all
    live: list[_Row] = []
    fed = torch.empty(0, dtype=torch.long, device=device)  # the last token of every live row
    while live or waiting:
        new: list[int] = []  # join the batch in the free rows at its end
        budget = PREFILL_TOKENS
        while waiting and len(live) + len(new) < width and (not new or len(ids[waiting[-1]]) <= budget):
            budget -= len(ids[waiting[-1]])
            new.append(waiting.pop())
        logits = dec.forward(fed, [ids[j] for j in new])
        live += [_Row(j, []) for j in new]
        bad = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1)
        if bool(bad.any()):
            r = live[int(bad.nonzero()[0])]
            raise NonFiniteLogitsError(f"non-finite logits while sampling prompt {r.index} ({prompts[r.index][:80]!r}) "
                                       f"at new token {len(r.tokens)}")
        steps = torch.tensor([len(r.tokens) for r in live])
        if eos is not None and min_new_tokens > 0:
            logits[(steps < min_new_tokens).to(device), eos] = float("-inf")
        u = uniforms[torch.tensor([r.index for r in live]), steps]
        picked = pick_tokens(logits, temperature, top_p, u.to(device)).tolist()
        finished = []
        for r, (row, tok) in enumerate(zip(live, picked)):
            row.tokens.append(tok)
            if stop:
                text = tokenizer.decode(row.tokens, skip_special_tokens=True)
                cut = min((k for k in (text.find(s) for s in stop) if k >= 0), default=-1)
                if cut >= 0:
                    row.text = text[:cut]
            if tok == eos or row.text is not None or len(row.tokens) == max_new_tokens:
                finished.append(r)
                done[row.index] = row
        if finished:  # compact: the last live rows move into the holes
            gone, m = set(finished), len(live) - len(finished)
            holes = [r for r in finished if r < m]
            movers = [r for r in range(m, len(live)) if r not in gone]
            order = list(range(m))
            for h, s in zip(holes, movers):
                order[h] = s
            if movers:
                dec.move(movers, holes)
            live = [live[r] for r in order]
            picked = [picked[r] for r in order]
        fed = torch.tensor(picked, dtype=torch.long, device=device)
    return done  # type: ignore[return-value]


__all__ = ["NonFiniteLogitsError", "PromptTrunk", "Sample", "SampleGroup", "StaticKVDecoder", "decode_attention", "pick_tokens", "row_uniforms",
           "sample_continuations", "sample_groups"]
