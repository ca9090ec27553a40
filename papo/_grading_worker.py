"""Answer-grading worker process for `papo.rewards.AnswerGrader` (run as `python -m`).

Protocol, one JSON object per line: it writes {"ready": true} once the grader is imported, then
answers each request {"job", "given", "truth"} on stdin with {"job", "ok"} on its own private
copy of stdout. Anything the grader prints goes to stderr, so it cannot corrupt the protocol.
It is a separate interpreter (not a multiprocessing child) so that starting it never re-imports
the trainer's main script, and the parent can kill it when an answer runs past its deadline.
Its address space is capped (MEMORY_LIMIT_BYTES), so an answer that slips a huge computation past
the guard fails with MemoryError in a moment instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Callable

from papo.faults import fault_point

MEMORY_LIMIT_BYTES = 4 << 30


def _mathruler_grader() -> Callable[[str, str], bool]:
    from mathruler import grader as mr

    from papo._answer_guard import safe_parse

    # MathRuler compiles normalized answers with sympy's parser (which evaluates the Python it
    # builds): only small plain arithmetic may reach it
    mr._sympy_parse = safe_parse
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


def _limit_memory() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = MEMORY_LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(MEMORY_LIMIT_BYTES, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(backend: str) -> None:
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints of the grader go to stderr
    grade = _mathruler_grader() if backend == "mathruler" else _math_verify_grader()
    _limit_memory()
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        fault_point("grader.request")
        try:
            ok = grade(request["given"], request["truth"])
        except Exception:  # a grader crash on odd input is a wrong answer, not a dead worker
            ok = False
        out.write(json.dumps({"job": request["job"], "ok": ok}) + "\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1])
