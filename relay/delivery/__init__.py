"""Delivery: the scheduler (due work, limits, leases, NDRs and delay warnings), the plan
for one destination domain (.destination), one attempt over its MX hosts (.attempt), the
connection cache (.connpool), and the pure decisions: per-host verdicts (.verdict),
failure classification (.classify), the retry plan (.retry), RFC 3464 reports (.dsn) and
REQUIRETLS (.requiretls).

May import: the base, relay.dane, relay.dns, relay.smtp, relay.store, relay.sts (MTA-STS
policies and the web-PKI check). Never relay.intake,
relay.tlsrpt, relay.check, relay.ops (TLS reporting plugs in through a hook that
relay.app passes to the scheduler).
"""
