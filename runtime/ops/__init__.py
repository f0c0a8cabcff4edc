"""Custom ops under the ``infer`` namespace; importing this package registers them all."""

from . import activation, norm  # noqa: F401  (registers torch.ops.infer.*)
