"""dane-relay: an outbound SMTP relay that enforces DANE for SMTP (RFC 7672)."""

__version__ = "0.1.0"
