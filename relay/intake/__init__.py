"""The smarthost listener: the shared intake state and policy (.core), the asyncio
listener (.listener), one aiosmtpd session (.session) with STARTTLS and AUTH
(.tlsauth, .auth: the scrypt users file), RFC 5321 address rules (.address), DATA
reading (.data) and the Received: header (.received).

May import: the base only; the queue is reached through the MessageSink protocol that
relay.app fills with the store. Never relay.delivery, relay.store or above.
"""
