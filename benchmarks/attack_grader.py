"""The reward path under attack: grade thousands of generated hostile answers and write the figures.

    python -m benchmarks.attack_grader                      # 10,000 answers, writes the results
    python -m benchmarks.attack_grader --answers 300 --no-write   # a quick look

Each answer is wrapped in a response (`<think>...</think> ... \\boxed{answer}`) and scored by
`papo.rewards.compute_score` with an `AnswerGrader` (MathRuler, the default 5 s deadline), one
response at a time, as the trainer's reward step would. The kinds (`KINDS`): deep nesting, huge
exponents and factorials, long digit strings, unbalanced braces, unicode look-alikes of digits and
operators, LaTeX macros that expand, Python-looking payloads that reach for builtins or
attributes without quotes or brackets, and payloads that would create a canary file if any of
them ran as code. What is recorded:

- past the deadline: attempts whose reply or kill came later than the deadline plus
  `DEADLINE_SLACK_S` (the time to notice and kill a worker);
- code execution: whether the canary file exists after grading (its positive control: the
  Python-only payloads, executed as Python in a throwaway interpreter, do create it);
- the grader process's child processes (zombies included) and open file descriptors, before
  and after, each measured with one live worker;
- ordinary-answer throughput (answers/s, mostly the sympy path) of the attacked grader against
  an idle one, which only ever sees ordinary answers: both are warmed up on the same ordinary
  answers first, then grade them in turn, answer by answer, in rounds spread over the attack
  (median ratio), with the machine's load average;
- per kind, how each answer was decided: as text (no sympy), refused by the workers' guard
  (`papo._answer_guard`), or evaluated by sympy; grades that came out correct; timeouts.

Results go to benchmarks/results/attack_grader.json and docs/reliability_grader.md (rendered
from the JSON; tests/test_reliability_grader.py checks the two agree and grades a sample of the
same answers in CI). Throughput is wall-clock: on a machine shared with other work, the ratio
measures the other work too, so rerun it on a quiet machine for a clean figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "attack_grader.json"
TABLE = REPO / "docs" / "reliability_grader.md"
DEADLINE_SLACK_S = 1.0
# Mostly letter-free, non-integer truths: MathRuler compares integers and expressions with more
# than two letters as text only, so these are the truths under which an answer reaches sympy.
TRUTHS = ["\\frac{1}{2}", "0.25", "2\\sqrt{2}", "-3.5", "\\frac{7}{3}", "\\sqrt{3}", "3", "x^2+1", "(1,2)",
          "\\pi"]


@dataclass(frozen=True)
class Attack:
    kind: str
    answer: str
    truth: str
    response: str


# ----------------------------------------------------------------------------- generators


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(1, 9)) + "".join(rng.choice("0123456789") for _ in range(n - 1))


def _deep_nesting(rng: random.Random, canary: str) -> str:
    d = rng.randint(8, 220)
    return rng.choice([
        "(" * d + "1" + ")" * d,
        "\\frac{1}{" * d + "2" + "}" * d,
        "\\sqrt{" * d + "2" + "}" * d,
        "sqrt(" * d + "2" + ")" * d,
        "-(" * d + "x" + ")" * d,
        "{" * d + "3" + "}" * d,
        "\\left(" * d + "1" + "\\right)" * d,
        "2^(" * d + "2" + ")" * d,
        "((x+1)*" * d + "1" + ")" * d,
        "[" * d + "1" + "]" * d,
        "sin(" * d + "x" + ")" * d,
        "(1+" * d + "1" + ")" * d,
        "\\frac{\\frac{1}{2}}{" * (d // 4 + 1) + "3" + "}" * (d // 4 + 1),
        "x^{" * d + "2" + "}" * d,
    ])


def _huge_powers(rng: random.Random, canary: str) -> str:
    a, b, c, d = (rng.randint(2, 99) for _ in range(4))
    k = rng.randint(5, 12)
    n = rng.randint(10**3, 10**9)
    return rng.choice([
        f"{a}^{b}^{c}", f"{a}**{b}**{c}", f"({a}^{b})^({c}^{d})", f"{a}^{{{b}^{{{c}}}}}", f"{n}!",
        f"({a}^{b})!", f"{a}!!!!", f"factorial(factorial({a}))", f"{a}^-{b}^{c}", f"{a}^+{b}^+{c}",
        f"10^{{10^{{{k}}}}}", f"1e{n}", f"{a}.5e-{n}", f"(x+1)^{{{n}}}", f"(x+1)**{n}", f"2**{n}",
        f"sqrt(2)**{n}", f"{a}^{b}*{c}^{d}*{a}**{n}", f"x^{a}*y^{b}*x**{n}", "((((9^9)^9)^9)^9)^9",
        f"\\frac{{{a}^{{{b}^{c}}}}}{{2}}", f"({n})!/({n}-1)!", f"{a}^{b}^{c}^{d}", f"(({a}**{b})**{c})**{d}",
        f"((x+1)^{a})^{b}", f"\\binom{{{n}}}{{{n // 2}}}", f"{a}^{{{k}}}!",
    ])


def _long_digits(rng: random.Random, canary: str) -> str:
    n = rng.randint(50, 990)
    s = _digits(rng, n)
    half = _digits(rng, max(n // 2 - 2, 1))
    return rng.choice([
        s, s[:n // 2] + "." + s[n // 2:], "0." + "0" * n + "1", "1" + "0" * n, f"{half}/{half[::-1]}",
        f"{half}*{half}", ",".join(s[i:i + 3] for i in range(0, n, 3)), f"sqrt({s})", f"{half}^2",
        f"{s}e-{n}", "9." + "9" * n, f"\\frac{{{half}}}{{{half[::-1]}}}", f"{half}+{half}i", f"-{s}",
        f"{half}.{half}", f"\\sqrt{{{s}}}",
    ])


_BRACE_ATOMS = ["{", "}", "(", ")", "[", "]", "\\left(", "\\right)", "\\boxed{", "\\frac{", "1", "x", "^",
                "_"]


def _unbalanced_braces(rng: random.Random, canary: str) -> str:
    k = rng.randint(3, 300)
    return rng.choice([
        "{" * k + "1",
        "1" + "}" * k,
        "".join(rng.choice(_BRACE_ATOMS) for _ in range(k)),
        "\\frac{1}{" + "{" * k,
        "(" * k + "1" + ")" * (k // 2),
        "\\left(" * k + "1",
        "\\boxed{" * k + "2",
        "}{" * k,
        "\\sqrt{2" + "}" * k + "{" * k,
    ])


_LOOKALIKE_DIGITS = ["０１２３４５６７８９", "٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗", "𝟘𝟙𝟚𝟛𝟜𝟝𝟞𝟟𝟠𝟡",
                     "⁰¹²³⁴⁵⁶⁷⁸⁹", "₀₁₂₃₄₅₆₇₈₉", "⓪①②③④⑤⑥⑦⑧⑨"]
_LOOKALIKE_OPS = {"+": ["＋", "➕", "﹢"], "-": ["−", "－", "‐", "﹣"], "*": ["×", "∗", "＊", "⋅"],
                  "/": ["∕", "⁄", "÷", "／"], "^": ["＾", "ˆ"], "(": ["（", "❨"], ")": ["）", "❩"],
                  ".": ["．", "·"], "!": ["！", "ǃ"], "=": ["＝"]}
_INVISIBLE = ["\u200b", "\u200d", "\u2060", "\u202e", "\ufeff", "\u0301"]


def _lookalike(rng: random.Random, text: str) -> str:
    digits = rng.choice(_LOOKALIKE_DIGITS)
    out = []
    for ch in text:
        if ch.isdigit() and rng.random() < 0.8:
            out.append(digits[int(ch)])
        elif ch in _LOOKALIKE_OPS and rng.random() < 0.8:
            out.append(rng.choice(_LOOKALIKE_OPS[ch]))
        else:
            out.append(ch)
        if rng.random() < 0.05:
            out.append(rng.choice(_INVISIBLE))
    return "".join(out)


def _unicode_lookalikes(rng: random.Random, canary: str) -> str:
    a, b, c = (rng.randint(2, 99) for _ in range(3))
    base = rng.choice([f"{a}", f"{a}/{b}", f"{a}**{b}**{c}", f"{a}^{b}^{c}", f"({a}+{b})*{c}", f"{a}!",
                       f"-{a}.{b}", f"{a}^{b}", f"sqrt({a})", "9**9**9", f"{a}*{10**rng.randint(50, 400)}"])
    return _lookalike(rng, base)


def _doubling_macro(i: int) -> str:
    """\\def\\a{\\x\\x}, \\def\\b{\\a\\a}, ...: each expands to twice the one before."""
    prev = chr(96 + i) if i else "x"
    return f"\\def\\{chr(97 + i)}{{\\{prev}\\{prev}}}"


def _latex_macros(rng: random.Random, canary: str) -> str:
    k = rng.randint(2, 60)
    return rng.choice([
        "\\def\\a{\\a\\a}\\a",
        "\\def\\x{xx}" + "".join(_doubling_macro(i) for i in range(min(k, 20))),
        "\\newcommand{\\f}[1]{#1#1}" + "\\f{" * k + "1" + "}" * k,
        "\\renewcommand{\\frac}[2]{\\frac{#1}{#2}}\\frac{1}{2}",
        "\\expandafter" * k + "\\a",
        "\\csname exec\\endcsname",
        "\\input{/etc/passwd}",
        "\\include{" + canary + "}",
        "\\write18{touch " + canary + "}",
        "\\immediate\\write18{touch " + canary + "}",
        "\\catcode`\\{=12 {1}",
        "\\let\\frac\\sqrt\\frac{4}{2}",
        "\\loop\\iftrue\\repeat",
        "\\text{" * k + "1" + "}" * k,
        "\\operatorname{exec}(1)",
        "\\mathrm{open}(x)",
        "\\unicode{x221E}",
        "\\frac" * k + "12" * k,
        "\\sqrt[" + "\\sqrt[" * k + "2]{2}" + "]{2}" * k,
        "\\begin{array}{" + "c" * k + "}" + " & ".join("1" for _ in range(k)) + "\\end{array}",
        "\\overbrace{" * k + "x" + "}" * k,
        "\\color{red}{" + "\\color{blue}{" * k + "1" + "}" * (k + 1),
        "\\href{file://" + canary + "}{1}",
    ])


def _python_payloads(rng: random.Random, canary: str) -> str:
    a = rng.randint(2, 99)
    big = rng.randint(10**6, 10**9)
    return rng.choice([
        "__import__(os).system(ls)", "(1).__class__.__bases__", "().__class__.__base__.__subclasses__()",
        "x.__globals__", "sqrt.__globals__", f"exec(chr({48 + a % 10}))",
        f"eval(chr(49)+chr(43)+chr({48 + a % 10}))",
        "getattr(x,y)", "globals()", "vars()", "locals()", "breakpoint()", "input()", "open(x)",
        "compile(x,y,z)", "id(x)", "print(x)", "help()", "exit()", "setattr(x,y,z)", "lambda x: x",
        "x if 1 else 2", f"sqrt(2).n({big})", f"pi.evalf({big})", f"x.subs(x,{a}**{a}**{a})", "S(x)",
        f"N(pi,{big})", "sympify(x)", f"ff({big},{big})", f"binomial({big},{big // 2})",
        f"isprime(2**{big}-1)", f"factorint(2**{a * 7}+1)", f"nextprime(10**{a * 3})", f"divisors(10**{a})",
        "Integer(1).__class__", "Symbol.__init__", f"sqrt(2).ｎ({big})", "(1).＿＿class＿＿",
        f"ⅾⅰⅴⅿoⅾ({a}**{a}**{a},2)", f"eⅹeⅽ(heⅹ({a}))", f"ｅｖａｌ(ｃｈｒ({48 + a % 10}))",
        "𝐞𝐱𝐞𝐜(𝐜𝐡𝐫(49))", "ｏｐｅｎ(x)", f"x.ｅｖａｌｆ({big})", "(1).__ｃｌａｓｓ__", f"pow({a},{a}**{a})",
        f"pow({a},{a},{a})", f"max({a}**{a}**{a},1)", f"abs({a}**{a}**{a})", f"sum(range(10**{a}))",
        "sqrt(2).func", "x.args", "(x).atoms()", f"Function(f)({a})", f"exp({big})", f"log(10**{big})",
    ])


def canary_code(canary: str) -> str:
    """Python that creates the canary file."""
    return f"open({canary!r},'w').close()"


def canary_payloads(canary: str) -> list[str]:
    """Payloads that create the canary when executed as Python (after the NFKC folding Python
    applies to names): the ones `canary_control` runs."""
    code = canary_code(canary)
    chr_chain = "+".join(f"chr({ord(c)})" for c in code)
    return [
        code,
        f"__import__('os').system('touch {canary}')",
        f"exec({chr_chain})",
        "ｅｘｅｃ(" + "+".join(f"ｃｈｒ({ord(c)})" for c in code) + ")",
        "eⅹeⅽ(" + "+".join(f"ⅽhr({ord(c)})" for c in code) + ")",
        f"eval({chr_chain})",
        "exec(bytes((" + ",".join(str(ord(c)) for c in code) + ",)).ｄｅｃｏｄｅ())",
    ]


def _code_canary(rng: random.Random, canary: str) -> str:
    payload = rng.choice(canary_payloads(canary))
    return rng.choice([payload, "\\text{" + payload + "}", "\\mathrm{" + payload + "}", f"3+{payload}",
                       f"({payload})-(1)", f"{payload},1", f"x={payload}"])


KINDS: dict[str, Callable[[random.Random, str], str]] = {
    "deep nesting": _deep_nesting,
    "huge exponents and factorials": _huge_powers,
    "long digit strings": _long_digits,
    "unbalanced braces": _unbalanced_braces,
    "unicode look-alikes of digits and operators": _unicode_lookalikes,
    "LaTeX macros that expand": _latex_macros,
    "Python-looking payloads (builtins, attributes)": _python_payloads,
    "code payloads aimed at a canary file": _code_canary,
}


def _response(rng: random.Random, kind: str, answer: str) -> str:
    words = ["so", "then", "count", "the", "shapes", "is"]
    think = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
    if kind == "unbalanced braces" and rng.random() < 0.5:
        return f"<think>{think}</think> \\boxed{{{answer}"  # the box itself never closes
    return f"<think>{think}</think> The answer is \\boxed{{{answer}}}."


def generate(n: int, *, seed: int, canary: str) -> list[Attack]:
    """`n` attacks, the kinds in turn (so any prefix covers every kind), reproducible from `seed`."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    attacks = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        answer = KINDS[kind](rng, canary)
        attacks.append(Attack(kind, answer, rng.choice(TRUTHS), _response(rng, kind, answer)))
    return attacks


