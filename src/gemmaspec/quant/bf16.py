"""bfloat16 weights computed in float32: `--weights bf16` on CPUs without bf16 arithmetic.

Such CPUs (AVX2 only, like the 2-core machine this project is developed on) run bfloat16 matmuls in slow
emulation, so `--dtype auto` computes in float32 there; holding the weights in float32 as well doubles the
memory and the bytes read per token of a bf16 checkpoint. Here they stay bfloat16 and the C kernel widens them
to float32 in registers (exact: a bf16 value is a float32 with the low 16 bits zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

BLOCK_ROWS = 4096  # rows of W widened per GEMM call for large M


class BF16Weight(nn.Module):
    """A [N, K] weight held as bfloat16 with a float32 compute dtype; a Linear weight or an embedding table."""

    format = "bf16"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("w", weight.to(torch.bfloat16).contiguous())
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.w.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def nbytes(self) -> int:
        return self.w.numel() * 2

    def extra_repr(self) -> str:
        return f"bf16, [{self.out_features}, {self.in_features}]"

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: widens only the rows it reads."""
        return self.w[torch.as_tensor(ids, device=self.device)].to(self.compute_dtype)

    def dequantize(self, rows=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.w if rows is None else self.w[rows]
        return w.to(dtype or self.compute_dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ W^T -> [..., N] in x's dtype."""
        if (x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2 and x.shape[0] <= kernels.MAX_ROWS
                and self.w.is_cpu and not (x.requires_grad and torch.is_grad_enabled())):
            k = kernels.load()  # decode / verification: each row on its own whatever M is (PyTorch's GEMM: no)
            if k is not None:
                return k.linear_float(self.w, x.float().contiguous()).to(x.dtype)
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        if x2.dtype == torch.bfloat16:
            return F.linear(x2, self.w).reshape(*lead, self.out_features)
        y = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
        for start in range(0, self.out_features, BLOCK_ROWS):  # bounded temporary memory (a 262k-row LM head)
            y[:, start:start + BLOCK_ROWS] = x2 @ self.w[start:start + BLOCK_ROWS].to(x2.dtype).t()
        return y.reshape(*lead, self.out_features)
