"""Errors in a user's words: what the engine says for the command line (its flags, its hints) said as
the server's users can act on it, on one line, without exception class names."""

from __future__ import annotations

import re

from stable_cascade.engine import OFFLINE_HINT

#: What to do about a model that is not here, for the server's users.
SERVER_OFFLINE_HINT = (
    "this server has no copy of it and cannot download it now; choose another model (demo works "
    "offline), or ask the server's administrator to download it"
)
_FLAG_IN_BRACKETS = re.compile(r"\s*\([^()]*--[^()]*\)")
_FLAG_ALTERNATIVE = re.compile(r",? or [^;,]*--[^;]*")


def for_users(message: str) -> str:
    """``message`` on one line, with command-line advice left out or said for the server."""
    text = " ".join(message.replace(OFFLINE_HINT, SERVER_OFFLINE_HINT).split())
    text = _FLAG_ALTERNATIVE.sub("", _FLAG_IN_BRACKETS.sub("", text))
    clauses = [clause for clause in text.split("; ") if "--" not in clause]
    return "; ".join(clauses) if clauses else text


def job_error(error: BaseException, expected: bool) -> str:
    """Why a job failed: an expected error's message, else that something unexpected happened."""
    message = for_users(str(error)) or "no reason given"
    if expected:
        return message
    return f"the server met an unexpected error ({message}); its log has the details"
