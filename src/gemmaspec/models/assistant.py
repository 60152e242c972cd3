"""Gemma 4 MTP assistant (model_type `gemma4_assistant` / `gemma4_unified_assistant`): a drafter with no KV cache.

Matches transformers' Gemma4AssistantForCausalLM (the oracle in tests/test_mtp.py):
- input: concat(the target's scaled input embedding of the last seen token, a backbone-sized hidden state) ->
  `pre_projection`; the hidden state is the target's final-normed one (transformers passes
  `hidden_states[-1]`, which is the normed `last_hidden_state`) for the first step of a round, then the
  assistant's own `post_projection` output for the following steps;
- Gemma 4 decoder blocks whose attention projects queries only (q_norm + RoPE, scaling 1.0) and attends the
  target's cached K/V: one target layer per attention kind, by default the last cache-owning sliding layer and
  the last full layer (the reference's "store" layers);
- masks (the reference's flipped bidirectional masks, for a query at the position of the last seen token P,
  keys at positions < P): full layers see every cached position, sliding layers the last `sliding_window + 1`;
- every draft step of a round runs at the same position P (the last seen token's, = the target cache length);
- final norm -> logits through the tied embedding (no softcapping), or through the centroid head
  (`use_ordered_embeddings`): the top `centroid_intermediate_top_k` of `num_centroids` clusters of
  `token_ordering` are scored, every other token gets the reference's fill value (min - 1);
- `post_projection` of the normed hidden state feeds the next draft step.

Beyond the reference (gemmaspec fields in config.json, all optional):
- `target_kv_layers`: {"sliding_attention": i, "full_attention": j}, the target layers read (Gemma 3 targets too);
- `tie_target_embeddings`: the LM head is the target's embedding table (hidden_size == the target's), not stored;
- `gemmaspec_target`: which target the drafter was trained for (used to find shipped drafters).

Activations are [N, hidden] for N query positions; `forward` runs under autograd for training on a batch of
positions (each with its own mask row), and `draft_views` builds the views from a live KVCache without copies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import AttentionView, KVCache
from ..errors import ModelFileError
from .gemma3 import Gemma3Config
from .gemma4 import _ACTIVATIONS, FULL, SLIDING, Gemma4Config, gemma4_inv_freq
from .layers import Linear, RMSNorm, TensorGetter, apply_rope, fused_attention, geglu, rope_cos_sin

ASSISTANT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")
_TEXT_TYPES = {"gemma4_assistant": "gemma4_text", "gemma4_unified_assistant": "gemma4_unified_text"}


# ---- config ------------------------------------------------------------------------------------------
@dataclass
class AssistantConfig:
    text: Gemma4Config  # the decoder stack (every layer KV-shared: it owns no K/V)
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    target_kv_layers: dict[str, int] | None = None  # None: the last cache layer of each kind
    tie_target_embeddings: bool = False
    gemmaspec_target: str | None = None
    model_type: str = "gemma4_assistant"
    extra: dict = field(default_factory=dict)  # other gemmaspec_* fields, kept for saving

    def __post_init__(self):
        t = self.text
        if self.model_type not in ASSISTANT_TYPES:
            raise ModelFileError(f"not an MTP assistant config (model_type '{self.model_type}')")
        if self.use_ordered_embeddings:
            if self.num_centroids <= 0 or t.vocab_size % self.num_centroids:
                raise ModelFileError(
                    f"vocab_size {t.vocab_size} is not a multiple of num_centroids {self.num_centroids}"
                )
            if not 0 < self.centroid_intermediate_top_k <= self.num_centroids:
                raise ModelFileError(f"centroid_intermediate_top_k {self.centroid_intermediate_top_k} out of range")
        if self.target_kv_layers is not None:
            unknown = set(self.target_kv_layers) - {SLIDING, FULL}
            if unknown:
                raise ModelFileError(f"target_kv_layers names unknown layer kinds {sorted(unknown)}")
            missing = set(t.layer_types) - set(self.target_kv_layers)
            if missing:
                raise ModelFileError(f"target_kv_layers does not say which target layer {sorted(missing)} layers read")

    @property
    def layer_kinds(self) -> list[str]:
        """Attention kinds the assistant's layers use, in first-use order."""
        return list(dict.fromkeys(self.text.layer_types))

    @property
    def vocab_per_centroid(self) -> int:
        return self.text.vocab_size // self.num_centroids

    @classmethod
    def from_hf(cls, d: dict) -> "AssistantConfig":
        """Parse an assistant config.json (HF `gemma4_assistant` / `gemma4_unified_assistant`, or ours)."""
        model_type = d.get("model_type")
        if model_type not in ASSISTANT_TYPES:
            raise ModelFileError(
                f"not an MTP assistant: model_type '{model_type}' (expected {' or '.join(ASSISTANT_TYPES)})"
            )
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ModelFileError("assistant config.json has no text_config")
        text = dict(text)
        for key, default in (("vocab_size", 262_144), ("hidden_size", 2304), ("intermediate_size", 9216),
                             ("num_hidden_layers", 30), ("num_attention_heads", 8)):
            text.setdefault(key, default)  # the reference's defaults
        for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
            if text.get(key):  # the reference rejects these too (validate_architecture)
                raise ModelFileError(f"assistant text_config: {key} must be 0, got {text[key]}")
        for key in ("enable_moe_block", "use_double_wide_mlp"):
            if text.get(key):
                raise ModelFileError(f"assistant text_config: {key} is not supported in an assistant")
        if text.get("use_bidirectional_attention") == "all":
            raise ModelFileError("assistant text_config with use_bidirectional_attention='all' is not supported")
        shared = text.get("num_kv_shared_layers") or text.get("num_hidden_layers")
        if shared != text.get("num_hidden_layers"):
            raise ModelFileError(
                f"every layer of an assistant must be KV-shared: num_kv_shared_layers {shared} of "
                f"{text.get('num_hidden_layers')}"
            )
        if model_type == "gemma4_unified_assistant":  # gemma4_unified_text defaults differ from gemma4_text
            text.setdefault("sliding_window", 1024)
            text.setdefault("max_position_embeddings", 262_144)
        text.update(num_kv_shared_layers=0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                    enable_moe_block=False, use_double_wide_mlp=False)
        try:
            text_cfg = Gemma4Config.from_hf(text)
        except KeyError as e:
            raise ModelFileError(f"assistant text_config lacks {e}") from None
        kv_layers = d.get("target_kv_layers")
        if kv_layers is not None:
            if not isinstance(kv_layers, dict) or not all(isinstance(v, int) for v in kv_layers.values()):
                raise ModelFileError("target_kv_layers must map layer kinds to target layer indices")
            kv_layers = dict(kv_layers)
        return cls(
            text=text_cfg,
            backbone_hidden_size=d.get("backbone_hidden_size", 1536),
            use_ordered_embeddings=bool(d.get("use_ordered_embeddings", False)),
            num_centroids=d.get("num_centroids", 2048),
            centroid_intermediate_top_k=d.get("centroid_intermediate_top_k", 32),
            target_kv_layers=kv_layers,
            tie_target_embeddings=bool(d.get("tie_target_embeddings", False)),
            gemmaspec_target=d.get("gemmaspec_target"),
            model_type=model_type,
            extra={k: v for k, v in d.items() if k.startswith("gemmaspec_") and k != "gemmaspec_target"},
        )

    def to_hf(self) -> dict:
        """config.json contents that both transformers (Gemma4AssistantConfig) and `from_hf` read."""
        t = self.text
        text = dict(
            model_type="gemma4_text",
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            head_dim=t.head_dim,
            global_head_dim=t.global_head_dim,
            num_global_key_value_heads=t.num_global_key_value_heads if t.attention_k_eq_v else None,
            attention_k_eq_v=t.attention_k_eq_v,
            hidden_activation=t.hidden_activation,
            rms_norm_eps=t.rms_norm_eps,
            sliding_window=t.sliding_window,
            layer_types=list(t.layer_types),
            rope_parameters={k: dict(v) for k, v in t.rope_parameters.items()},
            attention_bias=t.attention_bias,
            num_kv_shared_layers=t.num_hidden_layers,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=0,
            enable_moe_block=False,
            use_double_wide_mlp=False,
            max_position_embeddings=t.max_position_embeddings,
            bos_token_id=t.bos_token_id,
            eos_token_id=t.eos_token_ids[0] if len(t.eos_token_ids) == 1 else list(t.eos_token_ids),
            pad_token_id=t.pad_token_id,
            tie_word_embeddings=True,
        )
        out = dict(
            model_type="gemma4_assistant",
            architectures=["Gemma4AssistantForCausalLM"],
            text_config=text,
            backbone_hidden_size=self.backbone_hidden_size,
            use_ordered_embeddings=self.use_ordered_embeddings,
            num_centroids=self.num_centroids,
            centroid_intermediate_top_k=self.centroid_intermediate_top_k,
            tie_word_embeddings=True,
        )
        if self.target_kv_layers is not None:
            out["target_kv_layers"] = dict(self.target_kv_layers)
        if self.tie_target_embeddings:
            out["tie_target_embeddings"] = True
        if self.gemmaspec_target is not None:
            out["gemmaspec_target"] = self.gemmaspec_target
        out.update(self.extra)
        return out


