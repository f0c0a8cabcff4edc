"""Model definitions written plainly (fusion is the compiler's job) and the HF checkpoint loader."""
from .loader import load_model
from .registry import ARCHITECTURES, model_class_for

__all__ = ["ARCHITECTURES", "load_model", "model_class_for"]
