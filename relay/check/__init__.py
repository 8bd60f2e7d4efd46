"""`relay check DOMAIN`: the delivery worker's DNS, DANE and SMTP steps against one
domain without sending mail (.probe), and their rendering as text or JSON (.render).

May import: the base, relay.dane, relay.dns, relay.smtp, relay.sts (MTA-STS lookups),
relay.delivery (the plan and the per-host verdicts it shares with delivery). Only
relay.cli imports it.
"""
