"""Gemma 4 text decoder (model_type `gemma4_text`), lean and cache-aware.

Matches transformers' Gemma4ForCausalLM (text part of Gemma4ForConditionalGeneration):
- interleaved sliding/full attention layers, each kind with its own RoPE (`default` on sliding layers,
  `proportional` partial RoPE on full layers), head size (`global_head_dim` on full layers) and, with
  `attention_k_eq_v`, its own KV head count (`num_global_key_value_heads`);
- `attention_k_eq_v`: full layers have no v_proj; values are the raw k projection (before k_norm and RoPE);
- q/k norms with a scale, a scale-free v norm, attention scaling 1.0 (the norms set the logit scale);
- Gemma 4 RMSNorm weights are the effective scale (no `1 + w` convention);
- per-layer input embeddings (PLE): a packed token embedding plus a projection of the main embedding, fed into
  every layer through a gated projection after the MLP;
- KV sharing: the last `num_kv_shared_layers` layers own no K/V (and no cache entry); they attend to what the last
  non-shared layer of their kind attended to in the same forward; with `use_double_wide_mlp` their MLP is 2x wide;
- an optional MoE block next to the dense MLP in every layer, a per-layer output scalar, final logit softcapping.

For speed q/k/v and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import AttentionView, CacheLayerSpec, KVCache
from ..errors import ModelFileError
from .layers import (
    Linear,
    RMSNorm,
    TensorGetter,
    apply_rope,
    attend,
    embed_scale,
    geglu,
    gelu_tanh,
    lm_logits,
    rms_norm,
    rope_cos_sin,
    tie_lm_head,
)

SLIDING, FULL = "sliding_attention", "full_attention"

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

_ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


@dataclass
class Gemma4Config:
    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256  # sliding layers
    global_head_dim: int = 512  # full layers
    num_global_key_value_heads: int | None = None  # full layers; None: num_key_value_heads
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)
    rope_parameters: dict = field(default_factory=lambda: {k: dict(v) for k, v in _DEFAULT_ROPE.items()})
    attention_bias: bool = False
    attention_k_eq_v: bool = False
    final_logit_softcapping: float | None = None
    vocab_size_per_layer_input: int = 262144
    hidden_size_per_layer_input: int = 0  # 0: no per-layer input embeddings
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    max_position_embeddings: int = 131072
    bos_token_id: int = 2
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0
    model_type: str = "gemma4_text"

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = [
                SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        if self.layer_types[-1] != FULL:  # the reference forces this too
            self.layer_types[-1] = FULL
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelFileError(
                f"config has {len(self.layer_types)} layer_types for {self.num_hidden_layers} layers"
            )
        if unknown := set(self.layer_types) - {SLIDING, FULL}:
            raise ModelFileError(f"unsupported Gemma 4 layer types: {sorted(unknown)}")
        if self.num_global_key_value_heads is None:
            self.num_global_key_value_heads = self.num_key_value_heads
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ModelFileError(f"num_kv_shared_layers={self.num_kv_shared_layers} out of range")
        owners = set(self.layer_types[: self.first_kv_shared_layer])
        if owners != set(self.layer_types):
            raise ModelFileError("every layer type reading shared K/V needs an earlier layer of its type that stores them")
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ModelFileError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ModelFileError(f"unsupported hidden_activation '{self.hidden_activation}'")

    # ---- derived per-layer geometry --------------------------------------------------------------
    @property
    def first_kv_shared_layer(self) -> int:
        """Layers from this index on reuse the K/V of an earlier layer of their type."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    def layer_head_dim(self, layer_type: str) -> int:
        return self.global_head_dim if layer_type == FULL else self.head_dim

    def layer_kv_heads(self, layer_type: str) -> int:
        return self.num_global_key_value_heads if layer_type == FULL else self.num_key_value_heads

    @classmethod
    def from_hf(cls, d: dict) -> "Gemma4Config":
        """Parse an HF `gemma4_text` config dict (as config.json or Gemma4TextConfig.to_dict() write it)."""
        if d.get("use_bidirectional_attention") == "all":
            raise ModelFileError("Gemma 4 config with use_bidirectional_attention='all' is an encoder, not a decoder")
        n_layers = d["num_hidden_layers"]
        layer_types = list(d.get("layer_types") or [])
        if not layer_types:
            layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)]
        if layer_types and layer_types[-1] != FULL:
            layer_types[-1] = FULL
        head_dim = d.get("head_dim", 256)
        kv_heads = d.get("num_key_value_heads", 4)
        k_eq_v = bool(d.get("attention_k_eq_v", False))
        if d.get("per_layer_config") is not None:
            # Re-serialised form: sparse per-layer overrides; Gemma 4 overrides full layers' head_dim / kv heads.
            plc = {int(i): dict(o) for i, o in d["per_layer_config"].items()}
            for i, overrides in plc.items():
                if unknown := set(overrides) - {"head_dim", "num_key_value_heads"}:
                    raise ModelFileError(f"unsupported per_layer_config overrides {sorted(unknown)}")
                if overrides and layer_types[i] != FULL:
                    raise ModelFileError("per_layer_config overrides on sliding layers are not supported")
            full = [plc.get(i, {}) for i, t in enumerate(layer_types) if t == FULL]
            if any(o != full[0] for o in full):
                raise ModelFileError("per_layer_config differs between full-attention layers")
            global_head_dim = full[0].get("head_dim", head_dim)
            global_kv = full[0].get("num_key_value_heads", kv_heads)
        else:
            global_head_dim = d.get("global_head_dim", 512)
            global_kv = d.get("num_global_key_value_heads") if k_eq_v else None
            global_kv = kv_heads if global_kv is None else global_kv
        rope = d.get("rope_parameters") or {}
        rope = {t: dict(rope.get(t) or _DEFAULT_ROPE[t]) for t in (SLIDING, FULL)}
        for t, params in rope.items():
            kind = params.get("rope_type", "default")
            if kind not in ("default", "proportional", "linear"):
                raise ModelFileError(f"unsupported RoPE type '{kind}' for {t} layers")
            if kind == "linear" and params.get("partial_rotary_factor", 1.0) != 1.0:
                raise ModelFileError("linear RoPE with partial_rotary_factor is not supported")
        eos = d.get("eos_token_id", 1)
        ple = d.get("hidden_size_per_layer_input", 256)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            global_head_dim=global_head_dim,
            num_global_key_value_heads=global_kv,
            hidden_activation=d.get("hidden_activation", "gelu_pytorch_tanh"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            sliding_window=d.get("sliding_window", 512),
            layer_types=layer_types,
            rope_parameters=rope,
            attention_bias=bool(d.get("attention_bias", False)),
            attention_k_eq_v=k_eq_v,
            final_logit_softcapping=d.get("final_logit_softcapping"),
            vocab_size_per_layer_input=d.get("vocab_size_per_layer_input", 262144),
            hidden_size_per_layer_input=ple or 0,
            num_kv_shared_layers=d.get("num_kv_shared_layers", 0) or 0,
            use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
            enable_moe_block=bool(d.get("enable_moe_block", False)),
            num_experts=d.get("num_experts"),
            top_k_experts=d.get("top_k_experts"),
            moe_intermediate_size=d.get("moe_intermediate_size"),
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            bos_token_id=d.get("bos_token_id", 2),
            eos_token_ids=list(eos) if isinstance(eos, list) else [eos],
            pad_token_id=d.get("pad_token_id", 0) or 0,
        )


