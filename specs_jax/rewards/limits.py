"""Size limits that bound the work done on one model response.

Every reward call is linear in the response length and the answer parser only ever sees at
most :data:`MAX_ANSWER_CHARS` characters, so a hostile response costs microseconds to
milliseconds and scores 0 instead of hanging.
"""

from __future__ import annotations

MAX_RESPONSE_CHARS = 131_072
"""Responses longer than this score 0 for format and accuracy (10240 tokens fit with room)."""

MAX_ANSWER_CHARS = 1_000
"""A ``\\boxed{}`` content or ground truth longer than this is never judged equal."""

MAX_DIGITS = 200
"""A number literal with more digits than this makes the numeric parse fail."""

MAX_PARSE_DEPTH = 32
"""Deeper nesting of braces, parentheses or exponents makes the numeric parse fail."""

MAX_POWER_BITS = 4_096
"""``a^n`` is computed only when ``|n| * bits(a)`` stays within this many bits."""
