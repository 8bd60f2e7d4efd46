"""DNSSEC-aware resolution: answers carry records, their security (the resolver's AD
bit), rcode and Extended DNS Errors (.resolve: transport, cache, the validation probe;
.wire: pure parsing of DNS messages into those answers).

May import: the base and relay.dane (TLSA record parsing). Never relay.store,
relay.intake, relay.delivery or above.
"""
