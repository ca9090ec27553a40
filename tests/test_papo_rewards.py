"""papo.rewards: tricky answers with expected grades, the official format regex re-derived, the
worker timeout on a pathological answer, and the refusal of code-like answers.

No test asserts a duration (performance belongs in benchmarks/): the deadline test checks that
the timeout fired, and `_returns` only guards against a hang (minutes of CPU, e.g. a deadline
that never fires or quadratic regex backtracking), with a bound far above any normal run.
"""

import random
import re
import threading

import pytest

from papo.rewards import (
    _UNSAFE_EXPR,
    AnswerGrader,
    accuracy_reward,
    compute_score,
    extract_boxed,
    format_reward,
    normalize_response,
)


@pytest.fixture(scope="module")
def grader():
    # generous deadline: the machine running the tests may be slow and shared
    with AnswerGrader(timeout=20.0, num_workers=2) as g:
        yield g


# (response, ground truth, expected accuracy)
ACCURACY_TABLE = [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),  # sympy: 1/2 - 0.5 = 0
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{2/4}", "1/2", 0.0),  # unreduced fractions are not accepted
    ("\\boxed{\\frac{6}{8}}", "\\frac{3}{4}", 0.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),  # units stripped
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{10\\%}", "10", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{5.0}", "5", 1.0),
    ("\\boxed{4.9999}", "5", 0.0),  # integer ground truth: exact match only
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),  # nested braces
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{(2, 1)}", "(1,2)", 0.0),
    ("\\boxed{b}", "B", 1.0),
    ("\\boxed{\\text{B}}", "B", 1.0),
    ("\\boxed{x=5}", "5", 1.0),
    ("The answer is 5.", "5", 0.0),  # no box
    ("\\boxed{3} first, then \\boxed{5}", "5", 1.0),  # the last box counts
    ("\\boxed{3} first, then \\boxed{5}", "3", 0.0),
    ("\\boxed{5} and an unclosed \\boxed{6", "5", 0.0),  # the last box is incomplete
    ("\\boxed{3}", "5", 0.0),
]


def test_accuracy_table(grader):
    got = [accuracy_reward(r, t, grader=grader) for r, t, _ in ACCURACY_TABLE]
    assert got == [e for _, _, e in ACCURACY_TABLE]


def test_the_workers_agree_with_mathruler_called_directly(grader):
    # the refusal guard must not change any grade of ordinary answers
    from mathruler.grader import extract_boxed_content, grade_answer

    pairs = [(extract_boxed_content(r), t) for r, t, _ in ACCURACY_TABLE]
    assert grader.grade_many(pairs) == [grade_answer(a, t) for a, t in pairs]


HANG_S = 60.0  # far above any normal run on a busy machine: only a hang reaches it