# ---- pairing with a target -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetLayer:
    """One cache-owning layer of a target: what an assistant reading it must match."""

    index: int  # target layer index (= its cache layer index)
    kind: str
    n_kv_heads: int
    head_dim: int
    window: int | None


def target_text_config(target) -> Gemma3Config | Gemma4Config:
    """The text config of a target given as LoadedModel, model, config dataclass or HF config dict."""
    target = getattr(target, "model", target)  # LoadedModel -> model
    if isinstance(target, nn.Module):
        return target.config
    if isinstance(target, (Gemma3Config, Gemma4Config)):
        return target
    if isinstance(target, dict):
        from . import ARCHITECTURES, MULTIMODAL_TEXT_TYPES

        d = target
        if d.get("model_type") in MULTIMODAL_TEXT_TYPES and isinstance(d.get("text_config"), dict):
            d = {"model_type": MULTIMODAL_TEXT_TYPES[d["model_type"]], **d["text_config"]}
        if d.get("model_type") not in ARCHITECTURES:
            raise ModelFileError(f"the target's architecture '{d.get('model_type')}' cannot host an MTP assistant")
        try:
            return ARCHITECTURES[d["model_type"]][0].from_hf(d)
        except KeyError as e:
            raise ModelFileError(f"the target's config lacks {e}") from None
    raise TypeError(f"cannot read a target config from {type(target).__name__}")