def ordinary_pairs(n: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """(response, truth) pairs of ordinary answers that differ from their truth as text (so they reach
    the worker and mostly sympy): the throughput workload."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(2, 41)
        given, truth = rng.choice([(f"{a}/{b}", f"\\frac{{{a}}}{{{b}}}"), (f"{a / 4}", f"\\frac{{{a}}}{{4}}"),
                                   (f"{a}\\sqrt{{2}}", f"\\sqrt{{{2 * a * a}}}"), (f"x+{a}", f"{a}+x"),
                                   (f"{a}", f"{a + 1}"), (f"{a}.0", f"{a}")])
        out.append((f"<think>compute</think> \\boxed{{{given}}}", truth))
    return out


# ----------------------------------------------------------------------------- measuring


def child_processes() -> tuple[int, int]:
    """(live children, zombie children) of this process, from /proc."""
    me, live, zombies = os.getpid(), 0, 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me:
            if fields[0] == "Z":
                zombies += 1
            else:
                live += 1
    return live, zombies


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Classifier:
    """How MathRuler decides an answer, replayed in this process with the guard's checks only
    (nothing evaluated): "text" (no sympy), "refused" (the guard refused it) or "sympy"."""

    def __init__(self) -> None:
        from mathruler import grader as mr

        from papo._answer_guard import UnsafeAnswer, checked_code

        self._mr, self._checked, self._unsafe = mr, checked_code, UnsafeAnswer

    def __call__(self, given: str, truth: str) -> str:
        seen: list[str] = []

        def record(expr: str):
            try:
                self._checked(expr.replace("^", "**"))
                seen.append("sympy")
            except self._unsafe:
                seen.append("refused")
            raise RuntimeError("classified")  # MathRuler catches it and moves on

        original = self._mr._sympy_parse
        self._mr._sympy_parse = record
        old = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(5)
        try:
            self._mr.grade_answer(given, truth)
        except TimeoutError:
            return "text (classification timed out)"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            self._mr._sympy_parse = original
        if not seen:
            return "text"
        return "refused" if "refused" in seen else "sympy"


def _timeout(signum, frame):
    raise TimeoutError


def _throughput(grader, pairs: list[tuple[str, str]]) -> float:
    from papo.rewards import compute_score

    start = time.perf_counter()
    for response, truth in pairs:
        compute_score([response], [truth], grader=grader)
    return len(pairs) / (time.perf_counter() - start)


def _paired_throughput(idle, attacked, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """Answers/s of two graders on the same answers, taken in turn answer by answer (which one goes
    first alternates), so that a change in the machine's load weighs on both alike."""
    from papo.rewards import compute_score

    spent = [0.0, 0.0]
    for i, (response, truth) in enumerate(pairs):
        order = ((0, idle), (1, attacked)) if i % 2 == 0 else ((1, attacked), (0, idle))
        for which, grader in order:
            start = time.perf_counter()
            compute_score([response], [truth], grader=grader)
            spent[which] += time.perf_counter() - start
    return len(pairs) / spent[0], len(pairs) / spent[1]


def canary_control(canary: Path) -> int:
    """Run each Python-only canary payload as Python (names NFKC-folded, as the compiler does) in a
    throwaway interpreter; returns how many created the canary (each is deleted after)."""
    created = 0
    for payload in canary_payloads(str(canary)):
        code = unicodedata.normalize("NFKC", payload)
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, cwd=canary.parent)
        if canary.exists():
            created += 1
            canary.unlink()
    return created


