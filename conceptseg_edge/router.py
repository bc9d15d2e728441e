"""Route choice for a request: ``prompt``, ``shortcut`` or ``reason``.

Pure functions, no I/O: the same rule runs in the torch reference pipeline, the edge runtime, and
the Triton BLS model, and is carried in checkpoint config and bundle manifest via ``RouterConfig``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RouterConfig:
    """Shortcut acceptance thresholds.

    The paper's rule: with n words in the concept (text in parentheses stripped), keep the
    backbone's mask when its presence score >= tau(n) = base_tau * growth**(n - 1); a concept of
    more than ``max_shortcut_words`` words always takes the reason route. ``taus`` overrides
    tau(n) per word count (written by ``train calibrate-router``).
    """

    base_tau: float = field(default=0.1, metadata={"help": "tau for a one-word concept (paper: 0.1)"})
    growth: float = field(default=2.0, metadata={"help": "tau grows by this factor per extra word (paper: 2)"})
    max_shortcut_words: int = field(default=4, metadata={"help": "longer concepts always reason (paper: 4)"})
    taus: dict[int, float] = field(default_factory=dict, metadata={"help": "calibrated tau per word count"})

    def tau(self, n_words: int) -> float:
        if n_words in self.taus:
            return self.taus[n_words]
        return self.base_tau * self.growth ** (n_words - 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["taus"] = {str(k): v for k, v in self.taus.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        data = dict(data)
        data["taus"] = {int(k): float(v) for k, v in data.get("taus", {}).items()}
        return cls(**data)
