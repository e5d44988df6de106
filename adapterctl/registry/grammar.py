"""How registry names, aliases and references are spelled.

A reference is ``name`` (its newest live version), ``name@latest``, ``name@3``, ``name@alias``
or ``sha256:<prefix>`` (of a version digest or of an adapter digest). This module only parses;
``lookups`` finds what a reference names. (``adapterctl.refs`` is another thing: it turns any
SOURCE string, path or ``hf://`` included, into a local adapter.)
"""

from __future__ import annotations

import re
from typing import NamedTuple

from adapterctl.errors import UsageError

RESERVED_ALIASES = ("latest",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<sel>[A-Za-z0-9][A-Za-z0-9._-]*))?$"
)
_DIGEST_REF = re.compile(r"^sha256:(?P<hex>[0-9a-fA-F]{1,64})$")


class NameRef(NamedTuple):
    """``name`` or ``name@selector`` (a number, ``latest`` or an alias)."""

    name: str
    selector: str | None


class DigestRef(NamedTuple):
    """``sha256:<prefix>``; ``prefix`` is lower-case hex."""

    prefix: str


def parse_ref(text: str) -> NameRef | DigestRef | None:
    """Split a registry reference into its parts.

    Args:
        text: the reference.

    Returns:
        A ``DigestRef`` for ``sha256:<prefix>``, a ``NameRef`` for ``name[@selector]``, None
        when ``text`` is not spelled like a reference.

    Example:
        >>> parse_ref("chat@prod")
        NameRef(name='chat', selector='prod')
    """
    m = _DIGEST_REF.fullmatch(text)
    if m:
        return DigestRef(m["hex"].lower())
    r = _REF.fullmatch(text)
    if r:
        return NameRef(r["name"], r["sel"])
    return None


def is_ref(text: str) -> bool:
    """True if ``text`` is spelled like a registry reference (``name``, ``name@3``,
    ``name@prod``, ``sha256:<prefix>``)."""
    return parse_ref(text) is not None


def check_name(name: str) -> None:
    """Refuse an adapter name the registry cannot store.

    Raises:
        UsageError: ``name`` is not letters, digits, '.', '_' and '-' starting with a letter
            or digit, up to 128 characters (2).
    """
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"{name!r} is not a valid adapter name; use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit)"
        )


def check_alias(alias: str) -> None:
    """Refuse a reserved or badly spelled alias.

    Raises:
        UsageError: ``alias`` is ``latest``, or does not start with a letter, or holds
            other characters than letters, digits, '.', '_' and '-' (2).
    """
    if alias in RESERVED_ALIASES:
        raise UsageError(
            f"'{alias}' always means the newest live version and cannot be set; pick another alias"
        )
    if not _ALIAS.fullmatch(alias):
        raise UsageError(
            f"{alias!r} is not a valid alias; start with a letter, then letters, digits, "
            "'.', '_' or '-' (a number would clash with version numbers)"
        )