def gemma4_inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim // 2] for one layer type, as the reference computes them.

    `proportional` rotates the first `partial_rotary_factor` of each half with exponents over the *whole* head_dim
    and leaves the rest unrotated (zero frequency), so the tables always span head_dim.
    """
    theta = params["rope_theta"]
    kind = params.get("rope_type", "default")
    if kind == "proportional":
        angles = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        inv = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / head_dim))
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - angles)])
        return inv / params.get("factor", 1.0)
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv / params["factor"] if kind == "linear" else inv


class Gemma4Block(nn.Module):
    def __init__(self, cfg: Gemma4Config, layer_idx: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        self.sliding = self.layer_type == SLIDING
        self.shared = layer_idx >= cfg.first_kv_shared_layer  # reads K/V of an earlier layer; owns none
        self.k_eq_v = cfg.attention_k_eq_v and not self.sliding
        self.act = _ACTIVATIONS[cfg.hidden_activation]
        H = cfg.hidden_size
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.layer_kv_heads(self.layer_type)
        self.head_dim = cfg.layer_head_dim(self.layer_type)
        self.q_dim, self.kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        n_kv_proj = 0 if self.shared else (1 if self.k_eq_v else 2)
        self.qkv_proj = Linear(H, self.q_dim + n_kv_proj * self.kv_dim)
        self.o_proj = Linear(self.q_dim, H)
        self.qkv_bias = self.o_bias = None
        if cfg.attention_bias:
            self.qkv_bias = nn.Parameter(torch.zeros(self.qkv_proj.out_features), requires_grad=False)
            self.o_bias = nn.Parameter(torch.zeros(H), requires_grad=False)
        inter = cfg.intermediate_size * (2 if cfg.use_double_wide_mlp and self.shared else 1)
        self.gate_up_proj = Linear(H, 2 * inter)
        self.down_proj = Linear(inter, H)
        eps = cfg.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = None if self.shared else RMSNorm(self.head_dim, eps)
        self.v_norm = None if self.shared else RMSNorm(self.head_dim, eps, with_scale=False)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)

        self.ple_dim = cfg.hidden_size_per_layer_input
        if self.ple_dim:
            self.per_layer_input_gate = Linear(H, self.ple_dim)
            self.per_layer_projection = Linear(self.ple_dim, H)
            self.post_per_layer_input_norm = RMSNorm(H, eps)

        self.moe = cfg.enable_moe_block
        if self.moe:
            E, I = cfg.num_experts, cfg.moe_intermediate_size
            self.eps = eps
            self.top_k = cfg.top_k_experts
            self.router_root = H**-0.5
            self.router_proj = Linear(H, E)
            self.router_scale = nn.Parameter(torch.ones(H), requires_grad=False)
            self.per_expert_scale = nn.Parameter(torch.ones(E), requires_grad=False)
            self.experts_gate_up = nn.Parameter(torch.empty(E, 2 * I, H), requires_grad=False)
            self.experts_down = nn.Parameter(torch.empty(E, H, I), requires_grad=False)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        cache_layer: int | None,
        shared_view: AttentionView | None,
        per_layer_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, AttentionView]:
        T = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        q = qkv[:, : self.q_dim].view(T, self.n_heads, self.head_dim).transpose(0, 1)
        q = apply_rope(self.q_norm(q), cos, sin)
        if self.shared:
            view = shared_view
        else:
            k = qkv[:, self.q_dim : self.q_dim + self.kv_dim].view(T, self.n_kv, self.head_dim).transpose(0, 1)
            v = k if self.k_eq_v else qkv[:, self.q_dim + self.kv_dim :].view(T, self.n_kv, self.head_dim).transpose(0, 1)
            k = apply_rope(self.k_norm(k), cos, sin)
            view = cache.update(cache_layer, k, self.v_norm(v))
        attn = self.o_proj(attend(q, view, 1.0))
        if self.o_bias is not None:
            attn = attn + self.o_bias
        x = x + self.post_attention_layernorm(attn)

        h = self.down_proj(geglu(self.gate_up_proj(self.pre_feedforward_layernorm(x)), self.act))
        if self.moe:
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(self._moe(x))
        x = x + self.post_feedforward_layernorm(h)

        if self.ple_dim:
            g = self.act(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar, view

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse expert FFN on the block's residual stream x [T, H]; routes each token to its top-k experts."""
        r = rms_norm(x, None, self.eps) * self.router_scale * self.router_root
        probs = torch.softmax(self.router_proj(r), dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.per_expert_scale[idx]

        h = self.pre_feedforward_layernorm_2(x)
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # (token, k) pairs grouped by expert
        tokens = order // self.top_k
        w = weights.flatten()[order]
        counts = torch.bincount(flat, minlength=self.experts_gate_up.shape[0]).tolist()
        out = torch.zeros_like(h)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = tokens[start : start + n]
            gate, up = F.linear(h[tok], self.experts_gate_up[e]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.experts_down[e]) * w[start : start + n, None]
            out.index_add_(0, tok, y.to(out.dtype))
            start += n
        return out


class Gemma4Model(nn.Module):
    """Decoder + tied LM head. forward() returns the final-normed hidden states; logits() projects them."""

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(Gemma4Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.ple_dim = cfg.hidden_size_per_layer_input
        if self.ple_dim:
            L = cfg.num_hidden_layers
            self.embed_tokens_per_layer = nn.Parameter(
                torch.empty(cfg.vocab_size_per_layer_input, L * self.ple_dim), requires_grad=False
            )
            self.per_layer_model_projection = Linear(cfg.hidden_size, L * self.ple_dim)
            self.per_layer_projection_norm = RMSNorm(self.ple_dim, cfg.rms_norm_eps)
        for t in (SLIDING, FULL):
            inv = gemma4_inv_freq(cfg.rope_parameters[t], cfg.layer_head_dim(t))
            self.register_buffer(f"inv_freq_{'local' if t == SLIDING else 'full'}", inv, persistent=False)
        # Shared layers come last, so owning layer i has cache layer i.
        self.cache_layers = [None if layer.shared else i for i, layer in enumerate(self.layers)]

    # ---- cache -------------------------------------------------------------------------------
    def cache_specs(self) -> list[CacheLayerSpec]:
        """One entry per K/V-owning layer (KV-shared layers have none), with that layer's heads and head dims."""
        c = self.config
        return [
            CacheLayerSpec(
                c.layer_kv_heads(t), c.layer_head_dim(t), c.layer_head_dim(t), c.sliding_window if t == SLIDING else None
            )
            for t in c.layer_types[: c.first_kv_shared_layer]
        ]

    def new_cache(self, capacity: int, spec_margin: int = 64) -> KVCache:
        return KVCache(self.cache_specs(), capacity, self.dtype, self.embed_tokens.device, spec_margin)

    def kv_layer_for(self, layer_type: str) -> int:
        """Cache layer index of the last K/V-owning layer of `layer_type` (the reference's "store" layer)."""
        types = self.config.layer_types[: self.config.first_kv_shared_layer]
        if layer_type not in types:
            raise ValueError(f"no cache layer of type '{layer_type}'")
        return len(types) - 1 - types[::-1].index(layer_type)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    # ---- forward -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[input_ids] * embed_scale(self.config.hidden_size, self.dtype)

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """PLE inputs [T, layers, ple_dim]: (norm(projected main embedding) + token's own embedding) / sqrt(2)."""
        T, L = input_ids.shape[0], self.config.num_hidden_layers
        tok = self.embed_tokens_per_layer[input_ids] * embed_scale(self.ple_dim, self.dtype)
        proj = self.per_layer_model_projection(x) * self.config.hidden_size**-0.5
        proj = self.per_layer_projection_norm(proj.view(T, L, self.ple_dim))
        return (proj + tok.view(T, L, self.ple_dim)) * 2.0**-0.5

    def forward(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run tokens [T] at the cache's next positions; returns final-normed hidden states [T, hidden]."""
        positions = cache.begin(input_ids.shape[0])
        rope = {
            SLIDING: rope_cos_sin(positions, self.inv_freq_local, self.dtype),
            FULL: rope_cos_sin(positions, self.inv_freq_full, self.dtype),
        }
        x = self.embed(input_ids)
        per_layer = self.per_layer_inputs(input_ids, x) if self.ple_dim else None
        views: dict[str, AttentionView] = {}  # last owning layer's view per type, read by KV-shared layers
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.layer_type]
            x, view = layer(
                x, cos, sin, cache, self.cache_layers[i], views.get(layer.layer_type),
                per_layer[:, i] if per_layer is not None else None,
            )
            views[layer.layer_type] = view
        cache.end()
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.lm_head, hidden, self.config.final_logit_softcapping)

    # ---- weights -----------------------------------------------------------------------------
    def load_hf_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load HF-named tensors (Gemma4ForCausalLM naming); fuses projections, keeps norm weights float32."""
        get = TensorGetter(tensors)
        self.embed_tokens.data = get("model.embed_tokens.weight")
        tie_lm_head(self, get)
        self.norm.weight.data = get("model.norm.weight").float()
        if self.ple_dim:
            self.embed_tokens_per_layer.data = get("model.embed_tokens_per_layer.weight")
            self.per_layer_model_projection.weight.data = get("model.per_layer_model_projection.weight")
            self.per_layer_projection_norm.weight.data = get("model.per_layer_projection_norm.weight").float()
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            names = ["q"] if layer.shared else ["q", "k"] if layer.k_eq_v else ["q", "k", "v"]
            layer.qkv_proj.weight.data = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in names], dim=0)
            layer.o_proj.weight.data = get(p + "self_attn.o_proj.weight")
            if layer.qkv_bias is not None:
                layer.qkv_bias.data = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in names], dim=0)
                layer.o_bias.data = get(p + "self_attn.o_proj.bias")
            if layer.shared:  # checkpoints may still carry the unused K/V weights of shared layers
                for name in list(tensors):
                    if name.startswith(tuple(p + f"self_attn.{n}." for n in ("k_proj", "v_proj", "k_norm", "v_norm"))):
                        get(name)
            layer.gate_up_proj.weight.data = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
            layer.down_proj.weight.data = get(p + "mlp.down_proj.weight")
            norms = ["q_norm"] if layer.shared else ["q_norm", "k_norm"]
            for norm in norms:
                getattr(layer, norm).weight.data = get(p + f"self_attn.{norm}.weight").float()
            norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
            if layer.ple_dim:
                layer.per_layer_input_gate.weight.data = get(p + "per_layer_input_gate.weight")
                layer.per_layer_projection.weight.data = get(p + "per_layer_projection.weight")
                norms.append("post_per_layer_input_norm")
            if layer.moe:
                layer.router_proj.weight.data = get(p + "router.proj.weight")
                layer.router_scale.data = get(p + "router.scale")
                layer.per_expert_scale.data = get(p + "router.per_expert_scale")
                layer.experts_gate_up.data = get(p + "experts.gate_up_proj")
                layer.experts_down.data = get(p + "experts.down_proj")
                norms += ["pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"]
            for norm in norms:
                getattr(layer, norm).weight.data = get(p + f"{norm}.weight").float()
            if get.has(p + "layer_scalar"):
                layer.layer_scalar.data = get(p + "layer_scalar").to(self.dtype)
            else:
                layer.layer_scalar.data = torch.ones(1, dtype=self.dtype, device=self.embed_tokens.device)
        get.check_all_used()
