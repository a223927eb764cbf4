"""VQA accuracy as the official VQAv2 evaluation (``vqaEval.py``, GT-Vision-Lab) computes it.

Normalisation of an answer, in the official order:

1. newlines and tabs become spaces, ends stripped;
2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: removed where it touches a
   space or the text has a digit-comma-digit, otherwise replaced by a space; then periods
   not followed by a digit are deleted (the official code passes ``re.UNICODE`` as the
   *count* of ``re.sub``, so at most 32 are; kept);
3. lowercase, split on whitespace, number words zero..ten (and "none") → digits,
   articles a/an/the dropped, apostrophe-less contractions fixed ("dont" → "don't").

Scoring, as ``vqaEval.py`` does it: the prediction is always normalised (steps 1-3). The
human answers are only stripped (step 1) and, when they disagree, have their punctuation
handled (step 2); they are never lowercased or mapped to digits, since VQAv2's answer
files already are. Then for each human answer, ``min(1, #other answers equal to the
prediction / 3)``, averaged over all of them: with 10 answers, a prediction given by 4 or
more people scores 1, by 3 people 0.9, by 2 people 0.6, by 1 person 0.3.
"""

from __future__ import annotations

import re

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
# Contractions written without their apostrophe, as VQA annotators type them, mapped to the
# spelling the answers use (the official table).
_CONTRACTIONS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're
whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd
whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're
whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've
wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've
youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = {}
for _pair in "|".join(_CONTRACTIONS.strip().splitlines()).split("|"):
    _k, _v = _pair.split()
    CONTRACTIONS[_k] = _v
del _pair, _k, _v

_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, its quirk included


def _punctuation(text: str) -> str:
    out = text
    comma_digits = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or comma_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (punctuation, periods, digits, articles, contractions)."""
    return _digits_articles(_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Accuracy of one predicted answer against the human answers (normally 10)."""
    if not answers:
        raise ValueError("vqa_accuracy: no human answers; expected a non-empty list (VQAv2 has 10 per question)")
    pred = normalize_answer(prediction)
    gts = [_clean(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [_punctuation(a) for a in gts]
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


def accuracy_by_type(right: list[bool], types: list[str], order: tuple[str, ...]) -> dict[str, float]:
    """The share of ``right`` answers among each question type present, in ``order``."""
    return {t: sum(r for r, k in zip(right, types) if k == t) / n for t in order if (n := types.count(t))}
