"""The E2B door's pure parts: where a request goes (routing.target_of), E2B's metadata
filter and paging, body fields, and allowOut/denyOut onto Torpor's egress policy."""

from __future__ import annotations

import urllib.parse

import pytest

from torpor.compat.e2b import control, routing, wire
from torpor.compat.e2b.routes import metadata_query
from torpor.errors import Invalid

SID = "sbx" + "a1" * 6 + "b"


def scope(*headers: tuple[bytes, bytes]) -> dict:
    return {"headers": list(headers)}


def test_target_of_headers_and_host():
    assert routing.target_of(scope((b"e2b-sandbox-id", SID.encode()))) == (SID, 49983)
    assert routing.target_of(scope((b"e2b-sandbox-id", SID.encode()),
                                   (b"e2b-sandbox-port", b"49999"))) == (SID, 49999)
    assert routing.target_of(scope((b"e2b-sandbox-id", b"x"),
                                   (b"e2b-sandbox-port", b"99999"))) == ("x", -1)
    assert routing.target_of(scope((b"host", f"8000-{SID}.example.com:7070".encode()))) == \
        (SID, 8000)
    # the header wins over the host; an operator's host name is not a sandbox
    assert routing.target_of(scope((b"host", f"8000-{SID}.x".encode()),
                                   (b"e2b-sandbox-id", b"other"))) == ("other", 49983)
    for host in (b"127.0.0.1:7070", b"8080-myhost.example.com", b"api.example.com",
                 f"0-{SID}.x".encode()):
        assert routing.target_of(scope((b"host", host))) is None


def test_control_paths():
    for path in ("/sandboxes", "/sandboxes/x/connect", "/v2/sandboxes", "/v3/templates",
                 "/snapshots", "/templates/aliases/base"):
        assert routing.CONTROL.match(path), path
    for path in ("/v1/sandboxes", "/healthz", "/docs", "/openapi.json", "/sandboxesx",
                 "/mcp", "/files"):
        assert not routing.CONTROL.match(path), path


def test_metadata_query_as_the_sdk_quotes_it():
    meta = {"a b": "c&d=e/é", "k": "v"}
    sent = urllib.parse.urlencode({urllib.parse.quote(k): urllib.parse.quote(v)
                                   for k, v in meta.items()})
    assert metadata_query(sent) == meta
    assert metadata_query(None) == {} and metadata_query("") == {}


def test_paging_cursor():
    items = [[f"2026-01-0{i}", f"sbx{i}"] for i in range(1, 6)]
    got, token = [], None
    while True:
        chunk, token = control.page(items, 2, token, key=lambda x: x)
        got += chunk
        if token is None:
            break
    assert got == items
    desc = list(reversed(items))
    chunk, token = control.page(desc, 3, None, key=lambda x: x, desc=True)
    assert chunk == desc[:3]
    # the item the cursor points at went: the page goes on after its place
    rest = [x for x in desc if x != chunk[-1]]
    assert control.page(rest, 3, token, key=lambda x: x, desc=True)[0] == desc[3:]
    with pytest.raises(Invalid):
        control.page(items, 0, None, key=lambda x: x)
    with pytest.raises(Invalid):
        control.page(items, 2, "%%%", key=lambda x: x)


def test_body_fields_are_typed_and_none_is_ignored_silently():
    b = wire.Body({"timeout": True})
    with pytest.raises(Invalid, match="timeout must be an integer"):
        wire.timeout_of(b)
    b = wire.Body({"a": 1, "mcp": {}, "iam": {"tokens": {"x": {}}}})
    b.unsupported("mcp")  # empty: changes nothing
    with pytest.raises(Invalid, match="iam is not supported"):
        b.unsupported("iam")
    with pytest.raises(Invalid, match="a is not a field"):
        b.done()
    with pytest.raises(Invalid):
        wire.Body([1])


def test_network_onto_the_egress_policy():
    def net(d, internet=None):
        return wire.network_of(wire.Body(d, "network"), internet)[0]

    assert net({"denyOut": ["0.0.0.0/0", "10.0.0.0/8"], "allowOut": ["1.1.1.1"]}) == \
        {"egress": "deny-all", "allow": ["1.1.1.1"], "deny": []}
    assert net({"denyOut": ["8.8.8.8"]}) == {"egress": "allow-all", "allow": [],
                                             "deny": ["8.8.8.8"]}
    assert net({"allowOut": ["a.com"]}, internet=False) == {"egress": "deny-all",
                                                            "allow": ["a.com"], "deny": []}
    assert wire.network_of(None, None)[0] == {"egress": "allow-all", "allow": [], "deny": []}
    with pytest.raises(Invalid, match="allowOut"):
        net({"allowOut": ["1.1.1.1"], "denyOut": ["1.0.0.0/8"]})
    with pytest.raises(Invalid, match="rules is not supported"):
        net({"rules": {"a.com": [{}]}, "allowOut": ["a.com"]})
