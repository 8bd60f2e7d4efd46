"""MTA-STS (RFC 8461): authenticated TLS for destinations that publish a policy over
HTTPS instead of signing their DNS.

Pure parts: the `_mta-sts` TXT record and the policy text (.record), the web-PKI check
of an MX certificate (.webpki), and the decisions (.decide: what the cache says to do,
what a policy demands of each MX host, beside DANE). I/O parts: the pinned HTTPS client
(.web, also used for TLS-RPT's HTTPS reports), the policy fetch, and the source of
policies for delivery and `relay check` with its cache in the store and its background
refresh (.source).

May import: the base, relay.dane (certificate names, the per-host plan), relay.dns (the
validating resolver), relay.store (the policy cache). Never relay.delivery or above.
"""
