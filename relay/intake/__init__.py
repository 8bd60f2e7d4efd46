"""The smarthost listener: the shared intake state and policy (.core: limits, the
connection reserve for trusted clients, the hand-off to the queue), the asyncio listener
(.listener), one aiosmtpd session (.session) with its timers (.timers: command, partial
line, stress), STARTTLS and AUTH (.tlsauth, .auth: the scrypt users file, .throttle:
failed AUTH per address), RFC 5321 address rules (.address), DATA reading (.data), the
memory budget for messages in flight (.budget) and the Received: header (.received).

May import: the base only; the queue is reached through the MessageSink protocol that
relay.app fills with the store. Never relay.delivery, relay.store or above.
"""
