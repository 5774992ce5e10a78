"""Text from peers, escaped before a terminal, a log or a dialog shows it.

A terminal acts on control characters: ESC starts a sequence that can move
the cursor, clear the screen, set the window title or hide text, and C1
codes such as CSI (U+009B) do the same on some terminals.  Bidirectional
controls such as U+202E reorder what follows.  So text that a peer chose
(a command line, a user or host name, an SSHSIG namespace) is escaped
before anyone is shown it.
"""

from __future__ import annotations


def escape_nonprintable(text: str) -> str:
    """Return ``text`` with each character that ``str.isprintable`` rejects replaced by a Python-style escape.

    Characters below U+0100 become ``\\xNN`` and the others ``\\uNNNN`` or
    ``\\UNNNNNNNN``.  Besides the C0 and C1 controls and DEL, Python counts
    format characters (such as U+202E), surrogates, unassigned code points
    and separators other than the ASCII space as not printable.
    """
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else _escape(character) for character in text)


def _escape(character: str) -> str:
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
