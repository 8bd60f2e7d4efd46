"""The one place that reaches past the public ssl API: the server's full presented chain.

Python 3.13 has `SSLObject.get_unverified_chain()` (DER bytes). On 3.10-3.12 the same
method lives on the private `_sslobj` and returns `_ssl.Certificate` objects. Without
either, or when the chain is empty (a resumed session), only the leaf is available
(`getpeercert(binary_form=True)`).
"""

from __future__ import annotations

import _ssl
import ssl
from typing import Any

_DER: int = getattr(_ssl, "ENCODING_DER", 2)


def _der(cert: Any) -> bytes:
    if isinstance(cert, bytes | bytearray):
        return bytes(cert)
    return bytes(cert.public_bytes(_DER))


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The certificates the server presented, DER, leaf first, unverified."""
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = [_der(c) for c in (getter() or ())]
        if chain:
            return chain
    # A resumed session presents no certificates; OpenSSL still knows the leaf.
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []
