"""Hypothesis strategies for bad input: valid encodings with mutations, and raw bytes.

Random bytes alone rarely get past a decoder's first length check, so most
strategies here start from a valid encoding and break it in one or a few
places, the way a buggy or hostile peer would: cut it short, extend it,
overwrite bytes, or replace a 32-bit length field with an extreme value.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

# Length values that sit on the edges decoders get wrong.
EXTREME_UINT32 = (0, 1, 2, 3, 4, 5, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)

MAX_EXTRA_BYTES = 64


@st.composite
def _truncated(draw: st.DrawFn, data: bytes) -> bytes:
    return data[: draw(st.integers(0, max(len(data) - 1, 0)))]


@st.composite
def _extended(draw: st.DrawFn, data: bytes) -> bytes:
    return data + draw(st.binary(min_size=1, max_size=MAX_EXTRA_BYTES))


@st.composite
def _overwritten(draw: st.DrawFn, data: bytes) -> bytes:
    if not data:
        return draw(st.binary(min_size=1, max_size=8))
    mutated = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        mutated[draw(st.integers(0, len(mutated) - 1))] = draw(st.integers(0, 255))
    return bytes(mutated)


@st.composite
def _bad_length_field(draw: st.DrawFn, data: bytes) -> bytes:
    """Replace four bytes at some offset, often a length prefix, with an extreme or off-by-one value."""
    if len(data) < 4:
        return data + struct.pack(">I", draw(st.sampled_from(EXTREME_UINT32)))
    offset = draw(st.integers(0, len(data) - 4))
    (current,) = struct.unpack(">I", data[offset : offset + 4])
    value = draw(
        st.one_of(
            st.sampled_from(EXTREME_UINT32),
            st.sampled_from([(current + delta) % 2**32 for delta in (-2, -1, 1, 2)]),
            st.just(len(data) - offset - 4),
            st.just(len(data)),
        )
    )
    return data[:offset] + struct.pack(">I", value) + data[offset + 4 :]


@st.composite
def _spliced(draw: st.DrawFn, data: bytes) -> bytes:
    """Delete, duplicate or insert a slice."""
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, len(data)))
    match draw(st.sampled_from(["delete", "duplicate", "insert"])):
        case "delete":
            return data[:start] + data[end:]
        case "duplicate":
            return data[:end] + data[start:end] + data[end:]
        case _:
            return data[:start] + draw(st.binary(min_size=1, max_size=16)) + data[start:]


def mutations_of(data: bytes) -> st.SearchStrategy[bytes]:
    """Return a strategy of one mutation of ``data``."""
    return st.one_of(
        _truncated(data), _extended(data), _overwritten(data), _bad_length_field(data), _spliced(data)
    )


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Return a strategy of valid encodings with one to three mutations applied."""

    @st.composite
    def apply(draw: st.DrawFn) -> bytes:
        data = draw(valid)
        for _ in range(draw(st.integers(1, 3))):
            data = draw(mutations_of(data))
        return data

    return apply()


def bad_input(valid: st.SearchStrategy[bytes], max_random_size: int = 256) -> st.SearchStrategy[bytes]:
    """Return random bytes, valid encodings and mutated valid encodings."""
    return st.one_of(st.binary(max_size=max_random_size), valid, mutated(valid))


def ssh_strings(max_size: int = 64) -> st.SearchStrategy[bytes]:
    """Return byte strings that are often short ASCII names, sometimes anything."""
    return st.one_of(
        st.binary(max_size=max_size),
        st.text(alphabet=st.characters(codec="ascii"), max_size=max_size).map(str.encode),
    )


def utf8_text(max_size: int = 64) -> st.SearchStrategy[str]:
    """Return text that encodes to UTF-8: no lone surrogates."""
    return st.text(alphabet=st.characters(codec="utf-8"), max_size=max_size)


def decoded_or_rejected(decode, data, rejections: tuple[type[Exception], ...]):
    """Return ``decode(data)``, or None when it raises one of ``rejections`` with a message.

    Any other exception propagates, so Hypothesis reports it with the input.
    """
    return called_or_rejected(lambda: decode(data), rejections)


def called_or_rejected(call, rejections: tuple[type[Exception], ...]):
    """Return ``call()``, or None when it raises one of ``rejections`` with a message."""
    try:
        return call()
    except rejections as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None
