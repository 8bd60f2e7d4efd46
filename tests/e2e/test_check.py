"""`relay check DOMAIN` end to end: the command as a subprocess, a real validating Unbound over
signed test zones, real aiosmtpd destinations presenting generated certificates.

Every run the tests look at is started once, all together, by the `runs` fixture (the
subprocesses run in parallel); each test then checks one run's JSON or text. A parity test
runs relay.delivery.attempt's Deliverer and relay.check.probe's run_check in-process on the same
domains and requires the same code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.config import Config, build
from relay.delivery.attempt import Deliverer, DeliverySettings
from relay.dns.resolve import Resolver
from relay.model import Action
from tests.support.certs import Issued, make_ca, make_leaf
from tests.support.dnsbed import DnsBed, hostport
from tests.support.smtpd import Destination, start_group

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable

CA = make_ca("Check Root")
INTER = make_ca("Check Intermediate", issuer=CA)
OTHER = make_leaf(["someone.else.test"])
NOWHERE = "127.26.5.250"  # no server: hosts that must never be connected to

NAMES = ["ee", "ta", "mismatch", "tamissing", "pkix", "pkixnotls", "unsigned", "cleartext",
         "notlsa", "notlsa3", "insaddr", "cname", "nomx", "quiet", "noconn", "two1", "two2",
         "fallback", "faketls", "tlsrefused", "mayrefused"]
IP = {n: f"127.26.5.{i}" for i, n in enumerate(NAMES, start=1)}
SERVER_NAME = {n: f"mx.{n}.test" for n in NAMES}
SERVER_NAME.update({"insaddr": "mx.plainhost.test", "cname": "host.prov.test",
                    "nomx": "nomx.test", "two1": "mx1.two.test", "two2": "mx2.two.test",
                    "fallback": "mx2.fallback.test"})
CERT = {n: make_leaf([SERVER_NAME[n]], issuer=INTER) for n in NAMES}
STARTTLS = {n: n not in ("pkixnotls", "cleartext", "two1") for n in NAMES}
REPLIES: dict[str, dict[str, Any]] = {
    "faketls": {"starttls": "220 2.0.0 Ready"},  # says yes, then never starts TLS
    "tlsrefused": {"starttls": (454, "4.7.0 TLS not available")},
    "mayrefused": {"starttls": (454, "4.7.0 TLS not available")},
}


def tlsa311(cert: Issued) -> str:
    return "3 1 1 " + cert.tlsa_data(1, 1).hex()


def spki311(cert: Issued) -> str:
    return cert.tlsa_data(1, 1).hex()


@dataclass
class World:
    port: int
    dests: dict[str, Destination]
    bed: DnsBed
    cfg_path: Path
    cfg: Config
    work: Path


def zones(bed: DnsBed, port: int) -> None:
    tcp = f"_{port}._tcp"

    def simple(name: str, *, tlsa: str | None = None, signed: bool = True,
               nsec3: bool = False, addr: str | None = None) -> Any:
        z = bed.zone(f"{name}.test", signed=signed, nsec3=nsec3)
        z.add("@", "MX", f"10 mx.{name}.test.").add("mx", "A", addr or IP.get(name, NOWHERE))
        if tlsa:
            z.add(f"{tcp}.mx", "TLSA", tlsa)
        return z

    for n in ("ee", "quiet", "noconn"):
        simple(n, tlsa=tlsa311(CERT[n]))
    simple("ta", tlsa="2 0 1 " + INTER.tlsa_data(0, 1).hex())  # the CA the server sends
    simple("mismatch", tlsa=tlsa311(OTHER))
    simple("tamissing", tlsa="2 0 1 " + CA.tlsa_data(0, 1).hex())  # root not sent
    simple("pkix", tlsa="1 1 1 " + "ab" * 32)
    simple("pkixnotls", tlsa="1 1 1 " + "ab" * 32)
    simple("unsigned", tlsa=tlsa311(OTHER), signed=False)  # a TLSA nobody may trust
    simple("cleartext", signed=False)
    simple("faketls", signed=False)
    simple("mayrefused", signed=False)
    simple("tlsrefused", tlsa=tlsa311(CERT["tlsrefused"]))
    simple("notlsa")
    simple("notlsa3", nsec3=True)
    simple("badtlsa", tlsa=tlsa311(OTHER)).break_rrsig(f"{tcp}.mx", "TLSA")
    simple("badmx", tlsa=tlsa311(OTHER)).break_rrsig("@", "MX")
    simple("sftlsa")
    bed.servfail_zone("_tcp.mx.sftlsa.test", with_ds=True)
    # Insecure host addresses: their TLSA zone would SERVFAIL if anyone asked.
    bed.zone("insaddr.test").add("@", "MX", "10 mx.plainhost.test.")
    bed.zone("plainhost.test", signed=False).add("mx", "A", IP["insaddr"])
    bed.servfail_zone("_tcp.mx.plainhost.test")
    # CNAME'd MX host: the TLSA base is the expanded name (secure chain).
    bed.zone("prov.test").add("host", "A", IP["cname"]).add(
        f"{tcp}.host", "TLSA", tlsa311(CERT["cname"]))
    bed.zone("cname.test").add("@", "MX", "10 mx.cname.test.").add(
        "mx", "CNAME", "host.prov.test.")
    bed.zone("nullmx.test").add("@", "MX", "0 .")
    bed.zone("nomx.test").add("@", "A", IP["nomx"]).add(tcp, "TLSA", tlsa311(CERT["nomx"]))
    two = bed.zone("two.test")  # mx1: no STARTTLS (4.7.321), mx2: mismatch (4.7.323)
    two.add("@", "MX", "10 mx1.two.test.").add("@", "MX", "20 mx2.two.test.")
    two.add("mx1", "A", IP["two1"]).add(f"{tcp}.mx1", "TLSA", tlsa311(CERT["two1"]))
    two.add("mx2", "A", IP["two2"]).add(f"{tcp}.mx2", "TLSA", tlsa311(OTHER))
    fb = bed.zone("fallback.test")  # mx1: bogus TLSA (4.7.324), mx2 authenticates
    fb.add("@", "MX", "10 mx1.fallback.test.").add("@", "MX", "20 mx2.fallback.test.")
    fb.add("mx1", "A", NOWHERE).add(f"{tcp}.mx1", "TLSA", tlsa311(OTHER))
    fb.break_rrsig(f"{tcp}.mx1", "TLSA")
    fb.add("mx2", "A", IP["fallback"]).add(f"{tcp}.mx2", "TLSA", tlsa311(CERT["fallback"]))


def write_config(path: Path, nameserver: str, port: int, **dns: Any) -> Path:
    dns = {"timeout": "2s", **dns}
    dns_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in dns.items())
    path.write_text(
        f'[listener]\nhostname = "relay.test"\n\n'
        f'[dns]\nnameservers = ["{nameserver}"]\n{dns_lines}\n'
        f'[delivery]\nport = {port}\nconnect_timeout = "2s"\ngreeting_timeout = "5s"\n'
        f'mail_timeout = "5s"\ntls_timeout = "2s"\n')
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    dests = {n: Destination(IP[n], tls=(CERT[n], [INTER]), starttls=STARTTLS[n],
                            hostname=SERVER_NAME[n], replies=REPLIES.get(n)) for n in NAMES}
    port = start_group(list(dests.values()))
    work = tmp_path_factory.mktemp("check")
    bed = DnsBed(work / "dnsbed")
    try:
        zones(bed, port)
        bed.start()
        cfg_path = write_config(work / "relay.toml", bed.nameserver, port)
        from relay.config import load
        yield World(port, dests, bed, cfg_path, load(str(cfg_path)), work)
    finally:
        bed.stop()
        for d in dests.values():
            d.stop()


@dataclass
class Run:
    args: tuple[str, ...]
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def data(self) -> dict[str, Any]:
        assert self.out.startswith("{"), (self.rc, self.out, self.err)
        return dict(json.loads(self.out))


def relay_check(*args: str, env: dict[str, str] | None = None) -> Run:
    began = time.monotonic()
    full_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "RELAY_CONFIG")}
    full_env.update(env or {})
    r = subprocess.run([PYTHON, "-m", "relay", "check", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=full_env)
    return Run(tuple(args), r.returncode, r.stdout, r.stderr, time.monotonic() - began)


JSON_DOMAINS = ["ee.test", "ta.test", "mismatch.test", "tamissing.test", "pkix.test",
                "pkixnotls.test", "unsigned.test", "cleartext.test", "notlsa.test",
                "notlsa3.test", "badtlsa.test", "badmx.test", "sftlsa.test", "insaddr.test",
                "cname.test", "nullmx.test", "nosuch.ee.test", "nomx.test", "two.test",
                "fallback.test", "faketls.test", "tlsrefused.test", "mayrefused.test"]
TEXT_DOMAINS = ["quiet.test", "mismatch.test", "tamissing.test", "badmx.test"]


@pytest.fixture(scope="module")
def runs(world: World) -> dict[str, Run]:
    """Every subprocess run, started together (keyed by a short label)."""
    cfg = str(world.cfg_path)
    dead = write_config(world.work / "dead.toml", hostport(world.bed.dead_resolver),
                        world.port, timeout="1s")
    nv_addr = world.bed.nonvalidating_resolver
    assert nv_addr is not None
    nv = write_config(world.work / "nv.toml", hostport(nv_addr), world.port)
    nv_lax = write_config(world.work / "nvlax.toml", hostport(nv_addr), world.port,
                          require_validating_resolver=False)
    jobs: dict[str, tuple[tuple[str, ...], dict[str, str] | None]] = {
        d: ((d, "--json", "-c", cfg), None) for d in JSON_DOMAINS}
    jobs.update({f"text:{d}": ((d, "-c", cfg), None) for d in TEXT_DOMAINS})
    jobs["noconn"] = (("noconn.test", "--json", "--no-connect", "-c", cfg), None)
    jobs["noconn-text"] = (("noconn.test", "--no-connect", "-c", cfg), None)
    jobs["dead"] = (("ee.test", "--json", "-c", str(dead)), None)
    jobs["dead-text"] = (("ee.test", "-c", str(dead)), None)
    jobs["nv"] = (("ee.test", "--json", "-c", str(nv)), None)
    jobs["nv-text"] = (("ee.test", "-c", str(nv)), None)
    jobs["nv-lax"] = (("ee.test", "--json", "-c", str(nv_lax)), None)
    jobs["env-config"] = (("pkix.test", "--json"), {"RELAY_CONFIG": cfg})
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {k: pool.submit(relay_check, *a, env=e) for k, (a, e) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def only_host(data: dict[str, Any]) -> dict[str, Any]:
    assert len(data["hosts"]) == 1, data["hosts"]
    return dict(data["hosts"][0])


def only_conn(data: dict[str, Any]) -> dict[str, Any]:
    conns = only_host(data)["connections"]
    assert len(conns) == 1, conns
    return dict(conns[0])


# --- DANE authenticated ------------------------------------------------------------------


def test_dane_ee_3_1_1_match(runs: dict[str, Run], world: World) -> None:
    r = runs["ee.test"]
    d = r.data
    assert r.rc == 0, r.err
    assert (d["domain"], d["verdict"], d["code"]) == ("ee.test", "dane-authenticated", None)
    assert d["resolver"]["validating"] is True and "validates DNSSEC" in d["resolver"]["detail"]
    assert d["mx"]["security"] == "secure" and d["mx"]["records"] == ["10 mx.ee.test"]
    h = only_host(d)
    assert (h["name"], h["preference"], h["dnssec"], h["requirement"], h["outcome"]) == (
        "mx.ee.test", 10, "secure", "dane", "dane-authenticated")
    assert h["addresses"] == [{"ip": IP["ee"], "secure": True}]
    assert h["tlsa"] == [{"text": tlsa311(CERT["ee"]), "usage": 3, "selector": 1, "mtype": 1,
                          "usable": True, "why": "usable: DANE-EE SPKI SHA2-256"}]
    assert h["tlsa_lookups"][0]["qname"] == f"_{world.port}._tcp.mx.ee.test"
    c = only_conn(d)
    assert c["starttls_offered"] is True and c["tls"]["version"].startswith("TLSv1.")
    assert c["tls"]["cipher"] and c["tls"]["sni"] == "mx.ee.test"
    assert c["dane"]["ok"] is True and c["dane"]["depth"] == 0
    assert c["dane"]["matched"] == tlsa311(CERT["ee"])
    leaf, inter = c["chain"]
    assert leaf["subject"] == "CN=mx.ee.test" and leaf["issuer"] == "CN=Check Intermediate"
    assert leaf["names"] == ["mx.ee.test"] and leaf["validity"] == "valid"
    assert leaf["matches"] == [tlsa311(CERT["ee"])] and inter["ca"] is True
    assert c["quit_before_mail"] is True and c["code"] is None
    assert d["advice"] is None and d["decided_by"] == {"host": "mx.ee.test", "ip": IP["ee"],
                                                       "requirement": "dane"}


def test_dane_ta_2_0_1_with_the_ca_in_the_chain(runs: dict[str, Run]) -> None:
    r = runs["ta.test"]
    c = only_conn(r.data)
    assert r.rc == 0 and r.data["verdict"] == "dane-authenticated"
    assert c["dane"]["depth"] >= 1 and c["dane"]["matched"].startswith("2 0 1 ")
    assert c["chain"][1]["matches"] == [c["dane"]["matched"]]


def test_cname_mx_host_uses_the_expanded_name(runs: dict[str, Run], world: World) -> None:
    r = runs["cname.test"]
    h = only_host(r.data)
    assert r.rc == 0 and r.data["verdict"] == "dane-authenticated"
    assert h["name"] == "mx.cname.test" and h["canonical_name"] == "host.prov.test"
    assert h["tlsa_base"] == h["sni"] == "host.prov.test"
    assert h["address_lookups"][0]["chain"] == [
        {"owner": "mx.cname.test", "target": "host.prov.test", "secure": True}]
    sni = [c.sni for c in world.dests["cname"].connections if c.sni]
    assert sni and set(sni) == {"host.prov.test"}


def test_no_mx_implicit(runs: dict[str, Run]) -> None:
    d = runs["nomx.test"].data
    assert d["mx"]["implicit"] is True and d["mx"]["rcode"] == "nodata"
    h = only_host(d)
    assert (h["name"], h["preference"]) == ("nomx.test", 0)
    assert runs["nomx.test"].rc == 0 and d["verdict"] == "dane-authenticated"


def test_first_host_that_works_decides(runs: dict[str, Run]) -> None:
    r = runs["fallback.test"]
    d = r.data
    assert r.rc == 0 and d["verdict"] == "dane-authenticated" and d["code"] is None
    mx1, mx2 = d["hosts"]
    assert (mx1["usable"], mx1["code"], mx1["dnssec"], mx1["connections"]) == (
        False, "4.7.324", "bogus", [])
    assert d["decided_by"]["host"] == "mx2.fallback.test" and mx2["outcome"] == d["verdict"]
    assert any("mx1.fallback.test: 4.7.324" in p for p in d["advice"]["problems"])


# --- TLS without authentication, opportunistic, plain -----------------------------------


def test_only_pkix_usages_with_starttls_is_tls(runs: dict[str, Run]) -> None:
    r = runs["pkix.test"]
    h = only_host(r.data)
    assert r.rc == 0 and (r.data["verdict"], r.data["code"]) == ("tls", None)
    assert h["requirement"] == "encrypt"
    assert h["tlsa"][0]["usable"] is False and "PKIX-EE" in h["tlsa"][0]["why"]
    # Advice: publish a usable record, the one that matches what the server presents.
    assert r.data["advice"]["suggested_tlsa"][0]["record"] == tlsa311(CERT["pkix"])


def test_only_pkix_usages_without_starttls_is_4_7_321(runs: dict[str, Run]) -> None:
    r = runs["pkixnotls.test"]
    d = r.data
    assert r.rc == 1 and (d["verdict"], d["code"]) == ("defer", "4.7.321")
    assert d["code_text"].startswith("starttls-not-supported:")
    c = only_conn(d)
    assert c["starttls_offered"] is False and c["tls"] is None and c["code"] == "4.7.321"
    assert "STARTTLS" in d["advice"]["admin"] and d["advice"]["who"] == "destination"


def test_insecure_zone_is_opportunistic(runs: dict[str, Run], world: World) -> None:
    r = runs["unsigned.test"]
    h = only_host(r.data)
    assert r.rc == 0 and r.data["verdict"] == "tls" and r.data["mx"]["security"] == "insecure"
    assert h["requirement"] == "may" and h["tlsa_lookups"] == [] and h["tlsa"] == []
    p = runs["cleartext.test"]
    assert p.rc == 0 and p.data["verdict"] == "plain" and p.data["code"] is None
    assert only_conn(p.data)["starttls_offered"] is False


def test_opportunistic_tls_failure_falls_back_to_cleartext(runs: dict[str, Run],
                                                           world: World) -> None:
    r = runs["faketls.test"]
    c = only_conn(r.data)
    assert r.rc == 0 and r.data["verdict"] == "plain" and c["plain_retry"] is True
    assert c["tls"] is None and c["quit_before_mail"] is True
    assert any("reconnect" in s["text"] for s in c["steps"])
    verbs = [log.verbs() for log in world.dests["faketls"].wait_idle()]
    assert ["STARTTLS"] in [[v for v in vs if v == "STARTTLS"] for vs in verbs]
    assert any("STARTTLS" not in vs and vs[-1:] == ["QUIT"] for vs in verbs)


def test_starttls_refused_where_tls_is_mandatory_is_4_7_321(runs: dict[str, Run]) -> None:
    r = runs["tlsrefused.test"]
    c = only_conn(r.data)
    assert r.rc == 1 and (r.data["verdict"], r.data["code"]) == ("defer", "4.7.321")
    assert c["starttls_offered"] is True and c["failure_type"] == "starttls-not-supported"
    assert "454" in c["reply"]
    # Where TLS is only opportunistic, the same refusal means cleartext on that session.
    may = runs["mayrefused.test"]
    c = only_conn(may.data)
    assert may.rc == 0 and may.data["verdict"] == "plain" and c["plain_retry"] is False
    assert any("goes on in cleartext" in s["text"] for s in c["steps"])


@pytest.mark.parametrize("domain", ["notlsa.test", "notlsa3.test"])
def test_signed_zone_without_tlsa(runs: dict[str, Run], domain: str) -> None:
    r = runs[domain]
    h = only_host(r.data)
    assert r.rc == 0 and r.data["verdict"] == "tls" and h["requirement"] == "may"
    (tl,) = h["tlsa_lookups"]
    assert tl["security"] == "secure" and tl["rcode"] in ("nxdomain", "nodata")
    assert "authenticated denial" in h["reason"]


def test_insecure_host_addresses_tlsa_not_queried(runs: dict[str, Run]) -> None:
    r = runs["insaddr.test"]
    h = only_host(r.data)
    assert r.rc == 0 and r.data["verdict"] == "tls" and r.data["mx"]["security"] == "secure"
    assert h["addresses"] == [{"ip": IP["insaddr"], "secure": False}]
    assert h["tlsa_lookups"] == [] and h["tlsa_bases"] == []  # the SERVFAIL zone: untouched


# --- failures -----------------------------------------------------------------------------


def test_mismatch_4_7_323_with_the_record_that_would_match(runs: dict[str, Run],
                                                            world: World) -> None:
    r = runs["mismatch.test"]
    d = r.data
    assert r.rc == 1 and (d["verdict"], d["code"]) == ("defer", "4.7.323")
    c = only_conn(d)
    assert c["dane"]["ok"] is False and c["code"] == "4.7.323"
    assert c["chain"][0]["spki_sha256"] == spki311(CERT["mismatch"])
    (s,) = d["advice"]["suggested_tlsa"]
    assert s["line"] == (f"_{world.port}._tcp.mx.mismatch.test. IN TLSA "
                         f"{tlsa311(CERT['mismatch'])}")
    assert "5.7.323" in d["advice"]["retry"] and d["advice"]["who"] == "destination"
    text = runs["text:mismatch.test"]
    assert text.rc == 1 and s["line"] in text.out
    assert "What the domain's administrator should fix" in text.out
    assert "4.7.323 tlsa-invalid: The domain failed DANE validation." in text.out


def test_trust_anchor_missing_from_the_chain(runs: dict[str, Run]) -> None:
    r = runs["tamissing.test"]
    c = only_conn(r.data)
    assert r.rc == 1 and r.data["code"] == "4.7.323"
    assert c["dane"]["ta_missing"] is True
    assert not any(cert["matches"] for cert in c["chain"])
    assert "whole chain up to that trust anchor" in " ".join(r.data["advice"]["problems"])
    assert "RFC 7671" in runs["text:tamissing.test"].out


def test_most_specific_code_when_every_host_fails(runs: dict[str, Run]) -> None:
    d = runs["two.test"].data
    assert (d["verdict"], d["code"]) == ("defer", "4.7.323")  # 4.7.323 beats 4.7.321
    assert [h["connections"][0]["code"] for h in d["hosts"]] == ["4.7.321", "4.7.323"]


@pytest.mark.parametrize("domain", ["badtlsa.test", "sftlsa.test"])
def test_bogus_or_servfail_tlsa_is_4_7_324(runs: dict[str, Run], domain: str) -> None:
    r = runs[domain]
    h = only_host(r.data)
    assert r.rc == 1 and (r.data["verdict"], r.data["code"]) == ("defer", "4.7.324")
    assert h["usable"] is False and h["connections"] == [] and h["outcome"] == "unusable"
    assert h["tlsa_lookups"][0]["rcode"] == "servfail"
    assert "DNSSEC" in r.data["advice"]["admin"] or "SERVFAIL" in r.data["advice"]["admin"]


def test_bogus_mx_is_4_7_324(runs: dict[str, Run]) -> None:
    r = runs["badmx.test"]
    d = r.data
    assert r.rc == 1 and (d["verdict"], d["code"]) == ("defer", "4.7.324")
    assert d["mx"]["security"] == "bogus" and d["hosts"] == [] and d["mx"]["ede"]
    assert "4.7.324 dnssec-invalid" in runs["text:badmx.test"].out


def test_null_mx_bounces_5_1_10(runs: dict[str, Run]) -> None:
    r = runs["nullmx.test"]
    assert r.rc == 1 and (r.data["verdict"], r.data["code"]) == ("bounce", "5.1.10")
    assert r.data["mx"]["null_mx"] is True and r.data["hosts"] == []


def test_nxdomain_bounces_5_1_2(runs: dict[str, Run]) -> None:
    r = runs["nosuch.ee.test"]
    assert r.rc == 1 and (r.data["verdict"], r.data["code"]) == ("bounce", "5.1.2")
    assert r.data["mx"]["rcode"] == "nxdomain"


def test_resolver_down_defers_4_4_312(runs: dict[str, Run]) -> None:
    r = runs["dead"]
    d = r.data
    assert r.rc == 1 and (d["verdict"], d["code"]) == ("defer", "4.4.312")
    assert d["connected"] is False and d["hosts"] == []
    assert d["resolver"]["validating"] is False and d["resolver"]["reachable"] is False
    assert d["advice"]["who"] == "relay-operator" and "dns.nameservers" in d["advice"]["operator"]
    assert "did not answer" in runs["dead-text"].out
    assert "DANE CANNOT BE ENFORCED" in runs["dead-text"].out


def test_non_validating_resolver_is_loud(runs: dict[str, Run]) -> None:
    r = runs["nv"]
    d = r.data
    assert r.rc == 1 and (d["verdict"], d["code"]) == ("defer", "4.4.312")
    assert d["resolver"]["validating"] is False and d["resolver"]["reachable"] is True
    assert "does not validate" in d["reply"] and d["mx"]["queried"] is False
    assert "WITHOUT the AD bit" in runs["nv-text"].out
    assert "DANE CANNOT BE ENFORCED" in runs["nv-text"].out
    # An operator who allows it gets opportunistic TLS only: said loudly too.
    lax = runs["nv-lax"].data
    assert lax["verdict"] == "tls" and only_host(lax)["requirement"] == "may"
    assert lax["resolver"]["required"] is False


# --- no mail, no connection, the output ------------------------------------------------


def test_no_mail_is_sent(runs: dict[str, Run], world: World) -> None:
    assert runs["text:quiet.test"].rc == 0
    dest = world.dests["quiet"]
    conns = dest.wait_idle()
    assert len(conns) == 1 and dest.messages == []
    verbs = conns[0].verbs()
    assert "STARTTLS" in verbs and verbs[-1] == "QUIT"
    assert not {"MAIL", "RCPT", "DATA"} & set(verbs), verbs


def test_no_connect(runs: dict[str, Run], world: World) -> None:
    r = runs["noconn"]
    d = r.data
    assert r.rc == 0 and d["connected"] is False and d["verdict"] == "dane-authenticated"
    assert only_host(d)["connections"] == [] and only_host(d)["outcome"] == "not-checked"
    assert world.dests["noconn"].connections == []
    assert "not verified: --no-connect" in runs["noconn-text"].out


def test_text_output_shows_every_step(runs: dict[str, Run], world: World) -> None:
    r = runs["text:quiet.test"]
    out = r.out
    for needle in ["relay check quiet.test", "Resolver", "validates DNSSEC",
                   "MX of quiet.test", "quiet.test MX: 10 mx.quiet.test [secure]",
                   "Host mx.quiet.test (preference 10",
                   f"mx.quiet.test A: {IP['quiet']} [secure]",
                   f"TLSA records at _{world.port}._tcp.mx.quiet.test.",
                   "usable: DANE-EE SPKI SHA2-256", "policy: DANE", f"[{IP['quiet']}]:",
                   "STARTTLS offered", "TLS TLSv1.", "SNI mx.quiet.test", "chain presented",
                   "subject CN=mx.quiet.test", "issuer  CN=Check Intermediate",
                   "names   mx.quiet.test", f"3 1 1   {spki311(CERT['quiet'])}",
                   "DANE: authenticated: 3 1 1 matched leaf", "QUIT before MAIL FROM",
                   "Verdict", "dane-authenticated", "with DANE authentication"]:
        assert needle in out, (needle, out)
    assert "\x1b[" not in out  # not a terminal: no colour


def test_config_from_relay_config_env(runs: dict[str, Run]) -> None:
    r = runs["env-config"]
    assert r.rc == 0 and r.data["verdict"] == "tls"


def test_colour_only_on_a_terminal_and_not_with_no_color(world: World) -> None:
    import pty

    def on_tty(env: dict[str, str]) -> str:
        leader, follower = pty.openpty()
        full = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | env
        p = subprocess.Popen([PYTHON, "-m", "relay", "check", "nullmx.test", "-c",
                              str(world.cfg_path)], cwd=ROOT, stdout=follower,
                             stderr=subprocess.PIPE, env=full)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        assert p.wait(30) == 1
        return b"".join(chunks).decode()

    assert "\x1b[31m" in on_tty({})
    plain = on_tty({"NO_COLOR": "1"})
    assert "\x1b[" not in plain and "bounce 5.1.10" in plain


def test_config_error_exits_2(world: World) -> None:
    bad = world.work / "bad.toml"
    bad.write_text('[dns]\nnope = 1\n')
    r = relay_check("ee.test", "-c", str(bad))
    assert r.rc == 2 and "nope" in r.err


# --- the same verdict as delivery -------------------------------------------------------


PARITY = ["ee.test", "ta.test", "mismatch.test", "tamissing.test", "pkix.test",
          "pkixnotls.test", "unsigned.test", "cleartext.test", "notlsa.test", "badtlsa.test",
          "badmx.test", "sftlsa.test", "insaddr.test", "cname.test", "nullmx.test",
          "nosuch.ee.test", "nomx.test", "two.test", "fallback.test", "faketls.test",
          "tlsrefused.test", "mayrefused.test"]


async def test_check_reaches_the_same_code_as_delivery(world: World) -> None:
    from relay.check.probe import run_check

    cfg = build({"listener": {"hostname": "relay.test"},
                 "dns": {"nameservers": [world.bed.nameserver], "timeout": "2s"},
                 "delivery": {"port": world.port, "connect_timeout": "2s",
                              "greeting_timeout": "5s", "mail_timeout": "5s",
                              "tls_timeout": "2s"}}, source="test")
    deliverer = Deliverer(Resolver.from_config(cfg.dns), cfg,
                          DeliverySettings.from_config(cfg, "relay.test"))
    rows = []
    for domain in PARITY:
        rcpt = f"user@{domain}"
        report = await deliverer.deliver(domain, "sender@relay.test", [rcpt],
                                         b"Subject: parity\r\n\r\nparity\r\n")
        out = report.outcomes[rcpt]
        check = await run_check(domain, cfg)
        delivered = out.action is Action.DELIVERED
        by = report.delivered_by
        rows.append((domain, delivered, None if delivered else out.code,
                     by.security if by else None))
        expect = (domain, check["deliverable"], check["code"],
                  check["verdict"] if check["deliverable"] else None)
        assert rows[-1] == expect, (out, check["summary"])