def target_cache_layers(tcfg: Gemma3Config | Gemma4Config) -> list[TargetLayer]:
    """Cache-owning layers of a Gemma 3 / Gemma 4 target, in cache order."""
    if isinstance(tcfg, Gemma4Config):
        kinds = tcfg.layer_types[: tcfg.first_kv_shared_layer]
        return [TargetLayer(i, k, tcfg.layer_kv_heads(k), tcfg.layer_head_dim(k),
                            tcfg.sliding_window if k == SLIDING else None) for i, k in enumerate(kinds)]
    return [TargetLayer(i, FULL if k == FULL else SLIDING, tcfg.num_key_value_heads, tcfg.head_dim,
                        None if k == FULL else tcfg.sliding_window)
            for i, k in enumerate(tcfg.layer_types)]


def resolve_kv_layers(acfg: AssistantConfig, tcfg) -> tuple[dict[str, TargetLayer], list[str]]:
    """Which target layer each assistant attention kind reads, and the pairing problems (empty: it fits)."""
    layers = target_cache_layers(tcfg)
    chosen: dict[str, TargetLayer] = {}
    problems: list[str] = []
    for kind in acfg.layer_kinds:
        if acfg.target_kv_layers is not None:
            i = acfg.target_kv_layers[kind]
            if not 0 <= i < len(layers):
                problems.append(f"target_kv_layers[{kind}] = {i}, but the target has {len(layers)} cache layers")
                continue
            layer = layers[i]
        else:
            same = [layer for layer in layers if layer.kind == kind]
            if not same:
                problems.append(f"its {kind} layers read a {kind} layer the target does not have")
                continue
            layer = same[-1]
        t = acfg.text
        want = (t.layer_head_dim(kind), t.layer_kv_heads(kind))
        if (layer.head_dim, layer.n_kv_heads) != want:
            problems.append(f"its {kind} layers need head_dim {want[0]} x {want[1]} KV heads, target layer "
                            f"{layer.index} stores head_dim {layer.head_dim} x {layer.n_kv_heads}")
        if layer.window is not None and kind == FULL:
            problems.append(f"its full-attention layers would read target layer {layer.index}, a sliding-window layer")
        # A sliding window wider than the target layer's is no error: the drafter then sees the keys the target
        # keeps (its window plus the rollback margin), fewer than the reference would; drafts stay lossless.
        chosen[kind] = layer
    return chosen, problems


