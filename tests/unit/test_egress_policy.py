"""Egress policy parsing and decisions: pure functions, no sockets."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from torpor.network.policy import (
    EgressPolicy,
    OperatorNet,
    PolicyError,
    decide,
    host_matches,
    name_stage,
    normalize_host,
    parse_entry,
)

RESOLVE = {
    "api.example.test": ["93.184.216.34"],
    "example.test": ["93.184.216.35"],
    "a.b.example.test": ["93.184.216.36"],
    "rebind.test": ["10.1.2.3"],
    "mixed.test": ["10.9.9.9", "93.184.216.40"],
    "meta.test": ["169.254.169.254"],
    "gh.test": ["140.82.112.3"],
}


def op(**kw) -> OperatorNet:
    kw.setdefault("resolve", RESOLVE)
    kw.setdefault("host_addresses", [ipaddress.ip_network("203.0.114.7/32")])
    return OperatorNet(**kw)


def check(policy: dict | EgressPolicy, host: str, port: int | None = 443, **opkw):
    p = policy if isinstance(policy, EgressPolicy) else EgressPolicy.parse(policy)
    return asyncio.run(decide(p, op(**opkw), host, port))


# ------------------------------------------------------------------ parsing


def test_parse_normalises_and_defaults():
    base = EgressPolicy.parse({"egress": "deny-all", "allow": ["a.test"]})
    p = EgressPolicy.parse({"allow": ["API.Example.TEST.", "*.PyPI.org", "Bücher.de",
                                      "10.0.0.1/8", "[::1]:443", "1.2.3.4:80",
                                      "api.example.test"]}, default=base)
    assert p.egress == "deny-all"  # from the default
    assert p.allow == ("api.example.test", "*.pypi.org", "xn--bcher-kva.de", "10.0.0.0/8",
                       "[::1]:443", "1.2.3.4:80")
    assert p.deny == ()
    assert p.to_dict() == {"egress": "deny-all", "allow": list(p.allow), "deny": []}
    assert EgressPolicy.parse(p.to_dict()) == p
    assert EgressPolicy.parse(None, default=base) is base
    assert EgressPolicy.parse(None).egress == "allow-all"


@pytest.mark.parametrize("entry", [
    "*.1.2.3.4", "10.0.0.0/8:80", "exa mple.com", "a..b", "x:99999", "x:0", "*", "*.",
    "-bad.com", "[::1", "1.2.3.4/33", "a" * 64 + ".com", "", "http://x.com",
])
def test_bad_entries_are_named(entry):
    with pytest.raises(PolicyError) as e:
        EgressPolicy.parse({"egress": "deny-all", "allow": ["ok.com", entry]})
    assert e.value.field == "network.allow"
    assert "network.allow[1]" in e.value.message


def test_bad_policies():
    with pytest.raises(PolicyError) as e:
        EgressPolicy.parse({"egress": "maybe"})
    assert e.value.field == "network.egress"
    with pytest.raises(PolicyError) as e:
        EgressPolicy.parse({"deny": "evil.com"})
    assert e.value.field == "network.deny"
    with pytest.raises(PolicyError) as e:
        EgressPolicy.parse({"deny": [f"h{i}.com" for i in range(257)]})
    assert "at most 256" in e.value.message
    with pytest.raises(PolicyError):
        EgressPolicy.parse({"egress": "deny-all", "alow": []})
    with pytest.raises(PolicyError):
        EgressPolicy.parse({"allow": [3]})


def test_normalize_host_forms():
    v4 = ipaddress.IPv4Address("127.0.0.1")
    for form in ["127.0.0.1", "2130706433", "0x7f.1", "127.1", "0x7f000001", "017700000001",
                 "[::ffff:127.0.0.1]", "::ffff:7f00:1"]:
        assert normalize_host(form) == v4, form
    assert normalize_host("Example.COM.") == "example.com"
    assert normalize_host("[2001:db8::1]") == ipaddress.IPv6Address("2001:db8::1")
    for bad in ["", "a..b", "1.2.3.4.5", "0x1g.1", "x" * 254, "a b", "[::1"]:
        with pytest.raises(PolicyError):
            normalize_host(bad)


# ------------------------------------------------------------------ name stage


def test_wildcards_match_subdomains_not_apex():
    p = EgressPolicy.parse({"egress": "deny-all", "allow": ["*.example.test"]})
    assert name_stage(p, "api.example.test", 443).allowed
    assert name_stage(p, "a.b.example.test", 443).allowed
    assert name_stage(p, "example.test", 443).allowed is False
    assert name_stage(p, "badexample.test", 443).allowed is False
    assert name_stage(p, "api.example.test", 443).rule == "allow: *.example.test"


def test_port_entries_and_deny_beats_allow():
    p = EgressPolicy.parse({"egress": "deny-all",
                            "allow": ["api.example.test:443", "*.example.test"],
                            "deny": ["a.b.example.test", "example.test:22"]})
    assert name_stage(p, "api.example.test", 443).allowed
    assert name_stage(p, "api.example.test", 80).allowed  # via the wildcard
    assert name_stage(p, "a.b.example.test", 443).rule == "deny: a.b.example.test"
    q = EgressPolicy.parse({"egress": "deny-all", "allow": ["api.example.test:443"]})
    assert name_stage(q, "api.example.test", 80).allowed is False
    # a DNS question has no port: allow entries with a port still let the name resolve,
    # deny entries with a port do not deny the name
    assert name_stage(q, "api.example.test", None).allowed
    assert name_stage(p, "example.test", None).allowed is False  # not allowed by any rule
    r = EgressPolicy.parse({"deny": ["example.test:22"]})
    assert name_stage(r, "example.test", None).allowed
    assert name_stage(r, "example.test", 22).rule == "deny: example.test:22"


def test_decisions_by_rule_kind():
    deny_all = {"egress": "deny-all",
                "allow": ["api.example.test", "140.82.0.0/16", "93.184.216.35:80"]}
    d = check(deny_all, "api.example.test")
    assert d.allowed and d.rule == "allow: api.example.test"
    assert [str(a) for a in d.addresses] == ["93.184.216.34"]
    d = check(deny_all, "gh.test")  # a name whose address is inside an allowed CIDR
    assert d.allowed and d.rule == "allow: 140.82.0.0/16"
    d = check(deny_all, "93.184.216.35", 80)
    assert d.allowed and d.rule == "allow: 93.184.216.35:80"
    d = check(deny_all, "93.184.216.35", 443)
    assert not d.allowed and d.status == 403
    d = check(deny_all, "evil.test")
    assert not d.allowed and d.rule.startswith("deny-all: no allow rule matches evil.test")
    d = check({"egress": "deny-all", "allow": ["x.test"]}, "evil.test")
    assert d.rule == "deny-all: no allow rule matches evil.test"
    d = check({"deny": ["*.example.test"]}, "a.b.example.test")
    assert not d.allowed and d.rule == "deny: *.example.test"
    d = check({"deny": ["93.184.216.0/24"]}, "api.example.test")
    assert not d.allowed and d.rule == "deny: 93.184.216.0/24"
    d = check({}, "api.example.test")
    assert d.allowed and d.rule == "allow-all"


@pytest.mark.parametrize(("host", "why"), [
    ("10.0.0.1", "10.0.0.0/8 private range"),
    ("169.254.169.254", "169.254.0.0/16 link-local"),
    ("127.0.0.1", "127.0.0.0/8 loopback"),
    ("2130706433", "127.0.0.0/8 loopback"),
    ("0x7f.1", "127.0.0.0/8 loopback"),
    ("[::ffff:127.0.0.1]", "127.0.0.0/8 loopback"),
    ("0.0.0.0", "0.0.0.0/8"),
    ("100.64.1.1", "CGNAT"),
    ("192.168.1.1", "private"),
    ("172.20.0.1", "private"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("[::1]", "loopback"),
    ("[fe80::1]", "link-local"),
    ("[fd00::1]", "unique-local"),
    ("[2002:a00:1::1]", "10.0.0.0/8 private range in IPv6-embedded form"),
    ("[64:ff9b::a9fe:a9fe]", "169.254.0.0/16 link-local range in IPv6-embedded form"),
    ("203.0.114.7", "host's own address"),
    ("rebind.test", "10.0.0.0/8 private range (10.1.2.3)"),
    ("meta.test", "169.254.0.0/16"),
])
def test_always_deny(host, why):
    d = check({"egress": "allow-all", "allow": [host]}, host, 80)
    assert not d.allowed and d.status == 403
    assert d.rule.startswith("always-deny: ") and why in d.rule, d.rule


def test_operator_allow_lifts_always_deny_but_not_server_ports():
    allow = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8")]
    assert check({}, "127.0.0.1", 80, allow_cidrs=allow).allowed
    assert check({}, "rebind.test", 443, allow_cidrs=allow).allowed
    d = check({}, "127.0.0.1", 7070, allow_cidrs=allow, protected_ports={7070})
    assert not d.allowed and d.rule == "server port 7070"
    for host in ["0.0.0.0", "[::ffff:127.0.0.2]", "203.0.114.7"]:
        d = check({}, host, 7070, allow_cidrs=allow + [ipaddress.ip_network("0.0.0.0/0")],
                  protected_ports={7070})
        assert d.rule == "server port 7070", host
    # another host's port 7070 is not ours
    assert check({}, "10.0.0.1", 7070, allow_cidrs=allow, protected_ports={7070}).allowed


def test_mixed_answers_pin_only_allowed_addresses():
    d = check({}, "mixed.test")
    assert d.allowed and [str(a) for a in d.addresses] == ["93.184.216.40"]


def test_invalid_and_unresolvable():
    d = check({}, "a..b")
    assert not d.allowed and d.status == 400
    d = check({}, "nothing.invalid")
    assert not d.allowed and d.status == 502 and "cannot resolve" in d.rule


def test_pinned_skips_resolution():
    p = EgressPolicy.parse({})
    d = asyncio.run(decide(p, op(), "rebind.test", 443,
                           pinned=[ipaddress.ip_address("93.184.216.34")]))
    assert d.allowed and [str(a) for a in d.addresses] == ["93.184.216.34"]


def test_operator_parsers():
    assert OperatorNet.parse_resolve(["A.Test.=127.0.0.1,::1", "a.test=127.0.0.2"]) == {
        "a.test": ["127.0.0.1", "::1", "127.0.0.2"]}
    for bad in ["a.test", "=1.2.3.4", "a.test=999.1.1.1", "1.2.3.4=1.2.3.4", "a..b=1.1.1.1"]:
        with pytest.raises(ValueError, match="--egress-resolve"):
            OperatorNet.parse_resolve([bad])
    assert OperatorNet.parse_cidrs(["127.0.0.1/8", "::1"]) == [
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    with pytest.raises(ValueError, match="10.0.0.0/99"):
        OperatorNet.parse_cidrs(["10.0.0.0/99"])


def test_host_matches_for_credentials():
    assert host_matches(["api.openai.com"], "API.openai.com.", 443)
    assert host_matches(["*.openai.com:443"], "x.openai.com", 443)
    assert not host_matches(["*.openai.com:443"], "x.openai.com", 80)
    assert not host_matches(["*.openai.com"], "openai.com", 443)
    assert not host_matches(["api.openai.com"], "api.openai.com.evil.com", 443)
    assert host_matches(["127.0.0.1"], "2130706433", 80)
    assert not host_matches(["bad entry!"], "x", 1)


def test_parse_entry_kinds():
    assert parse_entry("*.x.com:8443").port == 8443
    assert parse_entry("[2001:db8::1]:443").text == "[2001:db8::1]:443"
    assert parse_entry("2001:db8::1").kind == "ip"
    assert parse_entry("2001:db8::/32").kind == "cidr"
    assert parse_entry("::ffff:1.2.3.4").text == "1.2.3.4"
