"""Gemma 3 text decoder (model_type `gemma3_text`), lean and cache-aware.

Matches transformers' Gemma3ForCausalLM: interleaved sliding/full attention layers with their own RoPE
bases, q/k RMSNorm, four norms per block, GeGLU MLP, embeddings scaled by sqrt(hidden), tied LM head.
For speed q/k/v and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import kernels
from ..cache import CacheLayerSpec, KVCache
from .layers import (
    Linear,
    RMSNorm,
    RopeTables,
    TensorGetter,
    apply_rope,
    attend,
    embed_scale,
    fused_ops,
    geglu,
    lm_logits,
    rope_inv_freq,
    tie_lm_head,
)


@dataclass
class Gemma3Config:
    vocab_size: int = 262144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling_factor: float = 1.0  # linear scaling of full-attention layers (Gemma 3 1B+ long context)
    query_pre_attn_scalar: float = 256
    final_logit_softcapping: float | None = None
    max_position_embeddings: int = 32768
    bos_token_id: int = 2
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0
    model_type: str = "gemma3_text"

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]

    @classmethod
    def from_hf(cls, d: dict) -> "Gemma3Config":
        rope = d.get("rope_parameters") or {}
        full = rope.get("full_attention", rope if "rope_theta" in rope else {})
        local = rope.get("sliding_attention", {})
        scaling = d.get("rope_scaling") or {}
        factor = 1.0
        if full.get("rope_type") == "linear":
            factor = float(full.get("factor", 1.0))
        elif scaling.get("rope_type", scaling.get("type")) == "linear":
            factor = float(scaling.get("factor", 1.0))
        eos = d.get("eos_token_id", 1)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"],
            head_dim=d.get("head_dim", 256),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            sliding_window=d.get("sliding_window", 4096),
            layer_types=list(d.get("layer_types") or []),
            rope_theta=full.get("rope_theta", d.get("rope_theta", 1_000_000.0)),
            rope_local_base_freq=local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0)),
            rope_scaling_factor=factor,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            bos_token_id=d.get("bos_token_id", 2),
            eos_token_ids=list(eos) if isinstance(eos, list) else [eos],
            pad_token_id=d.get("pad_token_id", 0) or 0,
        )


def _fits_c_block(fast, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> bool:
    """Whether a forward can run in kernels/block.c: the kernels are built (`fast`), x [T, hidden] is a decode or
    verification step, contiguous, and the RoPE tables are float32 [T, head_dim]."""
    return (fast is not None and x.dim() == 2 and x.shape[0] <= kernels.MAX_ROWS and x.is_contiguous()
            and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
            and cos.shape == (x.shape[0], head_dim))


class Gemma3Block(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_type: str):
        super().__init__()
        self.sliding = layer_type == "sliding_attention"
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q_dim + 2 * kv_dim)
        self.o_proj = Linear(q_dim, cfg.hidden_size)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        eps = cfg.rms_norm_eps
        self.q_norm, self.k_norm = RMSNorm(self.head_dim, eps), RMSNorm(self.head_dim, eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.scale = cfg.query_pre_attn_scalar**-0.5

    def forward(self, x, layer_idx: int, cache: KVCache, cos, sin):
        """x [T, hidden] in the model's dtype; cos/sin float32 (the C block's), rounded to x's dtype below."""
        fast = fused_ops(x, (torch.float32, torch.bfloat16))
        if _fits_c_block(fast, x, cos, sin, self.head_dim):
            args, target = self._block_args(fast), cache.block_target(layer_idx)
            if args is not None and target is not None and target[0].dtype == x.dtype:
                return fast.gemma3_block(args, x, cos, sin, *target)  # the path below in one C call
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        T = x.shape[0]
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x))
        fast = fused_ops(qkv)
        fused = fast is not None and qkv.is_contiguous() and cos.is_contiguous() and cos.shape == (T, self.head_dim)
        if fused:  # q/k norm + RoPE in place, one call
            fast.qk_norm_rope(qkv, self.n_heads, self.n_kv, self.head_dim, self.q_norm.weight, self.k_norm.weight,
                              self.q_norm.eps, cos, sin)
        q = qkv[:, :q_dim].view(T, self.n_heads, self.head_dim).transpose(0, 1)
        k = qkv[:, q_dim : q_dim + kv_dim].view(T, self.n_kv, self.head_dim).transpose(0, 1)
        v = qkv[:, q_dim + kv_dim :].view(T, self.n_kv, self.head_dim).transpose(0, 1)
        if not fused:
            q = apply_rope(self.q_norm(q), cos, sin)
            k = apply_rope(self.k_norm(k), cos, sin)
        attn = attend(q, cache.update(layer_idx, k, v), self.scale)
        x = self.post_attention_layernorm(self.o_proj(attn), residual=x)
        h = geglu(self.gate_up_proj(self.pre_feedforward_layernorm(x)))
        return self.post_feedforward_layernorm(self.down_proj(h), residual=x)

    _LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    _NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
              "q_norm", "k_norm")

    def _weights_key(self) -> tuple[list, list]:
        """What the C block's raw pointers depend on, read cheaply (once per block and step): the id of each
        weight's holder (a Parameter, or a packed weight module and its buffers, which `.to()` and format changes
        replace) and every Parameter's data pointer, dtype and shape (`.data =` keeps the Parameter but moves its
        data); and the holders themselves, which the cache keeps alive so that no id is reused while it stands."""
        holders, ptrs = [], []
        mods = self._modules
        for name in self._LINEARS:
            lin = mods[name]
            packed = lin._modules.get("qweight")
            if packed is not None:
                holders += (packed, *packed._buffers.values(), *packed._parameters.values())
                ptrs.append(getattr(packed, "blocked", False))  # a layout that changes in place
            else:
                w = lin._parameters["weight"]
                holders.append(w)
                ptrs += (w.data_ptr(), w.dtype, w.shape)
        for name in self._NORMS:
            w = mods[name]._parameters.get("weight")
            holders.append(w)
            ptrs += (w.data_ptr(), w.dtype, w.shape) if w is not None else (0,)
        return [*map(id, holders), *ptrs], holders

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_block_cache", None)  # tensors move (`.to()`): let the old ones go
        return super()._apply(fn, *args, **kwargs)

    def _block_args(self, fast):
        """The block's weights and norms for kernels/block.c, built once per set of weights (None: a weight
        format or norm layout the kernel does not take)."""
        key, holders = self._weights_key()
        cached = self.__dict__.get("_block_cache")
        if cached is None or cached[0] != key:
            linears = [getattr(self, name) for name in self._LINEARS]
            norms = [getattr(self, name) for name in self._NORMS]
            weights = [fast.weight_args(lin) for lin in linears]
            usable = all(w is not None for w in weights) and all(
                n.weight is not None and n.weight.dtype == torch.float32 and n.weight.is_contiguous()
                and n.eps == self.input_layernorm.eps for n in norms)
            args = kernels.Gemma3BlockArgs(
                *weights, *[n.weight.data_ptr() for n in norms], self.input_layernorm.eps, self.scale,
                self.o_proj.out_features, self.n_heads, self.n_kv, self.head_dim, self.down_proj.in_features,
            ) if usable else None
            cached = self.__dict__["_block_cache"] = (key, args, holders)
        return cached[1]


