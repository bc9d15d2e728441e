"""Policy output format: round trip, strict check, tolerant parse with documented fallbacks."""

from __future__ import annotations

import pytest

from conceptseg_edge.errors import InputError
from conceptseg_edge.tags import ParsedCompletion, format_output, is_well_formed, parse_output, template

WITH_CHECK = (
    "<think>the examples are all striped squares</think> <rule>striped square</rule> "
    "<check>[10,20,110,120]</check> <bbox>[300,310,420,450]</bbox> <answer>striped square</answer>"
)
NO_CHECK = "<think>t</think> <rule>r</rule> <bbox>[1,2,3,4]</bbox> <answer>cat</answer>"


def test_round_trip_with_check() -> None:
    text = format_output(
        think="the examples are all striped squares",
        rule="striped square",
        check=(10, 20, 110, 120),
        bbox=(300, 310, 420, 450),
        answer="striped square",
    )
    assert text == WITH_CHECK
    out = parse_output(text, has_hidden_box=True)
    assert out == ParsedCompletion(
        think="the examples are all striped squares",
        rule="striped square",
        check=(10, 20, 110, 120),
        bbox=(300, 310, 420, 450),
        answer="striped square",
        well_formed=True,
    )


def test_round_trip_without_check() -> None:
    text = format_output(think="t", rule="r", bbox=(1, 2, 3, 4), answer="cat")
    assert text == NO_CHECK
    out = parse_output(text)
    assert (out.check, out.bbox, out.answer, out.well_formed) == (None, (1, 2, 3, 4), "cat", True)


def test_check_is_required_only_with_a_hidden_box() -> None:
    assert is_well_formed(WITH_CHECK, has_hidden_box=True)
    assert is_well_formed(WITH_CHECK, has_hidden_box=False)  # optional, so allowed
    assert is_well_formed(NO_CHECK, has_hidden_box=False)
    assert not is_well_formed(NO_CHECK, has_hidden_box=True)
    assert not parse_output(NO_CHECK, has_hidden_box=True).well_formed


def test_rule_is_required_unlike_the_official_one_support_regex() -> None:
    text = "<think>t</think> <bbox>[1,2,3,4]</bbox> <answer>cat</answer>"
    assert not is_well_formed(text, has_hidden_box=False)


@pytest.mark.parametrize(
    "text",
    [
        "sure! " + NO_CHECK,  # text outside the tags
        NO_CHECK + " done",
        "<rule>r</rule> <think>t</think> <bbox>[1,2,3,4]</bbox> <answer>cat</answer>",  # order
        "<think>t <rule>x</rule></think> <rule>r</rule> <bbox>[1,2,3,4]</bbox> <answer>cat</answer>",  # nested
        "<think>t</think> <rule>r</rule> <bbox>[1.5,2,3,4]</bbox> <answer>cat</answer>",  # float box
        "<think>t</think> <rule>r</rule> <bbox>[1,2,3]</bbox> <answer>cat</answer>",  # three numbers
        "<think>t</think> <rule>r</rule> <bbox>[-1,2,3,4]</bbox> <answer>cat</answer>",  # negative
        "<think>t</think> <rule>r</rule> <bbox>[1,2,3,4]</bbox> <answer>  </answer>",  # blank answer
        "<think>t</think> <rule>r</rule> <bbox>[1,2,3,4]</bbox> <answer>cat",  # unclosed
        NO_CHECK + " " + NO_CHECK,  # twice
    ],
)
def test_strict_check_rejects(text: str) -> None:
    assert not is_well_formed(text, has_hidden_box=False)


def test_whitespace_and_newlines_between_tags_are_fine() -> None:
    text = "\n<think>line one\nline two</think>\n<rule>r</rule>\n<bbox>[ 1, 2, 3, 4 ]</bbox>\n<answer>cat</answer>\n"
    assert is_well_formed(text, has_hidden_box=False)
    assert parse_output(text).think == "line one\nline two"


