"""The one exception root of the project and its subclasses.

Exceptions are for the I/O edge; outcomes (delivered, deferred, bounced) are values
(see relay.model). Subclasses carry structured fields rather than formatted text only.
"""

from __future__ import annotations


class RelayError(Exception):
    """Root of every exception raised by dane-relay code."""


class ConfigError(RelayError):
    """The configuration is invalid. `source` names the file (or the environment)."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        super().__init__(message)
        self.source = source
        self.key = key


class StoreError(RelayError):
    """The queue store could not do what was asked."""


class StorageFull(StoreError):
    """The disk (or the database's page limit) is full: answer 452 4.3.1."""


class StorageUnavailable(StoreError):
    """The database is locked, read-only or otherwise failing: answer 451 4.3.0."""


class CorruptDatabase(StoreError):
    """quick_check failed (at start-up, or in the background after an unclean stop);
    the database is refused, never re-created."""


class NotFound(StoreError):
    """No message with that queue id."""


class DnsError(RelayError):
    """A DNS lookup failed at the I/O edge (translated into an answer value)."""


class SmtpClientError(RelayError):
    """The outbound SMTP session failed. Carries the phase and the remote reply."""

    def __init__(
        self,
        message: str,
        *,
        phase: str,
        code: int | None = None,
        reply: str | None = None,
    ):
        super().__init__(message)
        self.phase = phase
        self.code = code
        self.reply = reply


class TlsError(SmtpClientError):
    """The STARTTLS handshake failed or the server broke TLS rules."""


class TlsInjection(TlsError):
    """The server sent bytes after its 220 reply to STARTTLS, before the TLS handshake
    (a STARTTLS response injection, RFC 3207 §4.2, RFC 7672 §2.2): the session was
    aborted before anything was read as a TLS-protected reply."""


class CorruptMessage(StoreError):
    """A message read back from the queue is not what was accepted (its body no longer
    matches the digest stored at intake). It is held, never sent."""

    def __init__(self, message: str, *, message_id: str, detail: str):
        super().__init__(message)
        self.message_id = message_id
        self.detail = detail


class LeaseLost(StoreError):
    """This node no longer holds (or can no longer be sure to hold) the lease of the work
    in hand: another node may have taken it over. No SMTP transaction is started for it
    and nothing is recorded (the store fences such writes anyway)."""
