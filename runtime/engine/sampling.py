"""Per-request sampling parameters."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token of one request and when to stop.

    Attributes:
        temperature: logits are divided by it; ``0`` means greedy (argmax, ties to the lowest id).
        top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches
            ``top_p`` (always at least one); ``1.0`` turns it off.
        top_k: keep the ``top_k`` most likely tokens; ``-1`` or ``0`` turns it off.
        max_tokens: the most tokens to generate (the stop token included).
        stop_token_ids: extra ids that end generation; applied even with ``ignore_eos``.
        ignore_eos: keep generating past the model's end-of-sequence ids.
        seed: seeds a per-request generator, so the output does not depend on the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite float >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (-1 or 0 = off), got {self.top_k!r}")
        bad = [t for t in self.stop_token_ids if not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"stop_token_ids must be ints >= 0, got {bad!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax of the logits."""
        return self.temperature == 0.0
