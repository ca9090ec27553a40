"""What of an answer may reach sympy in the grading workers (`papo._grading_worker`).

MathRuler grades answers that differ as text by parsing `(truth)-(given)` with sympy's
`parse_expr`, which rewrites the text into Python source and evaluates it, and sympy evaluates
integer arithmetic eagerly. A response can therefore try to run code, or build a number that
takes minutes and gigabytes (9**9**9, a factorial of 10**9, a power tower hidden in brackets).
`safe_parse` replaces MathRuler's `_sympy_parse`: it builds the same Python source with the same
transformations, checks it, and only then evaluates it. A refusal raises `UnsafeAnswer`, which
MathRuler treats as it treats any unparsable answer (not equal), so answers that pass grade
exactly as before. The checks, in order:

- at most MAX_CHARS characters of printable ASCII: Python folds look-alike letters in names
  (NFKC: fullwidth letters, roman numerals, ligatures) into ASCII ones, so anything else could
  spell names and attributes that a text filter never sees;
- none of the characters and words of `papo.rewards._UNSAFE_EXPR` (quotes, brackets, braces,
  `=`, `;`, `:`, backslashes, `__`, attribute access, `lambda`);
- at most MAX_DEPTH nested parentheses (the Python parser gives up at 200, with a C-level
  recursion on the way);
- in the generated Python: only numbers, symbols, arithmetic operators, unary signs,
  comparisons, tuples and calls of ALLOWED_CALLS, names from ALLOWED_NAMES, at most MAX_NODES
  nodes;
- numeric literals have decimal exponents within +-MAX_LITERAL_EXPONENT (reading 1e999999 as
  a sympy Float takes minutes);
- what evaluating and simplifying may build stays small, bounded from above through the tree
  before anything is evaluated: exponents at most MAX_EXPONENT, factorials of at most
  MAX_FACTORIAL, at most MAX_DIGITS digits in any exact number, at most MAX_ROOT_DIGITS in a
  number under a root or a function (sympy looks for its perfect-power factors), polynomials of
  degree at most MAX_DEGREE (simplify may expand them) and functions nested at most
  MAX_CALL_DEPTH deep.
"""

from __future__ import annotations

import ast
import builtins
import decimal
import math
import types
from typing import NamedTuple

from papo.rewards import _UNSAFE_EXPR

MAX_CHARS = 2_100  # two answers of DEFAULT_MAX_ANSWER_CHARS in "(truth)-(given)"
MAX_DEPTH = 24
MAX_NODES = 2_000
MAX_LITERAL_EXPONENT = 1_000
MAX_EXPONENT = 10_000
MAX_FACTORIAL = 1_000
MAX_DIGITS = 20_000
MAX_ROOT_DIGITS = 300
MAX_DEGREE = 100
MAX_CALL_DEPTH = 6

# Calls sympy's transformations generate (numbers, symbols) and the functions of ordinary answers.
ALLOWED_CALLS = frozenset({
    "Integer", "Float", "Rational", "Number", "Symbol", "Function",
    "sqrt", "factorial", "abs", "Abs", "max", "min", "exp", "log", "ln",
    "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan",
})
ALLOWED_NAMES = ALLOWED_CALLS | {"pi", "E", "I", "oo", "zoo", "nan"}
# Calls whose arguments are literal text (the name or digits of what they build).
_LITERAL_CALLS = frozenset({"Integer", "Float", "Rational", "Number", "Symbol", "Function"})
# Functions sympy evaluates on an integer argument without factoring it.
_CHEAP_CALLS = frozenset({"abs", "Abs", "max", "min", "factorial"})
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.FloorDiv, ast.Pow)
_COMPARISONS = (ast.Lt, ast.Gt, ast.LtE, ast.GtE)


class UnsafeAnswer(ValueError):
    """An answer that may not be evaluated; the message says which rule refused it."""


def _parse_namespace() -> dict:
    """The globals sympy's `parse_expr` builds when given none (sympy 1.x)."""
    from sympy import Max, Min

    namespace: dict = {}
    exec("from sympy import *", namespace)  # noqa: S102 - sympy's own namespace, no user text
    for name, obj in vars(builtins).items():
        if isinstance(obj, types.BuiltinFunctionType):
            namespace[name] = obj
    namespace["max"], namespace["min"] = Max, Min
    return namespace


