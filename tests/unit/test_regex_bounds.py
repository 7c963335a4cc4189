"""Bounds on user regexes and schema counts, checked before Python's re or xgrammar see them:
past them a 400 naming the field, never an OverflowError, a RecursionError or a count xgrammar
silently wraps around."""

from __future__ import annotations

import pytest

from server.engine.errors import InvalidRequestError
from server.engine.grammar import check_schema
from server.engine.regex_bounds import MAX_GROUP_DEPTH, MAX_REPEAT, check_regex_bounds


def refusal(pattern: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        check_regex_bounds(pattern, "guided_regex", "guided_regex")
    return info.value


@pytest.mark.parametrize(
    "pattern",
    [
        "a{1,4294967296}",
        "a{4294967297}",
        "a{2147483648,}",
        "[a-z]{0,1048577}",
        "a{" + "9" * 5000 + "}",
    ],
)
def test_a_count_past_the_bound_is_refused_naming_the_field(pattern: str) -> None:
    error = refusal(pattern)
    assert error.param == "guided_regex"
    assert "guided_regex repeats up to" in error.message
    assert f"counts above {MAX_REPEAT}" in error.message
    assert len(error.message) < 200  # a 5000-digit count is shown cut


@pytest.mark.parametrize("opener", ["(", "(?:", "(?P<g>", "(?="])
def test_groups_nested_past_the_bound_are_refused_without_recursion(opener: str) -> None:
    error = refusal(opener * 100_000 + "a" + ")" * 100_000)
    assert f"nests groups more than {MAX_GROUP_DEPTH} deep" in error.message


@pytest.mark.parametrize(
    "pattern",
    [
        f"a{{{MAX_REPEAT}}}",
        f"(ab){{0,{MAX_REPEAT}}}",
        "(" * MAX_GROUP_DEPTH + "a" + ")" * MAX_GROUP_DEPTH,
        "(a)" * 5000,  # many groups, none deep
        r"\(" * 500 + "a",  # escaped: not groups
        "[(]" * 500,  # in a class: not groups
        "[]{99999999999}]",  # in a class (opened by a literal ']'): no count
        r"\{4294967296}",  # an escaped brace: a literal, no count
        "a{,5}",
    ],
)
def test_patterns_within_the_bounds_pass(pattern: str) -> None:
    check_regex_bounds(pattern, "guided_regex", "guided_regex")


def test_a_schema_pattern_is_held_to_the_same_bounds_naming_where() -> None:
    schema = {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "a{1,4294967296}"}},
    }
    with pytest.raises(InvalidRequestError) as info:
        check_schema(schema)
    assert info.value.param == "response_format"
    assert "properties.id.pattern repeats up to 4294967296 times" in info.value.message


@pytest.mark.parametrize("keyword", ["minLength", "maxLength", "minItems", "maxItems"])
@pytest.mark.parametrize("value", [4294967297, MAX_REPEAT + 1, -1, 2.5, True, "3", float("inf")])
def test_a_schema_count_out_of_range_is_refused(keyword: str, value: object) -> None:
    with pytest.raises(InvalidRequestError, match=f"{keyword} must be an integer in"):
        check_schema({"type": "string", keyword: value})


def test_a_schema_count_within_range_passes() -> None:
    check_schema({"type": "string", "minLength": 0, "maxLength": MAX_REPEAT})
    check_schema({"type": "array", "minItems": 2.0, "maxItems": 10})
