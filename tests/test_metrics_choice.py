"""Multiple choice extraction is deterministic and never guesses; numeric answers compare
with a tolerance."""

import pytest

from vlkit.eval.metrics import extract_choice, extract_number, numeric_match

OPTS = {"A": "red circle", "B": "blue square", "C": "green star", "D": "red"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("(c)", "C"),
        ("D.", "D"),
        ("The answer is (B).", "B"),
        ("answer: c", "C"),
        ("I think option A is wrong, the correct answer is B", "B"),  # last statement wins
        ("B. blue square", "B"),
        ("(A) because it is round", "A"),
        ("It must be (C) given the colour", "C"),
        ("a blue square", "B"),  # option text; the article 'a' is not option A
        ("A red circle.", "A"),  # 'red' (D) is inside 'red circle' (A): the longer one stands
        ("Green star", "C"),
    ],
)
def test_extracts(text, expected):
    assert extract_choice(text, OPTS) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "I don't know", "either (A) or (B)", "a blue square or a green star", "E", "The answer is E"],
)
def test_unparseable_is_none_never_random(text):
    assert extract_choice(text, OPTS) is None
    assert extract_choice(text, OPTS) is None  # deterministic


def test_list_options_and_letters():
    assert extract_choice("cat", ["dog", "cat"]) == "B"
    assert extract_choice("(E)", letters="ABCDE") == "E"


@pytest.mark.parametrize(
    "text, value",
    [("42", 42.0), ("The answer is 3.50.", 3.5), ("-2", -2.0), ("1,234", 1234.0), ("about 3/4", 0.75), ("x = 2 then 7", 7.0), ("none", None)],
)
def test_extract_number(text, value):
    assert extract_number(text) == value


def test_numeric_match():
    assert numeric_match("It is 3.14159", 3.14, precision=2) is True
    assert numeric_match("3.149", "3.14", precision=2) is False  # rounds to 3.15
    assert numeric_match("100.4", 100, rel_tol=0.01) is True
    assert numeric_match("101.5", 100, rel_tol=0.01) is False
    assert numeric_match("5", 5) is True
    assert numeric_match("no idea", 5) is None
    with pytest.raises(ValueError, match="not a number"):
        numeric_match("5", "five")