_namespace: dict | None = None


class _Size(NamedTuple):
    """Upper bounds for one subexpression, computed before anything is evaluated."""

    magnitude: float  # log10 of |value| (a symbol counts as < 10: its value is never computed)
    digits: float  # digits of the exact numbers it builds (a Float has a fixed precision: 0)
    degree: float  # polynomial degree in its symbols (what expanding it would produce)
    calls: int  # nested applications of functions such as sqrt or sin


_SYMBOL = _Size(1.0, 0.0, 1.0, 0)


def _literal(text: str, *, exact: bool = True) -> _Size:
    """The size of a numeric literal as sympy's transformations write it (Integer(7), Float('2.5'))."""
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise UnsafeAnswer(f"not a numeric literal: {text[:40]!r}") from None
    if not value.is_finite():
        return _Size(0.0, 0.0, 0.0, 0)
    if "e" in text.lower() and abs(value.adjusted()) > MAX_LITERAL_EXPONENT:
        raise UnsafeAnswer(f"a literal of magnitude 10**{value.adjusted()}; "
                           f"at most 10**{MAX_LITERAL_EXPONENT} is allowed")
    magnitude = float(abs(value).log10()) if abs(value) >= 1 else 0.0
    return _Size(magnitude, float(len(value.as_tuple().digits)) if exact else 0.0, 0.0, 0)


def _is_integer_literal(node: ast.AST) -> bool:
    while isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        node = node.operand
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer"


def _combine(parts: list[_Size]) -> _Size:
    if not parts:
        return _Size(0.0, 0.0, 0.0, 0)
    return _Size(max(p.magnitude for p in parts), sum(p.digits for p in parts),
                 max(p.degree for p in parts), max(p.calls for p in parts))


