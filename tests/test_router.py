"""Router: word counting, route choice and shortcut acceptance on crafted cases."""

from __future__ import annotations

import dataclasses
import math

import pytest

from conceptseg_edge.errors import InputError, RouteUnavailableError
from conceptseg_edge.router import (
    AUTO,
    ROUTE_CHOICES,
    ROUTES,
    RouteDecision,
    RouterConfig,
    accept_shortcut,
    choose_route,
    count_words,
    dispatch,
)

ALL = {"prompt", "shortcut", "reason"}
PAPER = RouterConfig()


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize(
    ("query", "n"),
    [
        ("cat", 1),
        ("red circle", 2),
        ("  spaced   out  words ", 3),
        ("red circle (the one on the left of the big blue square)", 2),
        ("a (b (c d) e) f", 2),  # nested parentheses
        ("(only a remark)", 0),
        ("polyp colon segmentation", 3),
    ],
)
def test_count_words_strips_parentheses(query: str, n: int) -> None:
    assert count_words(query) == n


@pytest.mark.parametrize(("n", "tau"), [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8)])
def test_paper_taus_accept_just_above_and_reject_just_below(n: int, tau: float) -> None:
    assert PAPER.tau(n) == pytest.approx(tau)
    assert accept_shortcut(logit(tau) + 1e-6, n, PAPER)
    assert not accept_shortcut(logit(tau) - 1e-6, n, PAPER)


def test_five_or_more_words_never_take_the_shortcut() -> None:
    for n in (5, 6, 20):
        assert not accept_shortcut(50.0, n, PAPER)
    assert not accept_shortcut(math.inf, 5, PAPER)


def test_degenerate_word_counts_and_logits() -> None:
    assert not accept_shortcut(50.0, 0, PAPER)
    assert not accept_shortcut(math.nan, 1, PAPER)
    assert accept_shortcut(math.inf, 1, PAPER)
    assert not accept_shortcut(-math.inf, 1, PAPER)
    assert not accept_shortcut(-1000.0, 1, PAPER)  # no overflow in the sigmoid


def test_calibrated_taus_override_the_formula_but_not_the_word_limit() -> None:
    calibrated = RouterConfig(taus={1: 0.5, 5: 0.01})
    assert accept_shortcut(logit(0.3), 1, PAPER)
    assert not accept_shortcut(logit(0.3), 1, calibrated)
    assert accept_shortcut(logit(0.3), 2, calibrated)  # n = 2 keeps the paper's 0.2
    assert not accept_shortcut(logit(0.9), 5, calibrated)
    assert RouterConfig.from_dict(calibrated.to_dict()) == calibrated


def test_geometry_goes_to_prompt_even_with_a_query() -> None:
    assert choose_route(True, None, PAPER, ALL) == RouteDecision("prompt", "geometric prompt given")
    assert choose_route(True, "a cat", PAPER, ALL).route == "prompt"


def test_short_concepts_are_shortcut_candidates_with_reason_fallback() -> None:
    decision = choose_route(False, "striped square", PAPER, ALL)
    assert (decision.route, decision.n_words, decision.fallback) == ("shortcut", 2, "reason")
    only_shortcut = choose_route(False, "striped square", PAPER, {"shortcut"})
    assert (only_shortcut.route, only_shortcut.fallback) == ("shortcut", None)


def test_parenthesised_text_does_not_count() -> None:
    decision = choose_route(False, "red circle (the one on the left of the big blue square)", PAPER, ALL)
    assert (decision.route, decision.n_words) == ("shortcut", 2)


def test_long_queries_reason() -> None:
    decision = choose_route(False, "segment the object that differs between the two images", PAPER, ALL)
    assert (decision.route, decision.n_words) == ("reason", 9)
    assert choose_route(False, "one two three four five", PAPER, ALL).route == "reason"
    assert choose_route(False, "one two three four", PAPER, ALL).route == "shortcut"
    assert choose_route(False, "(all remarks)", PAPER, ALL).route == "reason"


def test_max_shortcut_words_is_honoured() -> None:
    strict = RouterConfig(max_shortcut_words=2)
    assert choose_route(False, "one two", strict, ALL).route == "shortcut"
    assert choose_route(False, "one two three", strict, ALL).route == "reason"
    assert not accept_shortcut(50.0, 3, strict)


