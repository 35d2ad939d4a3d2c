"""Deciding whether a short answer string equals a ground truth, without ``eval``.

Each side is reduced to a *canonical answer* and the two are compared:

- ``("num", values)``: an exact rational (:class:`fractions.Fraction`) from a tiny
  recursive-descent parser over numbers, ``+ - * / ^``, ``\\cdot``, ``\\times``, ``\\div``,
  ``\\frac{}{}`` (``\\dfrac``, ``\\tfrac``, ``\\frac12``), ``\\sqrt{}`` of perfect squares,
  parentheses and braces. No implicit multiplication. A trailing percent sign gives the two
  readings ``{p, p/100}``; numbers are equal when the value sets meet. Equality is exact:
  ``0.5 == 1/2`` but ``0.33 != 1/3``.
- ``("choice", letter)``: a multiple-choice letter written ``B``, ``(B)``, ``B.``, ``B)``,
  ``B:`` (optionally followed by the option text, e.g. ``B. 12 cm``).
- ``("tuple", brackets, parts)``: top-level comma-separated parts, compared in order, bracket
  style included (so ``[1,2)`` differs from ``(1,2)``).
- ``("str", text)``: anything else, whitespace removed and case-folded.

Normalisation before parsing: ``$``, ``\\left``/``\\right``, LaTeX spacing and
``\\displaystyle`` removed; ``\\text{}``, ``\\mathrm{}`` and similar wrappers unwrapped;
degree marks (``^\\circ``, ``°``) removed; a trailing period removed; a single leading
``x =`` style assignment dropped; thousands separators (``1,000``) removed; trailing unit
words after a number (``12 cm``, ``12\\text{ cm}``) dropped. A ``\\boxed{}`` inside the
string (ground truths are sometimes stored boxed) is unwrapped first.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from functools import lru_cache

from specs_jax.rewards.extract import last_boxed
from specs_jax.rewards.limits import MAX_ANSWER_CHARS, MAX_DIGITS, MAX_PARSE_DEPTH, MAX_POWER_BITS

Canonical = tuple
"""One of ``("num", frozenset[Fraction])``, ``("choice", str)``,
``("tuple", str, tuple[Canonical, ...])`` or ``("str", str)``."""

_REMOVE = re.compile(r"\\left|\\right|\\displaystyle|\\[,;:! ]|\$|~")
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d)")
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*([^=]+)$")
_CHOICE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.:)])(?:\s.*)?$|^([A-Z])$", re.DOTALL)
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_UNIT_TAIL = re.compile(r"^(.*?[\d}])\s+[A-Za-z][A-Za-z0-9^/ ]*$")
_PERCENT = re.compile(r"\\?%$")
_TOKEN = re.compile(
    r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\\frac|\\cdot|\\times|\\div|\\sqrt)(?![A-Za-z])|([-+*/^(){}]))"
)
_BRACKETS = {"(": ")", "[": "]", "{": "}"}


class _ParseError(ValueError):
    """The string is not a number expression this parser accepts."""


def _tokenize(text: str) -> list[str]:
    """Split ``text`` into number, command and operator tokens; raise on anything else."""
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            if text[pos:].isspace():
                break
            raise _ParseError(f"unexpected character {text[pos]!r}")
        number = match.group(1)
        if number is not None and len(number) > MAX_DIGITS:
            raise _ParseError("number literal too long")
        tokens.append(match.group(1) or match.group(2) or match.group(3))
        pos = match.end()
    return tokens


class _Parser:
    """Recursive descent over the tokens with exact rational arithmetic and bounded depth.

    Grammar: ``expr := term (('+'|'-') term)*``; ``term := unary (('*'|'/'|'\\cdot'|
    '\\times'|'\\div') unary)*``; ``unary := ('+'|'-') unary | power``;
    ``power := atom ('^' unary)?``; ``atom := NUMBER | '(' expr ')' | '{' expr '}' |
    '\\frac' group group | '\\sqrt' group``; ``group := '{' expr '}' | NUMBER``.
    """

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def parse(self) -> Fraction:
        value = self._expr()
        if self.pos != len(self.tokens):
            raise _ParseError(f"unexpected token {self.tokens[self.pos]!r}")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise _ParseError("unexpected end of expression")
        self.pos += 1
        return token

    def _expect(self, token: str) -> None:
        if self._take() != token:
            raise _ParseError(f"expected {token!r}")

    def _descend(self) -> None:
        self.depth += 1
        if self.depth > MAX_PARSE_DEPTH:
            raise _ParseError("expression nested too deeply")

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            value = value + self._term() if self._take() == "+" else value - self._term()
        return value

    def _term(self) -> Fraction:
        value = self._unary()
        while self._peek() in ("*", "/", "\\cdot", "\\times", "\\div"):
            op = self._take()
            rhs = self._unary()
            if op in ("/", "\\div"):
                if rhs == 0:
                    raise _ParseError("division by zero")
                value = value / rhs
            else:
                value = value * rhs
        return value

    def _unary(self) -> Fraction:
        self._descend()
        if self._peek() in ("+", "-"):
            value = self._unary() if self._take() == "+" else -self._unary()
        else:
            value = self._power()
        self.depth -= 1
        return value

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek() != "^":
            return base
        self._take()
        exponent = self._unary()
        if exponent.denominator != 1:
            raise _ParseError("non-integer exponent")
        bits = max(base.numerator.bit_length(), base.denominator.bit_length(), 1)
        if abs(exponent.numerator) * bits > MAX_POWER_BITS:
            raise _ParseError("power too large")
        if base == 0 and exponent < 0:
            raise _ParseError("division by zero")
        return base ** exponent.numerator

    def _atom(self) -> Fraction:
        token = self._take()
        if token in ("(", "{"):
            value = self._expr()
            self._expect(")" if token == "(" else "}")
            return value
        if token == "\\frac":
            numerator, denominator = self._group(), self._group()
            if denominator == 0:
                raise _ParseError("division by zero")
            return numerator / denominator
        if token == "\\sqrt":
            return _exact_sqrt(self._group())
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token)
        raise _ParseError(f"unexpected token {token!r}")

    def _group(self) -> Fraction:
        if self._peek() == "{":
            self._take()
            value = self._expr()
            self._expect("}")
            return value
        token = self._take()
        if not token[0].isdigit():
            raise _ParseError("expected a braced group or a number")
        return Fraction(token)


def _exact_sqrt(value: Fraction) -> Fraction:
    """Square root of a rational that is a perfect square; raise otherwise."""
    if value < 0:
        raise _ParseError("square root of a negative number")
    num, den = math.isqrt(value.numerator), math.isqrt(value.denominator)
    if num * num != value.numerator or den * den != value.denominator:
        raise _ParseError("irrational square root")
    return Fraction(num, den)


def _parse_number(text: str) -> Fraction | None:
    """Exact value of ``text`` as a number expression, or None when it is not one."""
    try:
        return _Parser(_tokenize(text)).parse()
    except (_ParseError, ZeroDivisionError, ValueError, OverflowError):
        return None


def _normalize(text: str) -> str:
    """Strip LaTeX decoration that does not change the value (see the module docstring)."""
    text = text.replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _REMOVE.sub("", text)
    for _ in range(3):
        text = _WRAPPER.sub(lambda m: " " + m.group(1), text)
    text = _DEGREES.sub("", text)
    text = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _SQRT_SHORT.sub(r"\\sqrt{\1}", text)
    text = " ".join(text.split()).rstrip(".").strip()
    assignment = _ASSIGNMENT.match(text)
    return assignment.group(1).strip() if assignment else text


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside any bracket pair."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _canonical_scalar(text: str) -> Canonical:
    """Canonical form of one answer that is not a tuple."""
    choice = _CHOICE.match(text)
    if choice:
        return ("choice", next(g for g in choice.groups() if g))
    percent = _PERCENT.search(text)
    body = text[: percent.start()].strip() if percent else text
    if _THOUSANDS.match(body):
        body = body.replace(",", "")
    value = _parse_number(body)
    if value is None:
        unit = _UNIT_TAIL.match(body)
        value = _parse_number(unit.group(1)) if unit else None
    if value is not None:
        return ("num", frozenset({value, value / 100}) if percent else frozenset({value}))
    return ("str", "".join(text.split()).casefold())


def canonical_answer(text: str) -> Canonical | None:
    """Canonical form of an answer string (module docstring), or None when it is unusable.

    None for empty strings and strings over
    :data:`~specs_jax.rewards.limits.MAX_ANSWER_CHARS`; such answers never compare equal.
    Results are cached, since the rollouts of one prompt share a ground truth.
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be str, got {type(text).__name__}")
    return None if len(text) > MAX_ANSWER_CHARS else _canonical_cached(text)


