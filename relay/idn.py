"""Internationalized domain names: IDNA2008 with UTS #46 (non-transitional) mapping.

Python's built-in "idna" codec is IDNA2003: it maps ß to ss and final sigma to sigma and drops
zero-width joiners, so mail for `faß.de` would go to `fass.de` — another domain. The
`idna` package implements IDNA2008 (RFC 5891) with the UTS #46 mapping browsers use.
"""

from __future__ import annotations

import idna


def label_to_ascii(label: str) -> str:
    """One non-ASCII label as its A-label (`xn--…`); ValueError when it is not valid."""
    try:
        return idna.encode(label, uts46=True, transitional=False).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise ValueError(f"bad internationalized domain label: {exc}") from None


def to_ascii(domain: str) -> str:
    """The whole domain in ASCII (A-labels), lower case; ValueError when invalid."""
    return ".".join(label.lower() if label.isascii() else label_to_ascii(label)
                    for label in domain.split("."))
