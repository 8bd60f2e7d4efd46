"""The relay's own outbound SMTP client: a sans-I/O core (.protocol), an asyncio driver
(.client, .stream) and the peer-chain compatibility shim (.tlscompat).

May import: the base only.
"""

from relay.smtp.client import SmtpSession, Timeouts, client_context
from relay.smtp.protocol import Extensions, Reply, TlsInfo, TransactionResult

__all__ = [
    "Extensions",
    "Reply",
    "SmtpSession",
    "Timeouts",
    "TlsInfo",
    "TransactionResult",
    "client_context",
]
