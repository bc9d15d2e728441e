"""Route choice for a request: ``prompt``, ``shortcut`` or ``reason``, and the one dispatch over them.

Pure functions, no I/O: the same rule runs in the torch reference pipeline, the edge runtime, and
the Triton BLS model, and is carried in checkpoint config and bundle manifest via ``RouterConfig``.
``choose_route`` decides; ``dispatch`` runs the decision on a ``RouteBackend`` (the torch pipeline's
or the runtime's routes for one request), keeping a shortcut mask or falling back to ``reason``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence, Set
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, TypeVar, get_args

import numpy as np

from conceptseg_edge.errors import InputError, RouteUnavailableError
from conceptseg_edge.preprocess import Prompts, as_rgb_array, make_prompts

# prompt: SAM2 on the user's points/box. shortcut: SAM2 on the bare concept, kept when its object
# score passes tau(n). reason: the policy, the translator (CTM), then SAM2.
Route = Literal["prompt", "shortcut", "reason"]
ROUTES: tuple[Route, ...] = get_args(Route)
#: What a caller may ask for (``--route``, ``route=``): a route by name, or ``auto`` (the router decides).
AUTO = "auto"
ROUTE_CHOICES: tuple[str, ...] = (AUTO, *ROUTES)

_PARENTHESES = re.compile(r"\([^()]*\)")


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


@dataclass(frozen=True)
class RouteDecision:
    """Which route serves a request, and why; recorded with every prediction and benchmark row.

    ``route == "shortcut"`` is a candidate: the caller runs the backbone on the concept, keeps the
    mask if ``accept_shortcut`` says so, and otherwise falls back to ``fallback`` (``"reason"`` when
    that route is available, else ``None``: the shortcut mask is all there is).
    """

    route: Route
    reason: str
    n_words: int | None = None
    fallback: Route | None = None


def count_words(query: str) -> int:
    """Words in a concept, text in parentheses (nested too) stripped, as the paper counts them."""
    text, previous = query, None
    while text != previous:
        previous, text = text, _PARENTHESES.sub(" ", text)
    return len(text.split())


@dataclass(frozen=True)
class RoutedRequest:
    """A request checked and routed before any model runs."""

    image: np.ndarray  # (H, W, 3) uint8
    prompts: Prompts  # points/box in the original frame (empty for a concept-only request)
    decision: RouteDecision


def route_request(
    image: np.ndarray,
    query: str | None,
    points: Sequence[Sequence[float]] | None,
    labels: Sequence[int] | None,
    box: Sequence[float] | None,
    config: RouterConfig,
    available: Set[str],
    route: str = AUTO,
) -> RoutedRequest:
    """Check a request's image and prompts and choose its route: the prologue of every pipeline's call.

    The torch reference and the runtime both start a request here, so both refuse the same bad input
    with the same error, before any model runs.
    """
    image = as_rgb_array(image)
    prompts = make_prompts(points, labels, box, image.shape[:2])
    return RoutedRequest(image, prompts, choose_route(not prompts.empty, query, config, available, route))


def choose_route(
    has_geometry: bool,
    query: str | None,
    config: RouterConfig,
    available: Set[str],
    forced: str | None = None,
) -> RouteDecision:
    """Pick the route for a request; a pure function of its arguments.

    Geometry (points or a box) goes to ``prompt``. A concept of at most
    ``config.max_shortcut_words`` words is a ``shortcut`` candidate; a longer one, or one that is
    all parentheses, goes to ``reason``. When the shortcut is not available a short concept goes
    to ``reason`` too.

    Args:
        has_geometry: the request carries points or a box.
        query: the concept phrase or question; may be None only with geometry.
        config: thresholds; only ``max_shortcut_words`` matters here.
        available: routes the loaded bundle can run.
        forced: a route the caller insists on; None or ``auto``: the router decides.

    Raises:
        InputError: ``forced`` is not a route name, or the request lacks what the route needs
            (an empty query without geometry, a forced ``prompt`` without geometry, a forced
            text route without a query).
        RouteUnavailableError: the forced or the needed route is not in ``available``.
    """
    text = query.strip() if query is not None else ""
    if forced is not None and forced != AUTO:
        return _forced(forced, has_geometry, text, available)
    if has_geometry:
        if "prompt" not in available:
            raise _unavailable("prompt", "a geometric prompt needs the SAM2 decoder", available)
        return RouteDecision("prompt", "geometric prompt given")
    if not text:
        raise InputError("query: empty; give a concept or question, or points/a box")
    n = count_words(text)
    fallback = "reason" if "reason" in available else None
    if 1 <= n <= config.max_shortcut_words:
        if "shortcut" in available:
            return RouteDecision("shortcut", f"{n}-word concept <= {config.max_shortcut_words}", n, fallback)
        if fallback:
            return RouteDecision("reason", f"{n}-word concept but no shortcut route", n)
        raise _unavailable("shortcut", f"a {n}-word concept needs shortcut or reason", available)
    if fallback:
        return RouteDecision("reason", f"{n}-word query > {config.max_shortcut_words}", n)
    raise _unavailable("reason", f"a {n}-word query needs it", available)


def _forced(forced: str, has_geometry: bool, text: str, available: Set[str]) -> RouteDecision:
    if forced not in ROUTES:
        raise InputError(f"route: unknown route {forced!r}; expected one of {', '.join(ROUTE_CHOICES)}")
    if forced not in available:
        raise _unavailable(forced, "it was forced", available)
    if forced == "prompt":
        if not has_geometry:
            raise InputError("route: 'prompt' was forced but the request has no points or box")
        return RouteDecision("prompt", "forced")
    if not text:
        raise InputError(f"query: empty, but route {forced!r} was forced and needs one")
    fallback = "reason" if forced == "shortcut" and "reason" in available else None
    return RouteDecision(forced, "forced", count_words(text), fallback)


def _unavailable(route: str, why: str, available: Set[str]) -> RouteUnavailableError:
    have = ", ".join(sorted(available)) or "none"
    return RouteUnavailableError(f"route: {route!r} is not available ({why}); this bundle has: {have}")


def accept_shortcut(object_score_logit: float, n_words: int, config: RouterConfig) -> bool:
    """Keep the backbone's mask iff sigmoid(object-score logit) >= tau(n_words).

    SAM2's object-score head stands in for SAM 3's presence score. Never true for
    ``n_words > config.max_shortcut_words`` (whatever the calibrated taus say), for n < 1, or for
    a NaN logit.
    """
    if not 1 <= n_words <= config.max_shortcut_words or math.isnan(object_score_logit):
        return False
    return _sigmoid(object_score_logit) >= config.tau(n_words)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


R_co = TypeVar("R_co", covariant=True)
R = TypeVar("R")


class RouteBackend(Protocol[R_co]):
    """One request's three routes in some pipeline; each takes the reason its result will carry."""

    def prompt(self, why: str) -> R_co: ...

    def shortcut(self, why: str) -> tuple[R_co, float]:
        """The shortcut's result and the object-score logit it is accepted or rejected on."""
        ...

    def reason(self, why: str) -> R_co: ...


def dispatch(decision: RouteDecision, config: RouterConfig, backend: RouteBackend[R]) -> R:
    """Run ``decision`` on ``backend``: the one place a shortcut is kept or falls back to ``reason``.

    A shortcut candidate's mask stands when ``accept_shortcut`` says so, or when the decision has
    no fallback (the bundle has no reason route); otherwise ``backend.reason`` runs with the
    presence and threshold that rejected it as its reason.
    """
    if decision.route == "prompt":
        return backend.prompt(decision.reason)
    if decision.route == "reason":
        return backend.reason(decision.reason)
    result, logit = backend.shortcut(decision.reason)
    n_words = decision.n_words or 0
    if decision.fallback is None or accept_shortcut(logit, n_words, config):
        return result
    return backend.reason(f"shortcut rejected: presence {_sigmoid(logit):.3f} < tau {config.tau(n_words):.3f}")
