"""infer: a torch.compile backend, FX fusion passes and a lean runtime for LLM inference."""
__version__ = "0.1.0"
