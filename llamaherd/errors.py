"""The one user-facing error type.

Library code raises ``HerdError`` for anything a user can fix (a missing file, a malformed
value, an impossible option). The CLI prints ``error: <message>`` on one line and exits 2;
anything else is a bug and keeps its traceback.
"""


class HerdError(Exception):
    """A problem with the user's input, stated in one line: what, where, and what was expected."""