def test_short_concepts_reason_when_there_is_no_shortcut() -> None:
    decision = choose_route(False, "cat", PAPER, {"prompt", "reason"})
    assert decision.route == "reason"


def test_forced_routes() -> None:
    assert choose_route(False, "cat", PAPER, ALL, forced="reason") == RouteDecision("reason", "forced", 1)
    long_shortcut = choose_route(False, "a very long query of many words", PAPER, ALL, forced="shortcut")
    assert (long_shortcut.route, long_shortcut.fallback) == ("shortcut", "reason")
    assert choose_route(True, "cat", PAPER, ALL, forced="reason").route == "reason"
    assert choose_route(True, None, PAPER, ALL, forced="prompt").route == "prompt"


def test_errors() -> None:
    with pytest.raises(InputError, match="unknown route"):
        choose_route(False, "cat", PAPER, ALL, forced="teleport")
    with pytest.raises(RouteUnavailableError, match="shortcut"):
        choose_route(False, "cat", PAPER, {"prompt", "reason"}, forced="shortcut")
    for empty in (None, "", "   \n"):
        with pytest.raises(InputError, match="query"):
            choose_route(False, empty, PAPER, ALL)
    with pytest.raises(InputError, match="query"):
        choose_route(True, " ", PAPER, ALL, forced="reason")
    with pytest.raises(InputError, match="no points or box"):
        choose_route(False, "cat", PAPER, ALL, forced="prompt")
    with pytest.raises(RouteUnavailableError, match="prompt"):
        choose_route(True, None, PAPER, {"shortcut", "reason"})
    with pytest.raises(RouteUnavailableError, match="reason"):
        choose_route(False, "one two three four five", PAPER, {"prompt", "shortcut"})
    with pytest.raises(RouteUnavailableError):
        choose_route(False, "cat", PAPER, {"prompt"})


def test_route_decision_is_frozen() -> None:
    decision = choose_route(False, "cat", PAPER, ALL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.route = "reason"  # type: ignore[misc]


def test_route_names_are_defined_once() -> None:
    assert ROUTES == ("prompt", "shortcut", "reason") and ROUTE_CHOICES == (AUTO, *ROUTES)
    assert choose_route(False, "cat", PAPER, ALL, forced=AUTO) == choose_route(False, "cat", PAPER, ALL)
    with pytest.raises(InputError, match="unknown route 'teleport'; expected one of auto, prompt, shortcut, reason"):
        choose_route(False, "cat", PAPER, ALL, forced="teleport")


class Routes:
    """A backend that records which routes ran and with what reason; the shortcut scores ``logit``."""

    def __init__(self, logit: float) -> None:
        self.logit, self.calls = logit, []

    def prompt(self, why: str) -> str:
        self.calls.append(("prompt", why))
        return "prompt mask"

    def shortcut(self, why: str) -> tuple[str, float]:
        self.calls.append(("shortcut", why))
        return "shortcut mask", self.logit

    def reason(self, why: str) -> str:
        self.calls.append(("reason", why))
        return "reason mask"


def test_dispatch_runs_the_decided_route() -> None:
    for decision, expected in ((RouteDecision("prompt", "geometric prompt given"), "prompt mask"),
                               (RouteDecision("reason", "forced", 1), "reason mask")):
        backend = Routes(logit(0.9))
        assert dispatch(decision, PAPER, backend) == expected
        assert backend.calls == [(decision.route, decision.reason)]


def test_dispatch_keeps_an_accepted_shortcut_and_falls_back_on_a_rejected_one() -> None:
    decision = choose_route(False, "red circle", PAPER, ALL)  # tau(2) = 0.2
    kept = Routes(logit(0.25))
    assert dispatch(decision, PAPER, kept) == "shortcut mask" and [c[0] for c in kept.calls] == ["shortcut"]
    rejected = Routes(logit(0.15))
    assert dispatch(decision, PAPER, rejected) == "reason mask"
    assert rejected.calls[-1] == ("reason", "shortcut rejected: presence 0.150 < tau 0.200")


def test_dispatch_keeps_the_shortcut_when_there_is_nothing_to_fall_back_to() -> None:
    decision = choose_route(False, "red circle", PAPER, {"prompt", "shortcut"})
    backend = Routes(logit(0.01))
    assert decision.fallback is None and dispatch(decision, PAPER, backend) == "shortcut mask"