def _returns(fn, *args):
    """fn(*args), failing (instead of blocking the suite) if it has not returned after HANG_S."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn(*args)), daemon=True)
    thread.start()
    thread.join(HANG_S)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} hung for {HANG_S} s"
    return out["value"]


def test_huge_inputs(grader):
    long_think = "<think>" + "step " * 200_000 + "</think>"
    score = _returns(lambda: compute_score([long_think + " \\boxed{7}"], ["7"], grader=grader))
    assert score == [dict(overall=1.0, format=1.0, accuracy=1.0)]
    assert accuracy_reward("\\boxed{" + "9" * 100_000 + "}", "9", grader=grader) == 0.0
    assert accuracy_reward("{" * 50_000 + "\\boxed{" + "{" * 50_000, "1", grader=grader) == 0.0
    # quadratic backtracking would take hours here
    assert _returns(normalize_response, " " * 200_000 + "x") == " " * 200_000 + "x"


def test_pathological_answer_is_refused_before_sympy_builds_it():
    # 9**9**9 makes sympy build a 370-million-digit integer: minutes of CPU in the official grader.
    # The workers' guard refuses it unevaluated (the deadline itself, for answers that get past
    # the guard: tests/test_reliability_faults.py, with an injected hang).
    with AnswerGrader(timeout=20.0) as g:
        assert g.grade("9**9**9", "\\sqrt{2}") is False
        assert g.stats.timeouts == 0 and g.stats.worker_deaths == 0
        assert g.grade("\\frac{1}{2}", "0.5") is True  # the same worker goes on grading
        assert g.stats.attempts == 2


def test_code_like_answers_are_refused():
    refused = ["(1).__class__", "x.real", "(1)-(a.b)", "__import__", "'a'", "f(x)[0]", "a=1", "x;y",
               "lambda:1"]
    for expr in refused:
        assert _UNSAFE_EXPR.search(expr), expr
    allowed = ["(sqrt2)-(2**0.5)", "(1/2)-(0.5)", "(3.5)-(7/2)", "(2*pi)-(6.28)", "(x+1)-(1+x)", "(5!)-(120)"]
    for expr in allowed:
        assert not _UNSAFE_EXPR.search(expr), expr


def test_format_reward_matches_the_official_regex():
    official = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
    cases = ["<think>a</think>b\\boxed{c}d", "<think></think>\\boxed{}", "x<think>a</think>\\boxed{1}",
             "<think>a</think>\\boxed{1", "<think>\\boxed{1}</think>", "<think></think>}\\boxed{",
             "<think>a\n</think>\n\\boxed{\n1}\n", "<think>a</think></think>\\boxed{x}", "<think>", "",
             "<think></think>\\boxed{x}}", "<think>a</think>b\\boxed {c}"]
    rng = random.Random(0)
    atoms = ["<think>", "</think>", "\\boxed{", "}", "a", "\n", "{"]
    cases += ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 8))) for _ in range(500)]
    for text in cases:
        assert format_reward(text) == (1.0 if official.fullmatch(text) else 0.0), repr(text)


def test_normalize_response_matches_the_official_regex():
    rng = random.Random(1)
    atoms = ["<", ">", "/", " ", "  ", "\n", "\t", "a", "think", "\u00a0", "\u2003"]
    cases = ["< think > a < /think > \\boxed{1 / 2}", "a / b", "  <  ", ""]
    cases += ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 12))) for _ in range(1000)]
    for text in cases:
        assert normalize_response(text) == re.sub(r"\s*(<|>|/)\s*", r"\1", text), repr(text)


def test_compute_score_official_weights(grader):
    responses = ["< think >look< /think > so \\boxed{4}", "\\boxed{4}", "<think>x</think> \\boxed{5}",
                 "nothing"]
    scores = compute_score(responses, ["4", "4", "4", "4"], grader=grader)
    assert [s["accuracy"] for s in scores] == [1.0, 1.0, 0.0, 0.0]
    assert [s["format"] for s in scores] == [1.0, 0.0, 1.0, 0.0]
    assert [s["overall"] for s in scores] == pytest.approx([1.0, 0.9, 0.1, 0.0])


def test_extract_boxed():
    assert extract_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert extract_boxed("none here") == "None"


def test_non_string_inputs_are_rejected(grader):
    with pytest.raises(TypeError, match="response"):
        accuracy_reward(None, "1", grader=grader)
    with pytest.raises(TypeError, match="ground_truth"):
        accuracy_reward("\\boxed{1}", 1, grader=grader)
    with pytest.raises(TypeError, match=r"responses\[1\]"):
        compute_score(["a", b"b"], ["1", "2"], grader=grader)
    with pytest.raises(TypeError, match="responses"):
        compute_score("abc", ["1"], grader=grader)
    with pytest.raises(ValueError, match="same length"):
        compute_score(["a"], ["1", "2"], grader=grader)
    with pytest.raises(TypeError, match=r"pairs\[0\]\[1\]"):
        grader.grade_many([("1", 1)])
    with pytest.raises(TypeError, match="response"):
        format_reward(3)
    with pytest.raises(ValueError, match="backend"):
        AnswerGrader("sympy")


def test_math_verify_backend():
    pytest.importorskip("math_verify")
    with AnswerGrader("math_verify", timeout=20.0) as g:
        assert g.grade_many([("\\frac{1}{2}", "0.5"), ("3", "4")]) == [True, False]
