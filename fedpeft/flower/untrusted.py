"""What the server does with a node's bytes and words before it trusts them: arrays are checked
against what it expects before they are decoded, and text is escaped before it reaches a log line
or a file."""

from __future__ import annotations

import math

from flwr.app import ArrayRecord

__all__ = ["ARRAY_HEADER_BYTES", "Shapes", "array_size_error", "node_text"]

Shapes = dict[str, tuple[int, ...]]  # tensor name -> the shape the server expects


def node_text(text: object, limit: int = 1000) -> str:
    """A node's own words (a refusal reason, an error), safe to put in the server's log and files:
    every character that is not printable (a newline, an ANSI escape, a NUL) is written as its
    escape sequence, so a node cannot forge a log line or colour the terminal; at most `limit`
    characters are kept."""
    text = str(text)[: 4 * limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:limit]


ARRAY_HEADER_BYTES = 1024  # an Array's bytes beyond its numbers (the .npy header) are far fewer


def array_size_error(record: ArrayRecord, shapes: Shapes) -> str | None:
    """Why a reply's arrays cannot be what the server expects, read before anything decodes them
    (every name expected, of the expected shape, in no more bytes than as many float64 numbers and
    a header), or None. A node that sends a 1 GB tensor is then dropped without the copies that
    decoding makes."""
    for name in record.keys():
        if name not in shapes:
            return f"unexpected tensor {node_text(name, 80)!r}"
        array, numel = record[name], math.prod(shapes[name])
        if tuple(array.shape) != shapes[name] or len(array.data) > 8 * numel + ARRAY_HEADER_BYTES:
            return (
                f"{name}: shape {tuple(array.shape)} in {len(array.data):,} bytes, expected {shapes[name]} "
                f"in at most {8 * numel + ARRAY_HEADER_BYTES:,}"
            )
    return None
