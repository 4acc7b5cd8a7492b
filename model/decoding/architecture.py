"""The one place that reaches into a causal LM's decoder: embedding, layers, norms, rotary, mask.

Three parts of lm-sleep run the decoder by hand instead of calling the model: the split
forward pass (:mod:`model.decoding.forward`: a frozen prefix once, the rest per pass), the
sampler's static KV decoder (:class:`model.decoding.sampling.StaticKVDecoder`: each layer's own
norms, projections and ``mlp`` around attention over a preallocated cache), and the
memory levels (:mod:`model.memory.cms`: a :class:`~model.memory.cms.CMSBlock` around each chosen
layer's ``mlp``). They all go through :func:`decoder_of`, which names the pieces once per
supported family and refuses any other model with :class:`UnsupportedArchitectureError`.

Supported (``config.model_type``):

* ``llama`` -- the Llama family (SmolLM2, the project's default, Llama 2/3, ...);
* ``qwen2`` -- Qwen2 / Qwen2.5: biases on the q/k/v projections (inside the Linears);
* ``qwen3`` -- Qwen3: an RMSNorm over each head's queries and keys (``q_norm``,
  ``k_norm``) before the rotary embedding.

All three are pre-norm decoders: ``h += o_proj(attn(input_layernorm(h)))``, then
``h += mlp(post_attention_layernorm(h))``, rotary position embeddings and grouped-query
attention scaled by ``head_dim ** -0.5``. Sliding-window attention (Qwen's
``use_sliding_window``) is refused: the sampler's cache and the packed mask assume every
layer sees the whole sequence.

A layer's modules are read when used, never kept: the CMS replaces ``mlp`` and the trial
and dream-policy adapters wrap the projections after the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from model.errors import UserError

# model_type -> whether queries and keys get a per-head RMSNorm (q_norm, k_norm) before rotary
FAMILIES = {"llama": False, "qwen2": False, "qwen3": True}
_DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


class UnsupportedArchitectureError(UserError, ValueError):
    """A model whose decoder lm-sleep cannot run by hand; the message names its model_type and class.

    A ``ValueError``, as :class:`~model.memory.cms.CMSError` (what attaching memory levels raised before).
    """


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (N, heads, hd) with cos/sin (N, 1, hd), as Llama's apply_rotary_pos_emb."""
    return (x * cos) + (_rotate_half(x) * sin)


@dataclass(frozen=True)
class Layer:
    """One decoder layer seen piece by piece (what the static KV decoder calls around its own attention).

    ``module`` is the layer itself; every piece is looked up on it at each call.
    """

    module: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qk_norm: bool

    def attention_input(self, h: torch.Tensor) -> torch.Tensor:
        """The normed input of the attention block: input_layernorm(h)."""
        return self.module.input_layernorm(h)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (N, H, hd) and keys (N, KV, hd) with rotary applied, values (N, KV, hd), from x (1, N, d).

        ``cos``/``sin`` (N, 1, hd) come from :meth:`Decoder.rotary_per_token`. Qwen3's
        per-head q/k norms come between the projection and the rotary embedding.
        """
        attn = self.module.self_attn
        q = attn.q_proj(x)[0].view(-1, self.n_heads, self.head_dim)
        k = attn.k_proj(x)[0].view(-1, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        v = attn.v_proj(x)[0].view(-1, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attention_output(self, o: torch.Tensor) -> torch.Tensor:
        """The output projection of the attention (heads concatenated, (..., H * hd)) -> (..., d)."""
        return self.module.self_attn.o_proj(o)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP block's contribution (added to h): mlp(post_attention_layernorm(h))."""
        return self.module.mlp(self.module.post_attention_layernorm(h))


