"""How much a policy may generate: one ``GenerationConfig`` passed from the caller to the decode loop.

The reason route's budget used to be a loose ``max_new_tokens`` int with a default of its own in
every class that passed it on (2048, 256, 96, ...), and was changed by assigning attributes after
construction. Now the default is written once, here, and a caller that wants another budget (a
parity check, a calibration run) builds its own ``GenerationConfig`` and hands it to ``from_bundle``
or ``from_checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conceptseg_edge.errors import InputError

#: The reason route's budget: a ``<think>…<bbox>…<answer>`` completion of the paper's format fits.
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationConfig:
    """Greedy decoding settings of the policy (batch of one)."""

    max_new_tokens: int = field(
        default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "tokens the policy may generate, stop token included"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected an int >= 1, got {self.max_new_tokens!r}")
