"""Paged attention: metadata, forward context, the ``infer::paged_attention`` op and the layer.

Importing this package registers ``torch.ops.infer.paged_attention``; triton is imported only
when a Triton backend actually runs.
"""
from .context import forward_context, get_forward_context
from .layer import Attention
from .metadata import AttentionMetadata
from .op import BACKEND_ENV_VAR, attention_backend_name, paged_attention, select_backend

__all__ = [
    "Attention",
    "AttentionMetadata",
    "BACKEND_ENV_VAR",
    "attention_backend_name",
    "forward_context",
    "get_forward_context",
    "paged_attention",
    "select_backend",
]