class Decoder:
    """The decoder of a supported causal LM, by piece. Get one with :func:`decoder_of`.

    ``family`` is the model_type; ``module`` the inner decoder (``model.get_decoder()``);
    ``embed``, ``layers`` (the ``nn.ModuleList``), ``norm`` (the final norm), ``head``
    (the output embeddings); ``n_heads``, ``n_kv_heads``, ``head_dim``, ``scaling``
    (the attention's softmax scale); ``qk_norm`` whether queries and keys are normed per head.
    """

    def __init__(self, model: nn.Module, family: str) -> None:
        dec = model.get_decoder()
        attn = dec.layers[0].self_attn
        self.model, self.module, self.family, self.qk_norm = model, dec, family, FAMILIES[family]
        self.embed, self.layers, self.norm = dec.embed_tokens, dec.layers, dec.norm
        self.head = model.get_output_embeddings()
        self.n_heads, self.n_kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling

    @property
    def views(self) -> list[Layer]:
        """Every layer as a :class:`Layer`, bottom first."""
        return [Layer(layer, self.n_heads, self.n_kv_heads, self.head_dim, self.qk_norm) for layer in self.layers]

    # ------------------------------------------------------------------ positions and mask
    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary (cos, sin), each (R, T, hd), for h (R, T, d) at ``position_ids`` (R, T)."""
        return self.module.rotary_emb(h, position_ids=position_ids)

    def rotary_per_token(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin), each (N, 1, hd), for N packed tokens h (1, N, d) at ``positions`` (N,)."""
        cos, sin = (c[0, :, None, :] for c in self.module.rotary_emb(h, positions[None]))
        return cos, sin

    def causal_mask(self, h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The causal mask for h (R, T, d); block-diagonal when ``position_ids`` restart (packed rows)."""
        return create_causal_mask(config=self.module.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=position_ids)

    def mask_and_rope(
        self, h: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`causal_mask` and :meth:`rotary` together (what a run of whole layers needs)."""
        return self.causal_mask(h, position_ids), self.rotary(h, position_ids)

    def run_layers(self, h: torch.Tensor, position_ids: torch.Tensor, start: int, stop: int | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (R, T, d) after layers [start, stop) on h (R, T, d), each layer's own forward.

        ``mask``: a 4D boolean attention mask (R, 1, T, T), True where a token may attend (a tree of
        candidates after a prompt, say); by default the causal mask of ``position_ids``."""
        if mask is None:
            mask, pe = self.mask_and_rope(h, position_ids)
        else:
            pe = self.rotary(h, position_ids)
        for layer in self.layers[start:stop]:
            h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pe)
        return h


def architecture_name(model: nn.Module) -> str:
    """``model_type 'x' (ClassName)``, how errors name a model's architecture."""
    config = getattr(model, "config", None)
    return f"model_type {getattr(config, 'model_type', None)!r} ({type(model).__name__})"


def decoder_of(model: nn.Module) -> Decoder:
    """The :class:`Decoder` of ``model``; :class:`UnsupportedArchitectureError` naming it if unsupported."""
    name = architecture_name(model)
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"{name} is not supported: lm-sleep runs the decoder layers of Llama-family, Qwen2 and Qwen3 "
            f"causal LMs (model_type {', '.join(repr(f) for f in FAMILIES)})"
        )
    get_decoder = getattr(model, "get_decoder", None)
    dec = get_decoder() if callable(get_decoder) else None
    missing = [p for p in _DECODER_PARTS if not hasattr(dec, p)]
    layers = getattr(dec, "layers", None)
    if missing or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(
            f"{name}: its decoder lacks {missing or ['decoder layers']} (expected a {family} causal LM's "
            "embed_tokens, layers, norm and rotary_emb)"
        )
    need = _ATTENTION_PARTS + (("q_norm", "k_norm") if FAMILIES[family] else ())
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        lacks = [p for p in _LAYER_PARTS if not hasattr(layer, p)] + [p for p in need if not hasattr(attn, p)]
        if lacks:
            raise UnsupportedArchitectureError(f"{name}: decoder layer {i} lacks {lacks}")
        if getattr(attn, "sliding_window", None) is not None:
            raise UnsupportedArchitectureError(
                f"{name}: decoder layer {i} uses sliding-window attention (use_sliding_window), which is not "
                "supported; every layer must attend to the whole sequence"
            )
    return Decoder(model, family)


def expand_cache(cache: Cache, rows: int) -> DynamicCache:
    """A new cache holding ``rows`` copies of every layer's keys and values of a one-row ``cache``."""
    out = DynamicCache()
    for li, layer in enumerate(cache.layers):
        out.update(layer.keys.expand(rows, -1, -1, -1).contiguous(), layer.values.expand(rows, -1, -1, -1).contiguous(), li)
    return out


__all__ = ["FAMILIES", "Decoder", "Layer", "UnsupportedArchitectureError", "apply_rope", "architecture_name",
           "decoder_of", "expand_cache"]