class _Bounds:
    """Walks the generated syntax tree, refusing (UnsafeAnswer) what breaks a rule."""

    def __init__(self) -> None:
        self.nodes = 0

    def __call__(self, node: ast.AST) -> _Size:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise UnsafeAnswer(f"more than {MAX_NODES} syntax nodes")
        if isinstance(node, ast.Expression):
            return self(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return _literal(repr(node.value))
        if isinstance(node, ast.Name):
            if node.id not in ALLOWED_NAMES:
                raise UnsafeAnswer(f"name {node.id!r} is not allowed")
            return _SYMBOL
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            return self(node.operand)
        if isinstance(node, ast.Tuple):
            return _combine([self(e) for e in node.elts])
        if isinstance(node, ast.Compare) and all(isinstance(op, _COMPARISONS) for op in node.ops):
            return _combine([self(e) for e in (node.left, *node.comparators)])
        if isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC):
            return self._binop(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise UnsafeAnswer(f"{type(node).__name__} is not plain arithmetic")

    def _binop(self, node: ast.BinOp) -> _Size:
        left, right = self(node.left), self(node.right)
        calls = max(left.calls, right.calls)
        if isinstance(node.op, ast.Pow):
            if right.magnitude > math.log10(MAX_EXPONENT) + 1e-9:
                raise UnsafeAnswer(f"an exponent may reach 10**{right.magnitude:.0f}; at most {MAX_EXPONENT} "
                                   "is allowed")
            exponent = 10.0 ** right.magnitude
            if left.digits > MAX_ROOT_DIGITS and not _is_integer_literal(node.right):
                raise UnsafeAnswer(f"a root of a number with up to {left.digits:.0f} digits; at most "
                                   f"{MAX_ROOT_DIGITS} are allowed")
            size = _Size(left.magnitude * exponent, max(left.digits, 1.0) * exponent + right.digits,
                         left.degree * exponent + right.degree, calls)
        else:
            if isinstance(node.op, (ast.Add, ast.Sub)):
                magnitude, degree = max(left.magnitude, right.magnitude) + 1.0, max(left.degree, right.degree)
            elif isinstance(node.op, ast.Mult):
                magnitude, degree = left.magnitude + right.magnitude, left.degree + right.degree
            elif isinstance(node.op, ast.Div):  # dividing by p/q multiplies by at most q
                magnitude, degree = left.magnitude + right.digits, left.degree + right.degree
            else:  # % and //
                magnitude, degree = left.magnitude, max(left.degree, right.degree)
            # a rational sum or product has at most the digits of both
            size = _Size(magnitude, left.digits + right.digits, degree, calls)
        if size.digits > MAX_DIGITS:
            raise UnsafeAnswer(f"a number may have {size.digits:.0f} digits; "
                               f"at most {MAX_DIGITS} are allowed")
        if size.degree > MAX_DEGREE:
            raise UnsafeAnswer(f"a polynomial of degree up to {size.degree:.0f}; "
                               f"at most {MAX_DEGREE} is allowed")
        return size

    def _call(self, node: ast.Call) -> _Size:
        func = node.func
        if isinstance(func, ast.Call):  # Function('f')(x): an undefined function applied
            if not (isinstance(func.func, ast.Name) and func.func.id == "Function"):
                raise UnsafeAnswer("only undefined functions may be applied")
            self(func)
            name = "applied function"
        elif isinstance(func, ast.Name) and func.id in ALLOWED_CALLS:
            name = func.id
        else:
            raise UnsafeAnswer(f"calling {ast.unparse(func)[:40]!r} is not allowed")
        if node.keywords:
            raise UnsafeAnswer("keyword arguments are not allowed")
        if name in _LITERAL_CALLS:
            if not all(isinstance(a, ast.Constant) and isinstance(a.value, (str, int))
                       and not isinstance(a.value, bool) for a in node.args):
                raise UnsafeAnswer(f"{name} takes literal arguments only")
            if name in ("Symbol", "Function"):
                return _SYMBOL
            return _combine([_literal(str(a.value), exact=name != "Float") for a in node.args])
        inner = _combine([self(a) for a in node.args])
        if name not in _CHEAP_CALLS and inner.digits > MAX_ROOT_DIGITS:
            raise UnsafeAnswer(f"{name} of a number with up to {inner.digits:.0f} digits; at most "
                               f"{MAX_ROOT_DIGITS} are allowed")
        if inner.calls + 1 > MAX_CALL_DEPTH:
            raise UnsafeAnswer(f"functions nested more than {MAX_CALL_DEPTH} deep")
        if name == "factorial":
            if inner.magnitude > math.log10(MAX_FACTORIAL) + 1e-9:
                raise UnsafeAnswer(f"a factorial of up to 10**{inner.magnitude:.0f}; "
                                   f"at most {MAX_FACTORIAL}! is allowed")
            n = 10.0 ** inner.magnitude
            grown = n * math.log10(max(n, 2.0))  # digits of n!
            return _Size(grown, inner.digits + grown, inner.degree * n, inner.calls + 1)
        return inner._replace(calls=inner.calls + 1)


def check_text(expr: str) -> None:
    """The textual checks (length, ASCII, forbidden characters and words, nesting)."""
    if len(expr) > MAX_CHARS:
        raise UnsafeAnswer(f"longer than {MAX_CHARS} characters")
    if not (expr.isascii() and expr.isprintable()):
        raise UnsafeAnswer("not printable ASCII")
    found = _UNSAFE_EXPR.search(expr)
    if found:
        raise UnsafeAnswer(f"contains {found.group(0)!r}")
    depth = deepest = 0
    for ch in expr:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise UnsafeAnswer(f"{deepest} nested parentheses; at most {MAX_DEPTH} are allowed")


def checked_code(expr: str) -> ast.Expression:
    """The Python that sympy's parse_expr (MathRuler's transformations) would evaluate for `expr`,
    as a syntax tree, after every check; UnsafeAnswer if any check refuses it."""
    global _namespace
    from sympy.parsing import sympy_parser as sp

    check_text(expr)
    if _namespace is None:
        _namespace = _parse_namespace()
    transformations = sp.standard_transformations + (sp.implicit_multiplication_application,)
    try:
        code = sp.stringify_expr(expr, {}, _namespace, transformations)
        tree = ast.parse(code, mode="eval")
    except Exception as e:  # noqa: BLE001 - SyntaxError, tokenize's TokenError, ...: not an expression
        raise UnsafeAnswer(f"not an expression ({type(e).__name__})") from None
    _Bounds()(tree)
    return tree


def safe_parse(expr: str):
    """Drop-in for MathRuler's `_sympy_parse`: `^` is `**`, then sympy's parse after `checked_code`."""
    tree = checked_code(expr.replace("^", "**"))
    return eval(compile(tree, "<answer>", "eval"), _namespace, {})  # noqa: S307 - checked above
