"""JSON parsing for files that a person or another program may have damaged."""

from __future__ import annotations

import json


def parse_json(data: str | bytes) -> object:
    """Parse a JSON document; raise ValueError, with a message, for any malformed input.

    ``json.loads`` signals bad input with several exception types:
    JSONDecodeError for syntax, UnicodeDecodeError for bytes that are not
    UTF-8, a plain ValueError for an integer of more than 4300 digits
    (sys.get_int_max_str_digits), and RecursionError for arrays or objects
    nested about a thousand levels deep.  The first three are ValueErrors
    already; the last one becomes one here, so callers catch one type.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("the JSON document is nested too deeply") from None
