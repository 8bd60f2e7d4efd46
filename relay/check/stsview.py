"""The MTA-STS part of `relay check` (pure): what the domain's administrator should fix
in its MTA-STS set-up, and the text section (docs/mta-sts.md). relay.check.render calls
it; relay.check.probe gathers the facts (`report["mta_sts"]`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def advice(report: dict[str, Any]) -> list[str]:
    """What the domain's administrator should fix in its MTA-STS set-up."""
    st = report.get("mta_sts")
    if not st or st.get("state") in (None, "off", "route", "none"):
        return []
    out: list[str] = []
    url = st["url"]
    if st.get("failure_type"):
        host = url.split("/")[2]
        out.append(f"the policy at {url} could not be fetched ({st.get('detail')}): serve it "
                   f"with HTTP 200, Content-Type text/plain, no redirect, over HTTPS with a "
                   f"publicly trusted certificate for {host}")
    if st.get("state") == "dnssec-invalid":
        out.append(f"the _mta-sts TXT record fails DNSSEC validation: {st.get('detail')}")
    mode = st.get("mode")
    for h in st.get("hosts") or []:
        if h["sts"] == "mismatch":
            out.append(f"MX host {h['name']} is not in the policy's mx patterns "
                       f"({', '.join(st.get('mx') or [])}): add \"mx: {h['name']}\" to the "
                       "policy and change the id of the _mta-sts TXT record")
    for h in report["hosts"]:
        for c in h["connections"]:
            w = (c.get("dane") or {}).get("webpki")
            if w and not w["ok"]:
                out.append(f"{h['name']} [{c['ip']}]: {w['reason']} ({w['result_type']}): "
                           "install a certificate from a publicly trusted CA whose "
                           f"subjectAltName covers {h['name']}"
                           + (" before switching the policy to enforce" if mode == "testing"
                              else ""))
            if c.get("starttls_offered") is False and h.get("sts") in ("enforce", "testing"):
                out.append(f"{h['name']} [{c['ip']}] does not offer STARTTLS, which the "
                           "MTA-STS policy requires")
    return out


def render(st: dict[str, Any], item: Any, head: Any,
           answer_line: Callable[[dict[str, Any]], tuple[str, str]]) -> None:
    """The MTA-STS section of `relay check`'s text (`item`/`head` print a line)."""
    head("MTA-STS (RFC 8461)")
    state = st.get("state")
    if state == "off" or state == "route":
        item("info", f"not applied: {st.get('detail') or state}")
        return
    if st.get("txt"):
        item(*answer_line(st["txt"]))
    fetch = st.get("fetch")
    if fetch is not None:
        if fetch["ok"]:
            item("ok", f"policy fetched from {st['url']} [{fetch['ip']}]")
        else:
            item("fail", f"fetch of {st['url']} failed ({fetch['failure_type']}): "
                 f"{fetch['detail']}")
    if state == "policy":
        source = "cached" if st.get("source") == "cached" else "fetched"
        item("ok", f"policy id {st['id']} ({source}): mode {st['mode']}"
             + (f" (published {st['published_mode']}, enforced by configuration)"
                if st.get("published_mode") != st["mode"] else "")
             + f", max_age {st['max_age']}, mx {', '.join(st['mx']) or '(none)'}")
        for h in st.get("hosts") or []:
            status = "ok" if h["matches"] else ("fail" if st["mode"] == "enforce" else "warn")
            what = {"dane": "matches; DANE decides (usable TLSA records)",
                    "enforce": "matches: TLS and a web-PKI certificate required",
                    "testing": "matches (testing: checked and reported only)",
                    "mismatch": "NOT in the policy's mx patterns"}.get(h["sts"] or "",
                                                                   "not usable")
            item(status, f"MX {h['name']}: {what}")
    elif state == "none":
        item("info", "no MTA-STS policy" + (f" ({st['detail']})" if st.get("detail") else ""))
    elif state == "failed":
        item("warn", f"no usable policy ({st.get('detail')}): delivered as without one")
    elif state == "dnssec-invalid":
        item("fail", f"_mta-sts lookup failed DNSSEC validation: {st.get('detail')}")
