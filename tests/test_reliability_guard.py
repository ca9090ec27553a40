"""papo._answer_guard, the check between an answer's text and sympy in the grading workers: what
it refuses, by which rule, before anything is evaluated, and that what it lets through parses
exactly as MathRuler's own parser does (so no ordinary answer grades differently)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("mathruler.grader")

# expression reaching sympy -> a fragment of the rule that refuses it
REFUSED = {
    "9**9**9": "an exponent may reach",
    "9^-9^9": "an exponent may reach",
    "((((9^9)^9)^9)^9)^9": "digits",
    "99999!": "factorial",
    "1e999999": "a literal of magnitude",
    "((x+1)^99)^99": "degree",
    "sqrt(" + "7" * 400 + ")": "sqrt of a number with up to 400 digits",
    "7" * 400 + "**(1/2)": "a root of a number",
    "sin(sin(sin(sin(sin(sin(sin(x)))))))": "nested more than",
    "(" * 30 + "1" + ")" * 30: "nested parentheses",
    "sqrt(2).\uff4e(99999999)": "not printable ASCII",  # a fullwidth n: Python reads it as .n
    "(1).\uff3f\uff3fclass\uff3f\uff3f": "not printable ASCII",
    "sqrt(2).n(99)": "contains '.n'",
    "exec(1)": "calling 'exec'",
    "id(x)": "calling 'id'",
    "N(pi,99999999)": "calling 'N'",
    "1<<99999999": "BinOp is not plain arithmetic",  # a shift builds the number as ** would
    "max(*x)": "Starred is not plain arithmetic",
    "1" * 3000: "longer than",
}
ORDINARY = ["(1/2)-(0.5)", "(sqrt(2)/2)-(1/sqrt2)", "(2x+1)-(x)", "(5!)-(120)", "(2^3)-(8)", "(x^2)-(y)",
            "(3.5)-(7/2)", "(2*pi)-(6.28)", "(x+1)-(1+x)", "(sqrt(8))-(2sqrt(2))", "(e^x)-(1)", "(1e5)-(1)",
            "(abs(x))-(1)", "(2^10)-(1024)", "(1000!)-(1)"]


@pytest.mark.parametrize("expr", list(REFUSED), ids=range(len(REFUSED)))
def test_the_guard_refuses_before_evaluating(expr):
    from papo._answer_guard import UnsafeAnswer, safe_parse

    with pytest.raises(UnsafeAnswer, match=re.escape(REFUSED[expr])):
        safe_parse(expr)


def test_the_guard_parses_ordinary_answers_as_mathruler_does():
    from mathruler.grader import _sympy_parse

    from papo._answer_guard import safe_parse

    for expr in ORDINARY:
        assert safe_parse(expr) == _sympy_parse(expr), expr
