"""Custom ops under the ``infer`` namespace; importing this package registers them all."""

from . import activation, linear, norm, rotary  # noqa: F401  (registers torch.ops.infer.*)