def pairing_problems(acfg: AssistantConfig, target) -> list[str]:
    """Every reason the assistant cannot draft for this target (empty: it fits)."""
    tcfg = target_text_config(target)
    problems = []
    if acfg.text.vocab_size != tcfg.vocab_size:
        problems.append(f"vocab_size {acfg.text.vocab_size} vs the target's {tcfg.vocab_size}")
    if acfg.backbone_hidden_size != tcfg.hidden_size:
        problems.append(f"backbone_hidden_size {acfg.backbone_hidden_size} vs the target's hidden_size {tcfg.hidden_size}")
    if acfg.tie_target_embeddings and acfg.text.hidden_size != tcfg.hidden_size:
        problems.append(f"tie_target_embeddings needs hidden_size {acfg.text.hidden_size} = the target's {tcfg.hidden_size}")
    problems += resolve_kv_layers(acfg, tcfg)[1]
    return problems


# ---- the model -----------------------------------------------------------------------------------------
def cross_attend(q: torch.Tensor, view: AttentionView) -> torch.Tensor:
    """Attention of q [Hq, N, D] over shared keys/values [n_kv, S, D] (mask [N or 1, S] or None) -> [N, Hq * Dv].

    Grouped-query heads are folded into the query rows, so the cache tensors are read in place (no K/V expansion)."""
    n_q, N, D = q.shape
    n_kv = view.keys.shape[0]
    mask = view.mask
    if mask is not None and mask.shape[0] == 1 and N > 1:
        mask = mask.expand(N, -1).contiguous()
    out = fused_attention(q, view.keys, view.values, mask, 1.0)  # a draft step: one query, no copies
    if out is not None:
        return out
    g = n_q // n_kv
    qg = q.reshape(n_kv, g * N, D)
    if mask is not None and N > 1 and g > 1:
        mask = mask.repeat(g, 1)
    # 4-D inputs reach PyTorch's fused CPU kernel (3-D ones fall back to the unfused math path). The target's cache
    # may be bfloat16 under a float32 assistant.
    keys, values = view.keys.to(q.dtype), view.values.to(q.dtype)
    out = F.scaled_dot_product_attention(qg[None], keys[None], values[None], attn_mask=mask, scale=1.0)[0]
    return out.reshape(n_q, N, -1).transpose(0, 1).reshape(N, -1)


