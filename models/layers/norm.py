"""RMSNorm written exactly like Hugging Face Llama, so that numbers match it bit for bit.

There is deliberately no fused ``residual`` argument: decoder layers write
``hidden = hidden + residual`` followed by ``norm(hidden)`` and the compiler's add+RMSNorm
fusion pass finds that pair.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)  # [..., H]
        variance = x.pow(2).mean(-1, keepdim=True)  # [..., 1]
        x = x * torch.rsqrt(variance + self.eps)  # [..., H]
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
