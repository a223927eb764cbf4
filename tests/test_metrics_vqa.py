"""VQAv2 accuracy: worked examples of the official normalisation and the 10-answer average."""

import pytest

from vlkit.eval.metrics import accuracy_by_type, normalize_answer, vqa_accuracy


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # number word -> digit, lowercased
        ("none", "0"),
        ("A dog.", "dog"),  # article dropped, trailing period stripped
        ("the  red   one", "red 1"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("dont know", "don't know"),  # contraction fixed
        ("isnt", "isn't"),
        ("yes!", "yes"),  # punctuation replaced by a space, then whitespace collapsed
        ("t-shirt", "t shirt"),  # '-' not touching a space -> space
        ("red - blue", "red blue"),  # '-' touching a space -> removed
        ("1,000", "1000"),  # digit,digit: every punctuation mark is removed outright
        ("  hot\tdog\n", "hot dog"),
        ("Im", "im"),  # the official table's capitalised keys never match after lowercasing
    ],
)
def test_normalisation_worked_examples(raw, expected):
    assert normalize_answer(raw) == expected


def test_ten_answer_average():
    # 'dog' given by k of 10 annotators: the average over the 10 leave-one-out subsets
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["dog"] * k + ["cat"] * (10 - k)
        assert vqa_accuracy("dog", answers) == pytest.approx(expected), k
    # 1 of 10: the annotator who said it sees 0 others (0); the other 9 see 1 (1/3 each): 9/3/10
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)


def test_prediction_normalised_to_match_answers():
    answers = ["2"] * 6 + ["3"] * 4
    assert vqa_accuracy("Two.", answers) == 1.0
    assert vqa_accuracy("There are three", answers) == 0.0  # free text does not match
    assert vqa_accuracy("three", answers) == 1.0  # 4 others agree with every leave-one-out


def test_answers_only_punctuation_normalised_when_they_disagree():
    # answers disagree -> punctuation handled on answers ('yes.' -> 'yes' for 5 of them)
    answers = ["yes."] * 5 + ["no"] * 5
    assert vqa_accuracy("yes", answers) == 1.0
    # official quirk, kept: an answer's '!' becomes a space that is never stripped ('yes ')
    assert vqa_accuracy("yes", ["yes!"] * 5 + ["no"] * 5) == 0.0
    # all identical -> answers are compared as given (official behaviour): 'Yes!' != 'yes'
    assert vqa_accuracy("yes", ["Yes!"] * 10) == 0.0
    # answers are never mapped to digits: 'two' in the answers does not match a prediction 'two' -> '2'
    assert vqa_accuracy("two", ["two"] * 5 + ["three"] * 5) == 0.0


def test_no_answers_is_an_error():
    with pytest.raises(ValueError, match="no human answers"):
        vqa_accuracy("yes", [])


def test_accuracy_by_type_in_the_given_order_and_only_types_present():
    right = [True, False, True, True, False]
    types = ["count", "color", "color", "count", "count"]
    assert accuracy_by_type(right, types, ("color", "shape", "count")) == {"color": 0.5, "count": 2 / 3}
    assert list(accuracy_by_type(right, types, ("count", "color"))) == ["count", "color"]
