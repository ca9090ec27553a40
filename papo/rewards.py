"""Math rewards of the official recipe: last-\\boxed{} accuracy with MathRuler, format, overall.

Official `examples/reward_function/math.py` (docs/algorithm.md, "Rewards and the prompt"):
    response = whitespace around "<", ">" and "/" removed
    format   = 1 if response fully matches  <think>.*</think>.*\\boxed\\{.*\\}.*  (DOTALL)
    accuracy = 1 if mathruler grade_answer(extract_boxed_content(response), ground_truth)
    overall  = 0.9 * accuracy + 0.1 * format

What differs from the official code is robustness only; no ordinary answer grades differently:
- The whitespace fix and the format check run in linear time. The official regexes backtrack
  quadratically on long runs of whitespace or many tags, which can stall a step.
- Grading runs in worker processes with a deadline per answer (`AnswerGrader`): sympy can hang
  on adversarial answers, and a hung thread cannot be stopped, a process can. A worker past its
  deadline, or one that dies, is replaced and the answer is graded again once on the fresh
  worker (so a stalled or killed worker does not change a reward); a second failure counts the
  answer as wrong.
- MathRuler's sympy path compiles the normalized answer with sympy's parser, which evaluates
  the Python it builds. The workers let only small plain arithmetic through
  (`papo._answer_guard`: ASCII only, no attribute access, quotes or brackets, names and calls
  from an allowlist, bounded exponents, factorials and digit counts), so no response text runs
  as code and no answer builds a number too large to finish in time.
- Answers longer than `max_answer_chars` (default 1000) are graded wrong unread.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

GRADERS = ("mathruler", "math_verify")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_ANSWER_CHARS = 1000
DEFAULT_RETRIES = 1
# The worker imports sympy and the grader before answering: allow for a slow, loaded machine.
_STARTUP_TIMEOUT_S = 120.0

_TAG_CHARS = "<>/"
_WHITESPACE_RUN = re.compile(r"\s+")


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def normalize_response(response: str) -> str:
    """Remove whitespace around "<", ">" and "/", as the official reward does first.

    Equivalent to re.sub(r"\\s*(<|>|/)\\s*", r"\\1", response) (official; written for
    Qwen2.5-VL-32B's "< think >" outputs) in linear time: a whitespace run is dropped when the
    character before or after it is one of < > /.

    Args:
        response: the decoded response text.

    Returns:
        The normalized text.
    """
    _check_str("response", response)

    def keep_or_drop(m: re.Match) -> str:
        start, end = m.start(), m.end()
        before = response[start - 1] if start > 0 else ""
        after = response[end] if end < len(response) else ""
        return "" if (before and before in _TAG_CHARS) or (after and after in _TAG_CHARS) else m.group(0)

    return _WHITESPACE_RUN.sub(keep_or_drop, response)


def format_reward(response: str) -> float:
    """1.0 if the response fully matches <think>.*</think>.*\\boxed\\{.*\\}.* (DOTALL), else 0.0.

    Same answer as the official regex fullmatch, in linear time: with DOTALL every ".*" matches
    anything, so a match exists iff the text starts with "<think>" and, after it, there is a
    "</think>", later a "\\boxed{" and later a "}"; the earliest occurrences are the best.

    Args:
        response: the (normalized, see `normalize_response`) response text.

    Returns:
        1.0 or 0.0.
    """
    _check_str("response", response)
    if not response.startswith("<think>"):
        return 0.0
    end_think = response.find("</think>", len("<think>"))
    if end_think < 0:
        return 0.0
    box = response.find("\\boxed{", end_think + len("</think>"))
    if box < 0:
        return 0.0
    return 1.0 if response.find("}", box + len("\\boxed{")) >= 0 else 0.0


def extract_boxed(response: str) -> str:
    """Content of the last \\boxed{...} with balanced braces (MathRuler `extract_boxed_content`).

    Args:
        response: the response text.

    Returns:
        The stripped content, or the string "None" when there is no complete box (as MathRuler
        returns; it is then graded like any other answer).
    """
    _check_str("response", response)
    from mathruler.grader import extract_boxed_content

    return extract_boxed_content(response)


# ---------------------------------------------------------------------- worker processes

# The textual first stage of the workers' guard (papo._answer_guard): everything that is not plain
# arithmetic on numbers and short names (MathRuler itself refuses expressions with more than two
# letters).
_UNSAFE_EXPR = re.compile(r"__|\.\s*[A-Za-z_]|[\"'`;:@#$\\\[\]{}=]|lambda")


class _Worker:
    """One grading subprocess (`papo._grading_worker`) speaking JSON lines over its pipes."""

    def __init__(self, backend: str) -> None:
        env = dict(os.environ)
        # the child must import this papo even when it is not installed (a source checkout)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "papo._grading_worker", backend],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, encoding="utf-8",
        )
        self.job: int | None = None
        self.deadline = 0.0
        self.started = 0.0
        if not wait([self.process.stdout], timeout=_STARTUP_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"the {backend} grading worker did not start within {_STARTUP_TIMEOUT_S} s")
        line = self.process.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            self.kill()
            raise RuntimeError(f"the {backend} grading worker failed to start (its error is on stderr)")

    @property
    def stdout(self):
        return self.process.stdout

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, job: int, given: str, truth: str) -> None:
        self.process.stdin.write(json.dumps({"job": job, "given": given, "truth": truth}) + "\n")
        self.process.stdin.flush()

    def receive(self) -> tuple[int, bool]:
        line = self.process.stdout.readline()
        if not line:
            raise EOFError("grading worker exited")
        reply = json.loads(line)
        return reply["job"], bool(reply["ok"])

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


@dataclass
class GraderStats:
    """What an AnswerGrader's workers went through (cumulative over its lifetime)."""

    attempts: int = 0
    """Answers sent to a worker (retries included)."""
    timeouts: int = 0
    """Attempts stopped at their deadline (the worker was killed)."""
    worker_deaths: int = 0
    """Attempts whose worker exited or broke the protocol before replying."""
    retries: int = 0
    """Attempts repeated on a fresh worker after a timeout or a death."""
    slowest_attempt_s: float = 0.0
    """Longest time from sending an answer to its reply or to killing its worker."""


class AnswerGrader:
    """Grades answers in worker processes with a deadline per answer.

    Thread-safe (calls are serialized). Workers are separate interpreters started lazily (safe
    with CUDA and threads in the parent, and they never re-run the trainer's main script), and
    are killed and replaced when an answer runs past its deadline or their process dies; the
    answer is then graded again on the fresh worker, up to `retries` times.

    Args:
        backend: "mathruler" (the paper's grader) or "math_verify".
        timeout: seconds allowed per attempt at an answer (> 0).
        num_workers: worker processes (>= 1) grading in parallel in `grade_many`.
        max_answer_chars: answers longer than this are graded wrong without parsing; None
            grades everything (the official code has no limit).
        retries: further attempts (>= 0) on a fresh worker for an answer whose worker timed
            out or died; after them the answer is graded wrong. The default 1 keeps a worker
            killed from outside (out of memory, a stall of the machine) from changing a reward,
            at the price of a second deadline for an answer that hangs every time.
    """

    def __init__(self, backend: str = "mathruler", *, timeout: float = DEFAULT_TIMEOUT_S,
                 num_workers: int = 1, max_answer_chars: int | None = DEFAULT_MAX_ANSWER_CHARS,
                 retries: int = DEFAULT_RETRIES) -> None:
        if backend not in GRADERS:
            raise ValueError(f"backend must be one of {GRADERS}, got {backend!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if max_answer_chars is not None and (not isinstance(max_answer_chars, int) or max_answer_chars < 1):
            raise ValueError(f"max_answer_chars must be None or an int >= 1, got {max_answer_chars!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.backend = backend
        self.timeout = float(timeout)
        self.num_workers = num_workers
        self.max_answer_chars = max_answer_chars
        self.retries = retries
        self.stats = GraderStats()
        self._workers: list[_Worker | None] = [None] * num_workers
        self._lock = threading.Lock()

    def grade(self, given: str, ground_truth: str) -> bool:
        """Whether `given` is a correct answer for `ground_truth`.

        Args:
            given: the extracted answer (str); ground_truth: the reference answer (str).

        Returns:
            bool; False on timeout, grader error or an over-long answer.
        """
        return self.grade_many([(given, ground_truth)])[0]

    def grade_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Grade (given, ground_truth) pairs, in parallel over the workers.

        Args:
            pairs: sequence of (given answer, ground truth) str pairs.

        Returns:
            list of bool in the order of pairs.
        """
        results: list[bool | None] = [None] * len(pairs)
        pending: list[int] = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"pairs[{i}] must be a (given, ground_truth) pair")
            given, truth = _check_str(f"pairs[{i}][0]", pair[0]), _check_str(f"pairs[{i}][1]", pair[1])
            if given == truth:  # grade_answer(x, x) is always True: no need for a worker
                results[i] = True
            elif self.max_answer_chars is not None and len(given) > self.max_answer_chars:
                results[i] = False
            else:
                pending.append(i)
        if pending:
            with self._lock:
                self._run(pairs, pending, results)
        return [bool(r) for r in results]

    @property
    def num_timeouts(self) -> int:
        """Attempts stopped at their deadline (`stats.timeouts`)."""
        return self.stats.timeouts

    def _run(self, pairs, pending: list[int], results: list) -> None:
        queue = list(reversed(pending))
        attempts = dict.fromkeys(pending, 0)
        busy: dict[int, _Worker] = {}
        stats = self.stats

        def failed(slot: int, worker: _Worker) -> None:
            """No trustworthy reply for worker.job: replace the worker, then try again or give up."""
            self._discard(slot)
            del busy[slot]
            if attempts[worker.job] <= self.retries:
                stats.retries += 1
                queue.append(worker.job)  # next to be sent, to a fresh worker
            else:
                results[worker.job] = False

        try:
            while queue or busy:
                for slot in range(self.num_workers):
                    if not queue:
                        break
                    if slot in busy:
                        continue
                    worker = self._workers[slot]
                    if worker is None or not worker.alive():
                        worker = self._workers[slot] = _Worker(self.backend)
                    job = queue.pop()
                    given, truth = pairs[job]
                    busy[slot] = worker
                    attempts[job] += 1
                    stats.attempts += 1
                    worker.started = time.monotonic()
                    worker.job, worker.deadline = job, worker.started + self.timeout
                    try:
                        worker.send(job, given, truth)
                    except OSError:  # it died between two answers: its pipe is closed
                        stats.worker_deaths += 1
                        failed(slot, worker)
                if not busy:
                    continue
                now = time.monotonic()
                next_deadline = min(w.deadline for w in busy.values())
                ready = wait([w.stdout for w in busy.values()], timeout=max(0.0, next_deadline - now))
                for slot, worker in list(busy.items()):
                    if worker.stdout in ready:
                        stats.slowest_attempt_s = max(stats.slowest_attempt_s,
                                                      time.monotonic() - worker.started)
                        try:
                            job, grade = worker.receive()
                        except (EOFError, OSError, ValueError):  # the worker died (e.g. out of memory)
                            stats.worker_deaths += 1
                            failed(slot, worker)
                            continue
                        if job != worker.job:  # a reply that is not for this job: never trust it
                            stats.worker_deaths += 1
                            failed(slot, worker)
                            continue
                        results[job] = grade
                        del busy[slot]
                    elif time.monotonic() >= worker.deadline:
                        stats.timeouts += 1
                        stats.slowest_attempt_s = max(stats.slowest_attempt_s,
                                                      time.monotonic() - worker.started)
                        failed(slot, worker)
        finally:
            # An exception mid-loop (a worker that fails to start, a broken pipe) must not leave a
            # worker holding a reply that a later call would read as its own.
            for slot in busy:
                self._discard(slot)

    def _discard(self, slot: int) -> None:
        worker = self._workers[slot]
        if worker is not None:
            worker.kill()
            self._workers[slot] = None

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._lock:
            for i, worker in enumerate(self._workers):
                if worker is not None:
                    worker.kill()
                    self._workers[i] = None

    def __enter__(self) -> AnswerGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default_graders: dict[str, AnswerGrader] = {}
_default_lock = threading.Lock()


def default_grader(backend: str = "mathruler") -> AnswerGrader:
    """The process-wide grader of a backend, created lazily and closed at exit.

    Args:
        backend: "mathruler" (default, the paper's grader) or "math_verify".

    Returns:
        An AnswerGrader with one worker and the default timeout (5 s per answer).
    """
    with _default_lock:
        if backend not in _default_graders:
            _default_graders[backend] = AnswerGrader(backend)
        return _default_graders[backend]


@atexit.register
def _close_default_graders() -> None:
    for grader in _default_graders.values():
        grader.close()


# ---------------------------------------------------------------------- rewards


def accuracy_reward(response: str, ground_truth: str, *, grader: AnswerGrader | None = None) -> float:
    """1.0 if the last \\boxed{} of the response grades equal to the ground truth, else 0.0.

    Args:
        response: the (normalized, see `normalize_response`) response text.
        ground_truth: the reference answer.
        grader: an AnswerGrader; None uses `default_grader()` (MathRuler).

    Returns:
        1.0 or 0.0 (0.0 on timeout).
    """
    _check_str("response", response)
    _check_str("ground_truth", ground_truth)
    grader = grader or default_grader()
    return 1.0 if grader.grade(extract_boxed(response), ground_truth) else 0.0


def compute_score(responses: Sequence[str], ground_truths: Sequence[str], *, format_weight: float = 0.1,
                  grader: AnswerGrader | None = None) -> list[dict[str, float]]:
    """The official batch reward: overall = (1 - format_weight) * accuracy + format_weight * format.

    Args:
        responses: decoded responses (str each).
        ground_truths: reference answers (str each), one per response.
        format_weight: in [0, 1]; official 0.1.
        grader: an AnswerGrader (e.g. with several workers); None uses `default_grader()`.

    Returns:
        One dict per response with "overall", "format" and "accuracy" (floats); "overall" is the
        reward the advantages use, "accuracy" what the online filter and evaluation use.
    """
    if isinstance(responses, str) or not isinstance(responses, Sequence):
        raise TypeError(f"responses must be a sequence of str, got {type(responses).__name__}")
    if isinstance(ground_truths, str) or not isinstance(ground_truths, Sequence):
        raise TypeError(f"ground_truths must be a sequence of str, got {type(ground_truths).__name__}")
    if len(responses) != len(ground_truths):
        raise ValueError(f"responses ({len(responses)}) and ground_truths ({len(ground_truths)}) "
                         "must have the same length")
    if isinstance(format_weight, bool) or not isinstance(format_weight, (int, float)) \
            or not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight!r}")
    normalized = [normalize_response(_check_str(f"responses[{i}]", r)) for i, r in enumerate(responses)]
    truths = [_check_str(f"ground_truths[{i}]", t) for i, t in enumerate(ground_truths)]
    grader = grader or default_grader()
    correct = grader.grade_many([(extract_boxed(r), t) for r, t in zip(normalized, truths)])
    scores = []
    for response, ok in zip(normalized, correct):
        fmt = format_reward(response)
        acc = 1.0 if ok else 0.0
        scores.append({"overall": (1.0 - format_weight) * acc + format_weight * fmt,
                       "format": fmt, "accuracy": acc})
    return scores
