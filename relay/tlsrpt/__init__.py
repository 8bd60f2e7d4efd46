"""SMTP TLS reporting (RFC 8460): what one attempt adds to a report and the report
itself (.report, pure), the report mail (.mail), and the reporter component that records
results, closes periods and sends reports by mail or HTTPS (.reporter).

May import: the base, relay.dane, relay.dns, relay.store, relay.sts (the pinned HTTPS
client), relay.delivery.
"""