# Each malformed completion and what the tolerant parser must make of it:
# (text, think, rule, check, bbox, answer).
MALFORMED = [
    ("", None, None, None, None, None),
    ("I cannot help with that.", None, None, None, None, None),
    ("\x00<<>>< /think>", None, None, None, None, None),
    ("<think>truncated mid-sentence", "truncated mid-sentence", None, None, None, None),
    ("<think>a</think><answer>cat", "a", None, None, None, "cat"),  # unclosed answer runs to the end
    ("<think>a <rule>b</rule>", "a", "b", None, None, None),  # unclosed think stops at the next tag
    ("<answer></answer>", None, None, None, None, ""),
    ("<answer>first</answer><answer>second</answer>", None, None, None, None, "first"),
    ("<bbox>[1,2,3]</bbox>", None, None, None, None, None),  # wrong arity
    ("<bbox>[1,2,3,4,5]</bbox>", None, None, None, None, None),
    ("<bbox>[a,b,c,d]</bbox>", None, None, None, None, None),  # not numbers
    ("<bbox></bbox>", None, None, None, None, None),
    ("<bbox>[30, 40, 10, 20]</bbox>", None, None, None, (10, 20, 30, 40), None),  # inverted corners
    ("<bbox>[10.4, 20.5, 30.6, -5]</bbox>", None, None, None, (10, 0, 31, 21), None),  # round, sort, clip
    ("<bbox>[-10, 10, 650, 20]</bbox>", None, None, None, (0, 10, 599, 20), None),  # clipped to the frame
    ("<bbox>[700, 10, 900, 20]</bbox>", None, None, None, None, None),  # wholly outside the frame
    ('<bbox>{"bbox": [1, 2, 3, 4]}</bbox>', None, None, None, (1, 2, 3, 4), None),
    ("<bbox>[[1,2,3,4]]</bbox>", None, None, None, (1, 2, 3, 4), None),
    ("<bbox>[" + "9" * 400 + ",1,2,3]</bbox>", None, None, None, None, None),  # overflows float
    ("<check>[5,5,1,1]</check><bbox>[1,1,2,2]</bbox>", None, None, (1, 1, 5, 5), (1, 1, 2, 2), None),
]


@pytest.mark.parametrize(("text", "think", "rule", "check", "bbox", "answer"), MALFORMED)
def test_tolerant_parse_fallbacks(
    text: str, think: str | None, rule: str | None, check: tuple | None, bbox: tuple | None, answer: str | None
) -> None:
    out = parse_output(text, has_hidden_box=True)
    assert (out.think, out.rule, out.check, out.bbox, out.answer) == (think, rule, check, bbox, answer)
    assert out.well_formed is False


def test_parse_never_raises_on_non_strings() -> None:
    out = parse_output(None)  # type: ignore[arg-type]
    assert out == ParsedCompletion(None, None, None, None, None, False)


def test_parse_clips_to_the_given_frame() -> None:
    assert parse_output("<bbox>[0,0,700,700]</bbox>", size=1000).bbox == (0, 0, 700, 700)
    assert parse_output("<bbox>[0,0,700,700]</bbox>").bbox == (0, 0, 599, 599)


def test_format_output_rejects_what_it_cannot_write() -> None:
    with pytest.raises(InputError, match="think"):
        format_output(think="a </think> b", rule="r", bbox=(1, 2, 3, 4), answer="cat")
    with pytest.raises(InputError, match="answer"):
        format_output(think="t", rule="r", bbox=(1, 2, 3, 4), answer=" ")
    with pytest.raises(InputError, match="bbox"):
        format_output(think="t", rule="r", bbox=(1.5, 2, 3, 4), answer="cat")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="check"):
        format_output(think="t", rule="r", bbox=(1, 2, 3, 4), answer="cat", check=(1, 2, 3))  # type: ignore[arg-type]


def test_template_spells_out_the_check_only_when_asked() -> None:
    assert "<check>" in template(True) and "<check>" not in template(False)
    assert template(False).startswith("<think>") and template(False).endswith("</answer>")