class Gemma3Model(nn.Module):
    """Decoder + tied LM head. forward() returns the final-normed hidden states; logits() projects them."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(Gemma3Block(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.register_buffer(
            "inv_freq_full",
            rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor),
            persistent=False,
        )
        self.register_buffer(
            "inv_freq_local", rope_inv_freq(cfg.head_dim, cfg.rope_local_base_freq), persistent=False
        )

    # ---- cache -------------------------------------------------------------------------------
    def cache_specs(self) -> list[CacheLayerSpec]:
        c = self.config
        return [
            CacheLayerSpec(c.num_key_value_heads, c.head_dim, c.head_dim, c.sliding_window if t != "full_attention" else None)
            for t in c.layer_types
        ]

    def new_cache(self, capacity: int, spec_margin: int = 64) -> KVCache:
        return KVCache(self.cache_specs(), capacity, self.dtype, self.embed_tokens.device, spec_margin)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    # ---- forward -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, device=self.embed_tokens.device)
        return self.embed_tokens[ids] * embed_scale(self.config.hidden_size, self.dtype)

    def forward(self, input_ids: torch.Tensor | list[int], cache: KVCache) -> torch.Tensor:
        """Run tokens [T] (a tensor or a list of ids) at the cache's next positions; returns final-normed hidden
        states [T, hidden]."""
        return self._forward(input_ids, cache, with_head=False)[0]

    def forward_logits(self, input_ids: torch.Tensor | list[int], cache: KVCache, logits: bool = True,
                       hidden: bool = True):
        """forward() and logits() at once: (hidden [T, hidden], float32 logits [T, vocab], each row's greedy token
        as a list, or None where not computed). A decode or verification step on the CPU computes the LM head and
        its argmax in the C block stack's call, the same kernel and values as logits() and torch.argmax (~0.25 ms
        of Python and a pass over cold logits fewer a step); there logits=False (greedy decoding) returns None for
        the logits and hidden=False (a caller without use for them) None for the hidden states: both then stay in
        buffers of the call."""
        states, head_logits, best = self._forward(input_ids, cache, with_head=True, want_logits=logits,
                                                  want_hidden=hidden)
        if best is None:
            return states, self.logits(states), None
        return states, head_logits, best

    def decode_greedy(self, first_id: int, cache: KVCache, steps: int, stop_ids: set[int] | torch.Tensor,
                      hidden: bool = False) -> list[int] | tuple[list[int], torch.Tensor] | None:
        """Greedy decoding of up to `steps` tokens in one C call (kernels/block.c gs_gemma3_decode): first_id at
        the cache's next position, then each step's argmax, stopping after one in stop_ids (a set, or a sorted
        int64 tensor); returns the tokens the steps chose (the cache holds all the steps), with hidden the last
        step's final hidden state [hidden] too.
        Each step is exactly forward_logits([token], logits=False)'s, without the Python around it (~0.15 ms a
        token with the caches cold). None where that call cannot run (then nothing is computed)."""
        fast = kernels.load()
        start = cache.length
        steps = min(steps, cache.capacity - start, RopeTables.ROWS)
        if fast is None or steps < 1 or torch.is_grad_enabled():
            return None
        cached = self.__dict__.get("_stack_cache")
        if cached is None or cached[0]() is not cache:
            cached = self.__dict__["_stack_cache"] = (self._cache_ref(cache), *self._stack_call(cache))
        call = cached[1]
        if call is None or call.head is None or not call.has_table or call.head.N > call.vocab:
            return None  # (each step's argmax is the next step's id: the head's rows must all have an embedding)
        cache.begin(1, positions=False)
        views = cache.kernel_views(fast)  # (one token's buffers: the call recomputes them for each step)
        if views is None:
            cache.end_decoded(0)
            return None
        local, full = self._rope("local", self.inv_freq_local), self._rope("full", self.inv_freq_full)
        cos_l, sin_l = local.pointers(start, steps)
        cos_f, sin_f = full.pointers(start, steps)
        window = next((spec.window for spec in cache.specs if spec.window is not None), 0)
        try:
            tokens = fast.gemma3_decode(call, first_id, steps, start, cache.slot_pos if views[0] is not None else None,
                                        window, cos_l, sin_l, cos_f, sin_f, local.row_floats(), *views,
                                        stop_ids if isinstance(stop_ids, torch.Tensor) else sorted(stop_ids))
        except IndexError:
            cache.end_decoded(0)
            raise
        cache.end_decoded(len(tokens))
        return (tokens, call.x_out[0].clone()) if hidden else tokens

    def _forward(self, input_ids: torch.Tensor | list[int], cache: KVCache, with_head: bool,
                 want_logits: bool = True, want_hidden: bool = True):
        start, n = cache.length, len(input_ids)
        cache.begin(n, positions=False)
        out = self._stack(input_ids, cache, start, n, with_head, want_logits, want_hidden)  # (with the final norm)
        if out is None:
            cos_f, sin_f = self._rope("full", self.inv_freq_full).get(start, n)
            cos_l, sin_l = self._rope("local", self.inv_freq_local).get(start, n)
            x = self.embed(input_ids)
            for i, layer in enumerate(self.layers):
                x = layer(x, i, cache, cos_l, sin_l) if layer.sliding else layer(x, i, cache, cos_f, sin_f)
            out = self.norm(x), None, None
        cache.end()
        return out

    def _rope(self, kind: str, inv_freq: torch.Tensor) -> RopeTables:
        tables = self.__dict__.setdefault("_rope_tables", {})
        held = tables.get(kind)
        if held is None or held.inv_freq is not inv_freq:  # (a buffer that `.to()` replaced)
            held = tables[kind] = RopeTables(inv_freq, torch.float32)
        return held

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_stack_cache", None)  # tensors move (`.to()`): the next forward rebuilds the arguments
        return super()._apply(fn, *args, **kwargs)

    def _stack(self, input_ids, cache: KVCache, start: int, n: int, with_head: bool, want_logits: bool,
               want_hidden: bool = True):
        """The embeddings, every block and the final norm in one C call (kernels/block.c gs_gemma3_step: each
        block exactly as Gemma3Block.forward's C path, without ~85 us of Python per block) for decode and
        verification steps: (hidden, logits, greedy tokens), the last two None unless with_head and the head can go
        in that call (logits() takes the same kernel: no final soft-capping; logits None unless want_logits,
        hidden None unless want_hidden or the head does not go in the call). None
        where a block cannot take the C path. A step here runs few Python lines: with the caches cold after the
        previous step each costs microseconds."""
        fast = kernels.load()
        if fast is None or not 0 < n <= kernels.MAX_ROWS or torch.is_grad_enabled():
            return None
        cached = self.__dict__.get("_stack_cache")
        if cached is None or cached[0]() is not cache:
            cached = self.__dict__["_stack_cache"] = (self._cache_ref(cache), *self._stack_call(cache))
        call = cached[1]
        if call is None:
            return None
        views = cache.kernel_views(fast)
        if views is None:
            return None
        if call.has_table:
            ids, x = (input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids), None
        else:
            ids, x = None, self.embed(input_ids).contiguous()
        cos_l, sin_l = self._rope("local", self.inv_freq_local).pointers(start, n)
        cos_f, sin_f = self._rope("full", self.inv_freq_full).pointers(start, n)
        return fast.gemma3_stack(call, ids, x, cos_l, sin_l, cos_f, sin_f, *views, with_head, want_logits,
                                 want_hidden or not with_head or call.head is None)

    def _cache_ref(self, cache: KVCache):
        """A weak reference to `cache` whose end drops the model's stack call for it (its buffers with it)."""
        model = weakref.ref(self)

        def release(dead) -> None:
            held = model()
            if held is not None and held.__dict__.get("_stack_cache", (None,))[0] is dead:
                held.__dict__.pop("_stack_cache", None)

        return weakref.ref(cache, release)

    def _stack_call(self, cache: KVCache) -> tuple:
        """(kernels.StackCall for `cache` or None where the C stack cannot run this model, the weights behind its
        pointers). Built and checked once per cache: weights do not change while one is in use (a generation), and
        gathering 18 blocks' arguments each step cost ~0.4 ms of Python."""
        table, head_dim = self.embed_tokens, self.config.head_dim
        fast = fused_ops(table, (torch.float32, torch.bfloat16))
        if fast is None:
            return None, None
        blocks = [layer._block_args(fast) for layer in self.layers]
        sliding = [layer.sliding for layer in self.layers]  # the C loop picks RoPE and cache view by this flag
        norm = self.norm.weight
        usable = (all(b is not None for b in blocks) and sliding == [s.window is not None for s in cache.specs]
                  and cache.keys[0].dtype == self.dtype and cache.keys[0].is_cpu
                  and table.shape[1] == self.config.hidden_size
                  # float32 RoPE rows of head_dim values (RopeTables.pointers)
                  and 2 * self.inv_freq_local.numel() == 2 * self.inv_freq_full.numel() == head_dim
                  # the C stack applies the final norm: a float32 [hidden] scale
                  and norm is not None and norm.dtype == torch.float32 and norm.is_contiguous()
                  and norm.numel() == self.config.hidden_size)
        call = None
        if usable:
            head = fast.weight_args(self.lm_head) if self.config.final_logit_softcapping is None else None
            call = kernels.StackCall(blocks, sliding, cache.keys, cache.values, self.dtype, norm, self.norm.eps, head,
                                     fast.matrix_args(table),  # the embedding lookup in the same call
                                     float(embed_scale(self.config.hidden_size, self.dtype)))
        # the weights behind the pointers, kept alive even if a block's own argument cache is rebuilt
        holders = [layer.__dict__.get("_block_cache") for layer in self.layers]
        holders += [self.lm_head.qweight if self.lm_head.qweight is not None else self.lm_head.weight, table]
        return call, holders

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits(self.lm_head, hidden, self.config.final_logit_softcapping)

    # ---- weights -----------------------------------------------------------------------------
    def load_hf_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load HF-named tensors (Gemma3ForCausalLM naming); fuses projections and folds `1 + w` into norms."""
        get = TensorGetter(tensors)
        self.embed_tokens.data = get("model.embed_tokens.weight")
        tie_lm_head(self, get)
        self.norm.weight.data = 1.0 + get("model.norm.weight").float()
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.qkv_proj.weight.data = torch.cat(
                [get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")], dim=0
            )
            layer.o_proj.weight.data = get(p + "self_attn.o_proj.weight")
            layer.gate_up_proj.weight.data = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
            layer.down_proj.weight.data = get(p + "mlp.down_proj.weight")
            for norm in ("q_norm", "k_norm"):
                getattr(layer, norm).weight.data = 1.0 + get(p + f"self_attn.{norm}.weight").float()
            for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
                getattr(layer, norm).weight.data = 1.0 + get(p + f"{norm}.weight").float()
        get.check_all_used()