def _rows(table, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of an LM-head table (a tensor, or a quantized table with row lookup) as a float tensor."""
    return table.index_select(0, ids) if isinstance(table, torch.Tensor) else table[ids]


def _row_scores(table, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [N, H] . rows `ids` of the table -> [N, len(ids)]. A quantized table (the target's, when tied) is
    scored through its own matmul on just the gathered packed rows instead of dequantizing them."""
    if isinstance(table, torch.Tensor):  # the target's table may be bfloat16 under a float32 assistant
        return F.linear(hidden, table.index_select(0, ids).to(hidden.dtype))
    try:
        sub = type(table)(table.bits, table.q.index_select(0, ids), table.scales.index_select(0, ids),
                          None if table.bias is None else table.bias.index_select(0, ids), table.group,
                          table.in_features, table.compute_dtype, blocked=table.blocked)
        return sub.linear(hidden)
    except (AttributeError, TypeError, ValueError):  # another table format: dequantize the rows
        return F.linear(hidden, table[ids].to(hidden.dtype))


class AssistantBlock(nn.Module):
    """A Gemma 4 block that owns no K/V: queries attend the target's K/V of this block's attention kind."""

    def __init__(self, cfg: Gemma4Config, kind: str):
        super().__init__()
        self.kind = kind
        self.act = _ACTIVATIONS[cfg.hidden_activation]
        H = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.layer_head_dim(kind)
        self.q_proj = Linear(H, self.n_heads * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, H)
        self.q_bias = self.o_bias = None
        if cfg.attention_bias:
            self.q_bias = nn.Parameter(torch.zeros(self.n_heads * self.head_dim), requires_grad=False)
            self.o_bias = nn.Parameter(torch.zeros(H), requires_grad=False)
        self.gate_up_proj = Linear(H, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, H)
        eps = cfg.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, view: AttentionView) -> torch.Tensor:
        N = x.shape[0]
        q = self.q_proj(self.input_layernorm(x))
        if self.q_bias is not None:
            q = q + self.q_bias
        q = apply_rope(self.q_norm(q.view(N, self.n_heads, self.head_dim).transpose(0, 1)), cos, sin)
        attn = self.o_proj(cross_attend(q, view))
        if self.o_bias is not None:
            attn = attn + self.o_bias
        x = self.post_attention_layernorm(attn, residual=x)
        h = geglu(self.gate_up_proj(self.pre_feedforward_layernorm(x)), self.act)
        x = self.post_feedforward_layernorm(self.down_proj(h), residual=x)
        return x * self.layer_scalar