@lru_cache(maxsize=16_384)
def _canonical_cached(text: str) -> Canonical | None:
    boxed = last_boxed(text)
    text = _normalize(boxed if boxed is not None else text)
    if not text:
        return None
    if not _THOUSANDS.match(text) and "," in text:
        inner, brackets = text, ""
        if text[0] in _BRACKETS and text[-1] in ")]}" and len(_split_top_level(text[1:-1])) > 1:
            inner, brackets = text[1:-1], text[0] + text[-1]
        parts = _split_top_level(inner)
        if len(parts) > 1:
            return ("tuple", brackets, tuple(_canonical_scalar(p.strip()) for p in parts))
    return _canonical_scalar(text)


def _canonical_equal(a: Canonical, b: Canonical) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "num":
        return not a[1].isdisjoint(b[1])
    if a[0] == "tuple":
        return a[1] == b[1] and len(a[2]) == len(b[2]) and all(map(_canonical_equal, a[2], b[2]))
    return a[1] == b[1]


def answers_equal(answer: str, ground_truth: str) -> bool:
    """True when ``answer`` and ``ground_truth`` have equal canonical forms (module docstring)."""
    a, b = canonical_answer(answer), canonical_answer(ground_truth)
    return a is not None and b is not None and _canonical_equal(a, b)

