"""Answer-grading worker process for `papo.rewards.AnswerGrader` (run as `python -m`).

Protocol, one JSON object per line: it writes {"ready": true} once the grader is imported, then
answers each request {"job", "given", "truth"} on stdin with {"job", "ok"} on its own private
copy of stdout. Anything the grader prints goes to stderr, so it cannot corrupt the protocol.
It is a separate interpreter (not a multiprocessing child) so that starting it never re-imports
the trainer's main script, and the parent can kill it when an answer runs past its deadline.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

from papo.rewards import _UNSAFE_EXPR


def _mathruler_grader() -> Callable[[str, str], bool]:
    from mathruler import grader as mr

    # MathRuler compiles normalized answers with sympy's parser (which evaluates the Python it
    # builds): only plain arithmetic may reach it
    unguarded = mr._sympy_parse

    def guarded_parse(expr: str):
        if _UNSAFE_EXPR.search(expr):
            raise ValueError("refused: not an arithmetic expression")
        return unguarded(expr)

    mr._sympy_parse = guarded_parse
    return lambda given, truth: bool(mr.grade_answer(given, truth))


def _math_verify_grader() -> Callable[[str, str], bool]:
    from math_verify import LatexExtractionConfig, parse, verify

    # LaTeX extraction only: the plain-expression extractor compiles text with sympy's parser
    latex_only = [LatexExtractionConfig()]

    def grade(given: str, truth: str) -> bool:
        gold = parse("\\boxed{" + truth + "}", extraction_config=latex_only)
        pred = parse("\\boxed{" + given + "}", extraction_config=latex_only)
        return bool(verify(gold, pred))

    return grade


def main(backend: str) -> None:
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints of the grader go to stderr
    grade = _mathruler_grader() if backend == "mathruler" else _math_verify_grader()
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ok = grade(request["given"], request["truth"])
        except Exception:  # a grader crash on odd input is a wrong answer, not a dead worker
            ok = False
        out.write(json.dumps({"job": request["job"], "ok": ok}) + "\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1])