class AssistantModel(nn.Module):
    """forward() -> final-normed hidden [N, H]; project() -> next step's input state; logits()/candidates() -> scores."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.config = cfg
        t = cfg.text
        H, B = t.hidden_size, cfg.backbone_hidden_size
        self.pre_projection = Linear(2 * B, H)
        self.post_projection = Linear(H, B)
        self.layers = nn.ModuleList(AssistantBlock(t, kind) for kind in t.layer_types)
        self.norm = RMSNorm(H, t.rms_norm_eps)
        # The tied embedding, used only as the LM head (inputs come from the target's embedding). A drafter
        # trained here may keep a trimmed vocabulary (`gemmaspec_vocab_size` rows; `vocab_map` holds their token
        # ids): a draft step then reads only those rows, and it never proposes the tokens left out.
        kept = int(cfg.extra.get("gemmaspec_vocab_size", 0) or 0)
        self.register_buffer("vocab_map", torch.arange(kept) if kept else None)
        self.lm_head = nn.Parameter(torch.empty(kept or t.vocab_size, H), requires_grad=False)
        self.centroids = None
        if cfg.use_ordered_embeddings:
            self.centroids = Linear(H, cfg.num_centroids)
            self.register_buffer("token_ordering", torch.arange(t.vocab_size))
        for kind in cfg.layer_kinds:
            inv = gemma4_inv_freq(t.rope_parameters[kind], t.layer_head_dim(kind))
            self.register_buffer(f"inv_freq_{'local' if kind == SLIDING else 'full'}", inv, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (that of the float weights, or of low-bit weights' outputs)."""
        packed = getattr(self.pre_projection, "qweight", None)
        return packed.dtype if packed is not None else self.pre_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    # ---- attention inputs ------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin per attention kind for query positions [N]."""
        return {
            kind: rope_cos_sin(positions, getattr(self, f"inv_freq_{'local' if kind == SLIDING else 'full'}"), self.dtype)
            for kind in self.config.layer_kinds
        }

    def masks(self, query_pos: torch.Tensor, key_pos: torch.Tensor, kind: str) -> torch.Tensor:
        """Boolean mask [N, S]: a query at position p sees keys at positions < p (the target has not cached p yet);
        sliding layers only the last `sliding_window + 1` of them, as the reference's flipped window does.
        key_pos -1 marks empty slots."""
        q, k = query_pos[:, None], key_pos[None, :]
        mask = (k >= 0) & (k < q)
        if kind == SLIDING:
            mask &= k >= q - 1 - self.config.text.sliding_window
        return mask

    def draft_views(self, cache: KVCache, kv_layers: dict[str, int], position: int) -> dict[str, AttentionView]:
        """Views of the target's cache for one drafting round at `position` (= cache.length): the buffers are read in
        place; only a mask over a sliding layer's ring slots is built (full layers need none)."""
        views = {}
        for kind in self.config.layer_kinds:
            layer = kv_layers[kind]
            window = cache.specs[layer].window
            if window is None:
                keys, values = cache.keys[layer][:, :position], cache.values[layer][:, :position]
                mask = None
                if kind == SLIDING and position > self.config.text.sliding_window + 1:
                    keep = self.config.text.sliding_window + 1  # contiguous positions: slice, no mask
                    keys, values = keys[:, position - keep :], values[:, position - keep :]
            else:
                keys, values, slot_pos = cache.layer_kv(layer)
                mask = self.masks(torch.tensor([position], device=slot_pos.device), slot_pos, kind)
            views[kind] = AttentionView(keys, values, mask)
        return views

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, rope: dict, views: dict[str, AttentionView]) -> torch.Tensor:
        """inputs [N, 2 * backbone] = concat(target embedding of the last seen token, hidden state) -> normed [N, H]."""
        x = self.pre_projection(inputs)
        for layer in self.layers:
            cos, sin = rope[layer.kind]
            x = layer(x, cos, sin, views[layer.kind])
        return self.norm(x)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden state [N, backbone] fed to the next draft step."""
        return self.post_projection(hidden)

    def candidates(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(token ids [N, M], their logits [N, M]) the head scores: with the centroid head, the tokens of the top
        clusters (M = top_k * vocab / num_centroids); without it, every token (ids None, M = vocab)."""
        if self.vocab_map is not None:
            return self.vocab_map.expand(hidden.shape[0], -1), self.vocab_logits(hidden).float()
        if self.centroids is None:
            head = self.lm_head
            return None, (F.linear(hidden, head.to(hidden.dtype)) if isinstance(head, torch.Tensor)
                          else head.linear(hidden)).float()
        cfg = self.config
        top = torch.topk(self.centroids(hidden), cfg.centroid_intermediate_top_k, dim=-1).indices  # [N, K]
        clusters = self.token_ordering.view(cfg.num_centroids, cfg.vocab_per_centroid)
        ids = clusters[top].reshape(hidden.shape[0], -1)  # [N, K * per_cluster]
        if hidden.shape[0] == 1:  # drafting: one matmul over the selected rows
            return ids, _row_scores(self.lm_head, ids[0], hidden).float()
        rows = _rows(self.lm_head, ids.reshape(-1)).view(*ids.shape, -1).to(hidden.dtype)  # only these rows are read
        logits = (hidden.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)
        return ids, logits.float()

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of the trimmed vocabulary's rows [N, gemmaspec_vocab_size] (trainable: used by train-drafter)."""
        head = self.lm_head
        return F.linear(hidden, head.to(hidden.dtype)) if isinstance(head, torch.Tensor) else head.linear(hidden)

    def init_trainable(self, vocab: torch.Tensor, target_model=None, std: float = 0.02) -> None:
        """Random initial weights for training a trimmed-vocabulary drafter; every weight becomes trainable."""
        if self.vocab_map is None or len(vocab) != len(self.vocab_map):
            raise ValueError("init_trainable needs a config with gemmaspec_vocab_size == len(vocab)")
        self.vocab_map = vocab.to(torch.long).clone()
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, Linear):
                    module.weight.data = torch.randn(module.out_features, module.in_features) * std
                elif isinstance(module, RMSNorm) and module.weight is not None:
                    module.weight.data = torch.ones_like(module.weight)
            self.lm_head.data = torch.randn(len(vocab), self.lm_head.shape[1]) * std
            if target_model is not None and self.lm_head.shape[1] == target_model.embed_tokens.shape[1]:
                self.lm_head.data = target_model.embed_tokens.detach().float().index_select(0, self.vocab_map).clone()
        for p in self.parameters():
            p.requires_grad_(True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [N, vocab] as the reference returns them (tokens outside the selected clusters get
        the minimum selected logit - 1 over the whole batch)."""
        ids, logits = self.candidates(hidden)
        if ids is None:
            return logits
        out = torch.full((hidden.shape[0], self.config.text.vocab_size), logits.min().item() - 1.0,
                         dtype=logits.dtype, device=logits.device)
        return out.scatter(-1, ids, logits)

    # ---- weights ----------------------------------------------------------------------------------------
    def tie_to(self, target_embeddings) -> None:
        """Use the target's embedding table (a tensor, or a quantized table that supports row lookup and `.linear`)
        as the LM head (`tie_target_embeddings`). It stays the target's: not a parameter or buffer of this module,
        so it is neither saved, converted by `.to()`, nor trained with the assistant."""
        if tuple(target_embeddings.shape) != tuple(self.lm_head.shape):
            raise ModelFileError(f"cannot tie the assistant's head {tuple(self.lm_head.shape)} to the target's "
                                 f"embeddings {tuple(target_embeddings.shape)}")
        self._parameters.pop("lm_head", None)
        self.__dict__["lm_head"] = target_embeddings

    def load_hf_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load HF-named tensors (Gemma4AssistantForCausalLM naming); fuses gate/up, keeps norms float32."""
        get = TensorGetter(tensors)
        cfg = self.config
        if not cfg.tie_target_embeddings:
            head = "lm_head.weight" if get.has("lm_head.weight") else "model.embed_tokens.weight"
            self.lm_head.data = get(head)
        for name in ("lm_head.weight", "model.embed_tokens.weight"):
            if get.has(name):
                get(name)
        self.pre_projection.weight.data = get("pre_projection.weight")
        self.post_projection.weight.data = get("post_projection.weight")
        self.norm.weight.data = get("model.norm.weight").float()
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.q_proj.weight.data = get(p + "self_attn.q_proj.weight")
            layer.o_proj.weight.data = get(p + "self_attn.o_proj.weight")
            if layer.q_bias is not None:
                layer.q_bias.data = get(p + "self_attn.q_proj.bias")
                layer.o_bias.data = get(p + "self_attn.o_proj.bias")
            for name in list(tensors):  # unused K/V weights some checkpoints carry for shared layers
                if name.startswith(tuple(p + f"self_attn.{n}." for n in ("k_proj", "v_proj", "k_norm", "v_norm"))):
                    get(name)
            layer.gate_up_proj.weight.data = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
            layer.down_proj.weight.data = get(p + "mlp.down_proj.weight")
            layer.q_norm.weight.data = get(p + "self_attn.q_norm.weight").float()
            for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm"):
                getattr(layer, norm).weight.data = get(p + f"{norm}.weight").float()
            if get.has(p + "layer_scalar"):
                layer.layer_scalar = get(p + "layer_scalar").to(self.dtype).reshape(1)
            else:
                layer.layer_scalar = torch.ones(1, dtype=self.dtype, device=self.device)
        if self.vocab_map is not None:
            vocab_map = get("gemmaspec.vocab_map").round().long()
            if vocab_map.shape != self.vocab_map.shape or vocab_map.min() < 0 or vocab_map.max() >= cfg.text.vocab_size:
                raise ModelFileError("gemmaspec.vocab_map does not fit the config's gemmaspec_vocab_size / vocab_size")
            self.vocab_map = vocab_map
        if self.centroids is not None:
            self.centroids.weight.data = get("masked_embedding.centroids.weight")
            ordering = get("masked_embedding.token_ordering").round().long()  # 1-D tensors may arrive as float
            V = cfg.text.vocab_size
            if ordering.shape != (V,) or not torch.equal(torch.sort(ordering).values, torch.arange(V)):
                raise ModelFileError("masked_embedding.token_ordering is not a permutation of the vocabulary")
            self.token_ordering = ordering
        get.check_all_used()

    def hf_state(self) -> dict[str, torch.Tensor]:
        """Tensors under HF names (the inverse of load_hf_state), for saving."""
        out = {}
        if not self.config.tie_target_embeddings:
            out["model.embed_tokens.weight"] = self.lm_head.data
        out["pre_projection.weight"] = self.pre_projection.weight.data
        out["post_projection.weight"] = self.post_projection.weight.data
        out["model.norm.weight"] = self.norm.weight.data
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "self_attn.q_proj.weight"] = layer.q_proj.weight.data
            out[p + "self_attn.o_proj.weight"] = layer.o_proj.weight.data
            if layer.q_bias is not None:
                out[p + "self_attn.q_proj.bias"] = layer.q_bias.data
                out[p + "self_attn.o_proj.bias"] = layer.o_bias.data
            gate, up = layer.gate_up_proj.weight.data.chunk(2, dim=0)
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = layer.down_proj.weight.data
            out[p + "self_attn.q_norm.weight"] = layer.q_norm.weight.data
            for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm"):
                out[p + f"{norm}.weight"] = getattr(layer, norm).weight.data
            out[p + "layer_scalar"] = layer.layer_scalar
        if self.vocab_map is not None:
            out["gemmaspec.vocab_map"] = self.vocab_map
        if self.centroids is not None:
            out["masked_embedding.centroids.weight"] = self.centroids.weight.data
            out["masked_embedding.token_ordering"] = self.token_ordering
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}


# ---- files ---------------------------------------------------------------------------------------------
def read_assistant_config(folder: Path) -> AssistantConfig:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise ModelFileError(f"no config.json in {folder} (expected an MTP assistant folder)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"cannot parse {path}: {e}") from e
    return AssistantConfig.from_hf(d)


def load_assistant(folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                   target_embeddings: torch.Tensor | None = None) -> AssistantModel:
    """Load an assistant folder (config.json + *.safetensors); `target_embeddings` for tie_target_embeddings."""
    from ..loading import read_safetensors

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelFileError(f"MTP assistant not found: {folder} is not a folder")
    cfg = read_assistant_config(folder)
    model = AssistantModel(cfg)
    if cfg.tie_target_embeddings:
        if target_embeddings is None:
            raise ModelFileError(f"{folder}: the assistant shares the target's embeddings; load it with its target")
        model.tie_to(target_embeddings)
    model.load_hf_state(read_safetensors(folder, dtype))
    model.to(device)
    return model.eval()


def save_assistant(model: AssistantModel, folder: str | Path) -> Path:
    """Write config.json + model.safetensors in the layout load_assistant (and transformers) read."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.hf_state(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    return folder
