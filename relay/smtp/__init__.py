"""The relay's own outbound SMTP client: a sans-I/O core (.protocol) and an asyncio driver."""

from relay.smtp.client import SmtpSession, Timeouts, TlsInfo, client_context
from relay.smtp.protocol import Extensions, Reply, TransactionResult

__all__ = [
    "Extensions",
    "Reply",
    "SmtpSession",
    "Timeouts",
    "TlsInfo",
    "TransactionResult",
    "client_context",
]
