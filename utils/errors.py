"""The one family of expected errors (bad data, bad checkpoint, bad flags, no device, ...).

Every error a user can cause and fix derives from :class:`UserError`. The
launcher of the scripts prints such an error as one line,
``<script>: error: <what> (<file>)``, and exits non-zero; anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An expected failure the user can fix; printed as one line, no traceback."""