def run_attack(attacks: list[Attack], *, canary: Path, timeout: float, throughput_answers: int = 1000,
               rounds: int = 5, progress: bool = False) -> dict[str, Any]:
    """Grade `attacks` one response at a time on one grader and measure everything in the module doc
    (`canary`: the file the payloads aim at)."""
    from mathruler.grader import extract_boxed_content

    from papo.rewards import AnswerGrader, compute_score, normalize_response

    ordinary = ordinary_pairs(throughput_answers)
    classify = _Classifier()
    load_before = os.getloadavg()[0]
    attacked = AnswerGrader(timeout=timeout)
    idle_rates, attacked_rates = [], []
    try:
        with AnswerGrader(timeout=timeout) as idle:
            # start the workers and warm sympy's caches up on the ordinary answers, alike for both
            _throughput(idle, ordinary)
            _throughput(attacked, ordinary)
            children_before, fds_before = child_processes(), open_fds()
            kinds: dict[str, dict[str, Any]] = {}
            slowest_answer = 0.0
            past_deadline = 0
            attack_s = 0.0
            for i, attack in enumerate(attacks):
                row = kinds.setdefault(attack.kind, dict(
                    answers=0, correct=0, text=0, refused=0, sympy=0, timeouts=0, worker_deaths=0,
                    slowest_s=0.0, example=attack.answer[:60]))
                stats = attacked.stats
                before = (stats.timeouts, stats.worker_deaths, stats.slowest_attempt_s)
                t0 = time.perf_counter()
                score = compute_score([attack.response], [attack.truth], grader=attacked)[0]
                elapsed = time.perf_counter() - t0
                attack_s += elapsed
                stats = attacked.stats
                if stats.slowest_attempt_s > max(before[2], timeout + DEADLINE_SLACK_S):
                    past_deadline += 1
                row["answers"] += 1
                row["correct"] += int(score["accuracy"] == 1.0)
                row["timeouts"] += stats.timeouts - before[0]
                row["worker_deaths"] += stats.worker_deaths - before[1]
                row["slowest_s"] = max(row["slowest_s"], elapsed)
                slowest_answer = max(slowest_answer, elapsed)
                path = classify(extract_boxed_content(normalize_response(attack.response)), attack.truth)
                row[path.split(" ")[0]] += 1
                if progress and (i + 1) % 500 == 0:
                    print(f"  {i + 1}/{len(attacks)} answers, {attack_s:.0f} s of grading", flush=True)
                if (i + 1) % max(len(attacks) // rounds, 1) == 0 and len(idle_rates) < rounds:
                    rate_idle, rate_attacked = _paired_throughput(idle, attacked, ordinary)
                    idle_rates.append(rate_idle)
                    attacked_rates.append(rate_attacked)
            while len(idle_rates) < rounds:
                rate_idle, rate_attacked = _paired_throughput(idle, attacked, ordinary)
                idle_rates.append(rate_idle)
                attacked_rates.append(rate_attacked)
            _throughput(attacked, ordinary[:1])  # one live worker, as when counting before
            _throughput(idle, ordinary[:1])
            children_after, fds_after = child_processes(), open_fds()
        stats = attacked.stats
    finally:
        attacked.close()
    ratios = [a / i for a, i in zip(attacked_rates, idle_rates)]
    return {
        "answers": len(attacks),
        "backend": "mathruler",
        "timeout_s": timeout,
        "retries": attacked.retries,
        "past_deadline": past_deadline,
        "slowest_attempt_s": stats.slowest_attempt_s,
        "slowest_answer_s": slowest_answer,
        "timeouts": stats.timeouts,
        "worker_deaths": stats.worker_deaths,
        "attack_seconds": attack_s,
        "canary_created": canary.exists(),
        "canary_payloads": sum(1 for a in attacks if a.kind == "code payloads aimed at a canary file"),
        "children_before": children_before[0], "children_after": children_after[0],
        "zombies_after": children_after[1],
        "fds_before": fds_before, "fds_after": fds_after,
        "throughput_idle": statistics.median(idle_rates),
        "throughput_attacked": statistics.median(attacked_rates),
        "throughput_ratio": statistics.median(ratios),
        "throughput_rounds": [round(r, 3) for r in ratios],
        "load": max(load_before, os.getloadavg()[0]),
        "cpus": os.cpu_count(),
        "kinds": kinds,
    }


# ----------------------------------------------------------------------------- the table


def display_example(text: str) -> str:
    """An answer as a Markdown code span shows it: backticks and pipes replaced, invisible and
    combining characters written as escapes."""
    out = []
    for ch in text.replace("`", "'").replace("|", "\\|"):
        visible = unicodedata.category(ch)[0] not in "CM" or ch in "\t"
        out.append(ch if visible else f"\\u{ord(ch):04x}")
    return "".join(out)


def render_markdown(results: dict[str, Any]) -> str:
    """docs/reliability_grader.md from the results JSON."""
    r = results
    rounds = ", ".join(f"{x:.2f}" for x in r["throughput_rounds"])
    canary = "**was created**" if r["canary_created"] else "never appeared"
    lines = [
        "# The reward path under attack",
        "",
        "Generated by `python -m benchmarks.attack_grader` (results:",
        "`benchmarks/results/attack_grader.json`); `tests/test_reliability_grader.py` checks that this",
        "file is the JSON rendered and grades a sample of the same answers in CI. Summary in",
        "[reliability.md](reliability.md).",
        "",
        f"- {r['answers']:,} adversarial answers, one response at a time through "
        f"`papo.rewards.compute_score`, grader {r['backend']} with a {r['timeout_s']:.0f} s deadline per "
        f"attempt and {r['retries']} retry on a fresh worker; grading them took {r['attack_seconds']:.0f} s.",
        f"- Past the deadline (reply or kill later than the deadline + {DEADLINE_SLACK_S:.0f} s): "
        f"**{r['past_deadline']}**. Slowest attempt {r['slowest_attempt_s']:.2f} s, slowest answer "
        f"{r['slowest_answer_s']:.2f} s; {r['timeouts']} attempts stopped at the deadline, "
        f"{r['worker_deaths']} worker deaths.",
        f"- Code execution: the canary file {canary} ({r['canary_payloads']:,} payloads aimed at it; run "
        f"as plain Python, {r['canary_control']} of the {r['canary_variants']} Python payload variants do "
        "create it).",
        f"- Child processes of the grading process {r['children_before']} -> {r['children_after']} "
        f"(zombies after: {r['zombies_after']}); open file descriptors {r['fds_before']} -> "
        f"{r['fds_after']}.",
        f"- Ordinary-answer throughput: {r['throughput_attacked']:.1f} answers/s after the attack against "
        f"{r['throughput_idle']:.1f} on an idle grader: **{r['throughput_ratio']:.2f}x** (median of "
        f"{len(r['throughput_rounds'])} rounds, the two graders answer by answer in turn: {rounds}). Load "
        f"average {r['load']:.1f} on {r['cpus']} CPUs during the run.",
    ]
    if r.get("note"):
        lines.append(f"- {r['note']}")
    lines += [
        "",
        "As text: decided without sympy (string comparison, length cap). Refused: the workers' guard",
        "(`papo/_answer_guard.py`) refused to evaluate the expression. Evaluated: sympy parsed and",
        "simplified it. Correct: graded equal to the ground truth (e.g. look-alike digits of the",
        "right number).",
        "",
        "| kind | answers | as text | refused | evaluated | correct | timeouts | worker deaths "
        "| slowest (s) | example |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, k in r["kinds"].items():
        example = display_example(k["example"])
        lines.append(f"| {kind} | {k['answers']:,} | {k['text']:,} | {k['refused']:,} | {k['sympy']:,} | "
                     f"{k['correct']:,} | {k['timeouts']} | {k['worker_deaths']} | {k['slowest_s']:.2f} | "
                     f"`{example}` |")
    lines += ["", "Rerun on a quiet machine (the throughput ratio is wall-clock: it counts other load too):",
              "", "```bash", "python -m benchmarks.attack_grader",
              "python -m tests.reliability_catalog   # refresh the summary in docs/reliability.md", "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=10_000, help="adversarial answers (default 10,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per attempt (default: the grader's)")
    parser.add_argument("--no-write", action="store_true", help="print the figures, write nothing")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite docs/reliability_grader.md from the committed results")
    parser.add_argument("--note", default="",
                        help="a remark for the table (e.g. what else loaded the machine)")
    args = parser.parse_args(argv)
    if args.render:
        TABLE.write_text(render_markdown(json.loads(RESULTS.read_text())))
        return 0
    from papo.rewards import DEFAULT_TIMEOUT_S

    workdir = Path(tempfile.mkdtemp(prefix="pc"))
    try:
        canary = workdir / "C"
        control = canary_control(canary)
        attacks = generate(args.answers, seed=args.seed, canary=str(canary))
        print(f"grading {len(attacks):,} adversarial answers ({len(KINDS)} kinds); canary control {control}/"
              f"{len(canary_payloads(str(canary)))}", flush=True)
        results = run_attack(attacks, canary=canary, timeout=args.timeout or DEFAULT_TIMEOUT_S, progress=True)
        results.update(canary_control=control, canary_variants=len(canary_payloads(str(canary))),
                       seed=args.seed, note=args.note)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render_markdown(results))
    if not args.no_write:
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        TABLE.write_text(render_markdown(results))
        print(f"wrote {RESULTS.relative_to(REPO)} and {TABLE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
