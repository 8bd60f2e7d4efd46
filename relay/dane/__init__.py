"""DANE for SMTP (RFC 7672), pure: TLSA records (.tlsa), certificate names (.names),
matching a presented chain (.match: `verify(records, chain, names, now) -> Verdict`), and
the per-host policy derived from DNS facts (.policy).

Pure: imports no asyncio, socket, ssl or aiosqlite, and reads no clock (`now` is passed
in). May import: the base only (relay.codes, relay.model, relay.config, relay.errors).

`relay.dane.verify` is public API (the conformance runner in ../shared calls it).
"""

from relay.dane.match import Verdict, verify
from relay.dane.names import leaf_names, name_matches
from relay.dane.tlsa import (
    association_data,
    digest_agility,
    parse_tlsa_rdata,
    spki_der,
    usable,
    usable_records,
)

__all__ = [
    "Verdict",
    "association_data",
    "digest_agility",
    "leaf_names",
    "name_matches",
    "parse_tlsa_rdata",
    "spki_der",
    "usable",
    "usable_records",
    "verify",
]
