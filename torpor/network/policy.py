"""Egress policy: which destinations a sandbox may reach, and why.

A destination is a host (name or IP literal) and a port. `decide()` answers allowed or
denied with a short human rule string, and for allowed destinations the addresses the proxy
may connect to. Decision steps:

1. Normalise the host: lowercase, strip one trailing dot, IDNA-encode. IP literals are parsed
   with `ipaddress` (brackets stripped, IPv4-mapped IPv6 unwrapped to IPv4); the numeric
   shorthand forms that `inet_aton` accepts (`2130706433`, `0x7f.1`, `127.1`) are treated as
   the IPv4 address they mean, so they cannot slip past IP rules. Empty, overlong or
   invalid names are denied ("invalid host").
2. Name stage: a deny entry matching the name (or the IP literal, or a CIDR containing it)
   denies. Under "deny-all" a matching allow entry allows the name; if none matches and the
   policy has no IP/CIDR allow entries the name is denied, otherwise the decision waits for
   the addresses (so under "deny-all" with IP/CIDR allow entries, any name is resolved:
   a DNS lookup is an observable side channel). `*.example.com` matches subdomains at any depth, never `example.com`
   itself. An entry with ":port" matches that port only.
3. Resolve: the operator's static map first, else `getaddrinfo`. IP literals are not
   resolved. No addresses: "cannot resolve".
4. Address stage, for each address: deny IPs/CIDRs deny; the server's own ports on
   loopback, unspecified or host-interface addresses are denied ("server port N") even in an
   operator-allowed range; special-purpose ranges (loopback, RFC 1918, CGNAT, link-local,
   ULA, multicast, reserved, documentation, the host's own addresses, and IPv4-mapped, 6to4
   and NAT64 forms of them) are denied ("always-deny: ...") unless inside an operator
   `allow_cidrs` range; under "deny-all" the address must then be allowed by the name stage
   or by an allow IP/CIDR.
5. The proxy connects only to addresses that passed (pinned; never resolved again), which
   defeats DNS rebinding.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

EGRESS_MODES = ("allow-all", "deny-all")
MAX_ENTRIES = 256
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_INET_ATON_CHARS = re.compile(r"^[0-9a-fx.]+$")


class PolicyError(ValueError):
    """A policy (or a policy entry) is invalid; `field` names where, e.g. "network.allow"."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


# ---------------------------------------------------------------- hosts and entries


def normalize_host(host: str) -> str | IPAddress:
    """A destination host as a lowercase ASCII name or an IP address; PolicyError if invalid."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if not h:
        raise PolicyError("empty host")
    try:
        return _unwrap_mapped(ipaddress.ip_address(h.split("%", 1)[0] if ":" in h else h))
    except ValueError:
        pass
    if ":" in h:
        raise PolicyError(f"invalid host {host[:80]!r}")
    h = h.lower()
    h = h.removesuffix(".")
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            raise PolicyError(f"invalid host {host[:80]!r}") from None
    if len(h) > 253 or not h:
        raise PolicyError(f"invalid host {host[:80]!r}")
    labels = h.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        # no TLD is numeric: this is IPv4 in a shorthand form (as browsers read it) or junk
        try:
            if _INET_ATON_CHARS.match(h):
                return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            pass
        raise PolicyError(f"invalid IPv4 address {host[:80]!r}")
    if not all(_LABEL.match(label) for label in labels):
        raise PolicyError(f"invalid host {host[:80]!r}")
    return h


def _unwrap_mapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class Entry:
    """One parsed policy entry. kind: "name", "wildcard", "ip" or "cidr"."""

    text: str                      # the normalised entry, as stored in the policy
    kind: str
    name: str = ""                 # "name": the host; "wildcard": the suffix without "*."
    net: IPNetwork | None = None   # "ip" (a /32 or /128) and "cidr"
    port: int | None = None

    def matches_name(self, host: str, port: int | None) -> bool:
        """Does this entry match a host name? port None (a DNS query) matches any port."""
        if not self._port_ok(port):
            return False
        if self.kind == "name":
            return host == self.name
        return self.kind == "wildcard" and host.endswith("." + self.name)

    def matches_ip(self, ip: IPAddress, port: int | None) -> bool:
        return (self.net is not None and self._port_ok(port)
                and ip.version == self.net.version and ip in self.net)

    def _port_ok(self, port: int | None) -> bool:
        return self.port is None or port is None or self.port == port


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise PolicyError(f"invalid port in {entry!r}")
    return int(text)


@lru_cache(maxsize=4096)
def parse_entry(entry: str) -> Entry:
    """Parse one entry: "name", "*.suffix", "1.2.3.4", "10.0.0.0/8", "2001:db8::/32",
    "[::1]", each but CIDRs optionally with ":port". PolicyError names the bad entry."""
    if not isinstance(entry, str) or not entry.strip():
        raise PolicyError(f"invalid entry {entry!r}: empty")
    raw = entry.strip()
    if "/" in raw:
        try:
            net = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise PolicyError(f"invalid CIDR {raw!r} (CIDRs take no port)") from None
        return Entry(str(net), "cidr", net=net)
    host, port = raw, None
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise PolicyError(f"invalid entry {raw!r}: missing ']'")
        host, rest = raw[: close + 1], raw[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise PolicyError(f"invalid entry {raw!r}")
            port = _parse_port(rest[1:], raw)
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
        port = _parse_port(port_text, raw)
    suffix = f":{port}" if port is not None else ""
    wildcard = host.startswith("*.")
    try:
        value = normalize_host(host[2:] if wildcard else host)
    except PolicyError:
        raise PolicyError(f"invalid entry {raw!r}: not a host name, IP or CIDR") from None
    if wildcard:
        if not isinstance(value, str):
            raise PolicyError(f"invalid entry {raw!r}: wildcards take a domain")
        return Entry(f"*.{value}{suffix}", "wildcard", name=value, port=port)
    if isinstance(value, str):
        return Entry(f"{value}{suffix}", "name", name=value, port=port)
    net = ipaddress.ip_network(value)
    text = f"[{value}]{suffix}" if value.version == 6 and port is not None else f"{value}{suffix}"
    return Entry(text, "ip", net=net, port=port)


def parse_entries(items: object, field_name: str) -> tuple[str, ...]:
    if not isinstance(items, list | tuple):
        raise PolicyError(f"{field_name} must be a list of strings", field_name)
    if len(items) > MAX_ENTRIES:
        raise PolicyError(f"{field_name} has {len(items)} entries; at most {MAX_ENTRIES}",
                          field_name)
    out: dict[str, None] = {}
    for i, item in enumerate(items):
        try:
            out[parse_entry(item).text] = None
        except PolicyError as e:
            raise PolicyError(f"{field_name}[{i}]: {e.message}", field_name) from None
        except TypeError:
            raise PolicyError(f"{field_name}[{i}]: not a string", field_name) from None
    return tuple(out)


# ---------------------------------------------------------------- the policy


@dataclass(frozen=True)
class EgressPolicy:
    """A sandbox's egress policy. Build it with `parse` to validate and normalise entries."""

    egress: str
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __post_init__(self):
        if self.egress not in EGRESS_MODES:
            raise PolicyError(f"egress must be 'allow-all' or 'deny-all', not {self.egress!r}",
                              "network.egress")

    @classmethod
    def parse(cls, d: dict | None, default: EgressPolicy | None = None) -> EgressPolicy:
        """Validate a dict like {"egress": "deny-all", "allow": [...], "deny": [...]}; missing
        keys come from `default` (allow-all with no entries if None)."""
        base = default or cls("allow-all")
        if d is None:
            return base
        if not isinstance(d, dict):
            raise PolicyError("network policy must be an object", "network")
        unknown = sorted(set(d) - {"egress", "allow", "deny"})
        if unknown:
            raise PolicyError(f"unknown network keys: {', '.join(map(str, unknown))}", "network")
        egress = d.get("egress", base.egress)
        if egress not in EGRESS_MODES:
            raise PolicyError(f"egress must be 'allow-all' or 'deny-all', not {egress!r}",
                              "network.egress")
        allow = parse_entries(d["allow"], "network.allow") if "allow" in d else base.allow
        deny = parse_entries(d["deny"], "network.deny") if "deny" in d else base.deny
        return cls(egress, allow, deny)

    def to_dict(self) -> dict:
        return {"egress": self.egress, "allow": list(self.allow), "deny": list(self.deny)}

    @property
    def allow_entries(self) -> tuple[Entry, ...]:
        return _compile(self.allow)

    @property
    def deny_entries(self) -> tuple[Entry, ...]:
        return _compile(self.deny)


@lru_cache(maxsize=1024)
def _compile(entries: tuple[str, ...]) -> tuple[Entry, ...]:
    return tuple(parse_entry(e) for e in entries)


def host_matches(patterns: list[str] | tuple[str, ...], host: str, port: int | None) -> bool:
    """Does a host (any form) match one of `patterns` (policy entry grammar)? Invalid hosts
    or patterns never match."""
    try:
        h = normalize_host(host)
        entries = [parse_entry(p) for p in patterns]
    except PolicyError:
        return False
    if isinstance(h, str):
        return any(e.matches_name(h, port) for e in entries)
    return any(e.matches_ip(h, port) for e in entries)


def covers(outer: Entry, inner: Entry) -> bool:
    """Does allow entry `outer` allow everything `inner` would? (A name by the same name or
    a wildcard above it, an IP or CIDR by a CIDR holding it; a port only by no port or the
    same one.)"""
    if outer.port is not None and outer.port != inner.port:
        return False
    if inner.net is not None:
        return (outer.net is not None and inner.net.version == outer.net.version
                and inner.net.subnet_of(outer.net))
    if outer.kind == "name":
        return inner.kind == "name" and inner.name == outer.name
    if outer.kind == "wildcard":
        return inner.name.endswith("." + outer.name) or (
            inner.kind == "wildcard" and inner.name == outer.name)
    return False


def narrow(base: EgressPolicy, given: dict | None, field_name: str = "network") -> EgressPolicy:
    """`base` narrowed by `given` (a policy dict; what it leaves out is base's): what the
    result allows, both allow. Deny entries add up; `deny-all` keeps only the allow entries
    given, each of which `base` must allow in full when it is `deny-all` itself (else
    PolicyError naming the entry: a request may narrow the policy, never widen it)."""
    if not given:
        return base
    req = EgressPolicy.parse(given, default=base)
    deny = tuple(dict.fromkeys(base.deny + req.deny))
    if len(deny) > MAX_ENTRIES:
        raise PolicyError(f"{field_name}.deny: with the server's own deny entries that makes "
                          f"{len(deny)}; at most {MAX_ENTRIES}", f"{field_name}.deny")
    if req.egress == "allow-all":
        return EgressPolicy(base.egress, base.allow, deny)
    if base.egress == "deny-all":
        for i, entry in enumerate(req.allow_entries):
            if not any(covers(o, entry) for o in base.allow_entries):
                raise PolicyError(
                    f"{field_name}.allow[{i}]: {entry.text} is more than the server's policy "
                    f"allows (deny-all, allow: {', '.join(base.allow) or 'nothing'}); a request "
                    "may only narrow it", f"{field_name}.allow")
    return EgressPolicy("deny-all", req.allow, deny)


# ---------------------------------------------------------------- operator settings


@dataclass
class OperatorNet:
    """Server-wide egress settings. `host_addresses` None means read the host's interface
    addresses once from the system."""

    allow_cidrs: list = field(default_factory=list)
    resolve: dict[str, list[str]] = field(default_factory=dict)
    upstream_ca: list[str] = field(default_factory=list)
    protected_ports: set[int] = field(default_factory=set)
    connect_timeout: float = 10.0
    host_addresses: list | None = None

    @staticmethod
    def parse_resolve(items: list[str]) -> dict[str, list[str]]:
        """"NAME=IP[,IP...]" items (repeatable) into {name: [ip, ...]}; ValueError if bad."""
        out: dict[str, list[str]] = {}
        for item in items:
            name, sep, ips = item.partition("=")
            if not sep or not name.strip() or not ips.strip():
                raise ValueError(f"--egress-resolve wants NAME=IP, got {item!r}")
            try:
                host = normalize_host(name)
            except PolicyError:
                raise ValueError(f"--egress-resolve: invalid name in {item!r}") from None
            if not isinstance(host, str):
                # ValueError, not TypeError: the caller reports bad command-line values
                raise ValueError(f"--egress-resolve: {name!r} is an IP, not a name")  # noqa: TRY004
            for ip in ips.split(","):
                try:
                    addr = _unwrap_mapped(ipaddress.ip_address(ip.strip().strip("[]")))
                except ValueError:
                    raise ValueError(f"--egress-resolve: invalid IP {ip!r} in {item!r}") from None
                if str(addr) not in out.setdefault(host, []):
                    out[host].append(str(addr))
        return out

    @staticmethod
    def parse_cidrs(items: list[str]) -> list:
        """CIDRs (or single IPs) into ip_network objects; ValueError names the bad item."""
        out = []
        for item in items:
            try:
                out.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(f"--egress-allow-cidr: invalid CIDR {item!r}") from None
        return out

    def local_networks(self) -> list[IPNetwork]:
        """The host's own addresses as networks (read from the system on first use)."""
        if self.host_addresses is None:
            self.host_addresses = read_host_addresses()
        if not all(isinstance(a, IPNetwork) for a in self.host_addresses):
            self.host_addresses = [ipaddress.ip_network(a, strict=False)
                                   for a in self.host_addresses]
        return self.host_addresses


def read_host_addresses() -> list[IPNetwork]:
    """The host's own addresses (Linux /proc); empty if unreadable."""
    out: list[IPNetwork] = []
    try:
        # fib_trie: an address line "|-- 10.0.0.5" followed by "/32 host LOCAL"
        last = None
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            s = line.strip()
            if s.startswith("|-- "):
                last = s[4:]
            elif last and s.endswith("host LOCAL") and s.startswith("/"):
                net = ipaddress.ip_network(f"{last}{s.split()[0]}", strict=False)
                if net not in out:
                    out.append(net)
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexaddr = line.split()[0]
            out.append(ipaddress.ip_network(ipaddress.IPv6Address(int(hexaddr, 16))))
    except (OSError, ValueError, IndexError):
        pass
    return out


# ---------------------------------------------------------------- special-purpose ranges

_N = ipaddress.ip_network
_ALWAYS_DENY: list[tuple[IPNetwork, str]] = [
    (_N("0.0.0.0/8"), "this-network range"),
    (_N("10.0.0.0/8"), "private range"),
    (_N("100.64.0.0/10"), "CGNAT range"),
    (_N("127.0.0.0/8"), "loopback range"),
    (_N("169.254.0.0/16"), "link-local range"),
    (_N("172.16.0.0/12"), "private range"),
    (_N("192.0.0.0/24"), "IETF protocol range"),
    (_N("192.0.2.0/24"), "documentation range"),
    (_N("192.88.99.0/24"), "6to4 relay range"),
    (_N("192.168.0.0/16"), "private range"),
    (_N("198.18.0.0/15"), "benchmarking range"),
    (_N("198.51.100.0/24"), "documentation range"),
    (_N("203.0.113.0/24"), "documentation range"),
    (_N("224.0.0.0/4"), "multicast range"),
    (_N("255.255.255.255/32"), "broadcast address"),
    (_N("240.0.0.0/4"), "reserved range"),
    (_N("::/128"), "unspecified address"),
    (_N("::1/128"), "loopback address"),
    (_N("64:ff9b:1::/48"), "local NAT64 range"),
    (_N("100::/64"), "discard range"),
    (_N("2001:db8::/32"), "documentation range"),
    (_N("2001::/23"), "IETF protocol range"),
    (_N("3fff::/20"), "documentation range"),
    (_N("fc00::/7"), "unique-local range"),
    (_N("fe80::/10"), "link-local range"),
    (_N("fec0::/10"), "site-local range"),
    (_N("ff00::/8"), "multicast range"),
]
_GLOBAL_V6 = _N("2000::/3")
_NAT64 = _N("64:ff9b::/96")
# where a connection reaches this host itself: the server's ports there are protected
_LOCAL = [_N("0.0.0.0/8"), _N("127.0.0.0/8"), _N("::/128"), _N("::1/128")]


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, 6to4 or NAT64 IPv6 address, else None."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def special_range(ip: IPAddress, host_nets: list[IPNetwork]) -> str | None:
    """Why an address is always denied ("10.0.0.0/8 private range"), or None."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        why = special_range(inner, host_nets)
        return f"{why} in IPv6-embedded form" if why else None
    for net, label in _ALWAYS_DENY:
        if ip.version == net.version and ip in net:
            return f"{net} {label}"
    for net in host_nets:
        if ip.version == net.version and ip in net:
            return "host's own address"
    if ip.version == 6 and ip not in _GLOBAL_V6 and ip not in _NAT64:
        return "reserved IPv6 range"
    return None


# ---------------------------------------------------------------- decisions


@dataclass
class Decision:
    """allowed: may connect; rule: why (human); addresses: where to connect, in order;
    status: for refusals, 403 (policy), 400 (invalid host) or 502 (cannot resolve)."""

    allowed: bool
    rule: str
    addresses: list[IPAddress] = field(default_factory=list)
    status: int = 200


@dataclass
class NameVerdict:
    """Outcome of the name stage: allowed True/False, or None: decide per address."""

    allowed: bool | None
    rule: str


def name_stage(policy: EgressPolicy, host: str | IPAddress, port: int | None) -> NameVerdict:
    """Step 2 of the module docstring. `port` None (DNS) matches entries of any port, and
    deny entries then apply only without a port."""
    is_name = isinstance(host, str)

    def match(e: Entry, deny: bool) -> bool:
        if deny and port is None and e.port is not None:
            return False
        return e.matches_name(host, port) if is_name else e.matches_ip(host, port)

    for e in policy.deny_entries:
        if match(e, True):
            return NameVerdict(False, f"deny: {e.text}")
    if policy.egress == "allow-all":
        return NameVerdict(True, "allow-all")
    for e in policy.allow_entries:
        if match(e, False):
            return NameVerdict(True, f"allow: {e.text}")
    if is_name and any(e.net is not None for e in policy.allow_entries):
        return NameVerdict(None, f"deny-all: no allow rule matches {host}")
    return NameVerdict(False, f"deny-all: no allow rule matches {host}")


def address_stage(policy: EgressPolicy, operator: OperatorNet, verdict: NameVerdict,
                  ip: IPAddress, port: int | None) -> tuple[bool, str]:
    """Step 4 of the module docstring for one resolved address: (allowed, rule)."""
    ip = _unwrap_mapped(ip)
    for e in policy.deny_entries:
        if e.net is not None and e.matches_ip(ip, port) and not (port is None and e.port):
            return False, f"deny: {e.text}"
    host_nets = operator.local_networks()
    inner = embedded_ipv4(ip) or ip
    if port is not None and port in operator.protected_ports and any(
            inner.version == n.version and inner in n for n in _LOCAL + host_nets):
        return False, f"server port {port}"
    if not any(ip.version == n.version and ip in n for n in operator.allow_cidrs):
        why = special_range(ip, host_nets)
        if why:
            return False, f"always-deny: {why} ({ip})"
    if verdict.allowed:
        return True, verdict.rule
    for e in policy.allow_entries:
        if e.net is not None and e.matches_ip(ip, port):
            return True, f"allow: {e.text}"
    return False, f"{verdict.rule} ({ip})"


async def resolve(operator: OperatorNet, host: str, port: int) -> list[IPAddress]:
    """Addresses for a name: the operator's static map, else getaddrinfo; [] if none."""
    if host in operator.resolve:
        return [ipaddress.ip_address(a) for a in operator.resolve[host]]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), operator.connect_timeout)
    except (OSError, UnicodeError, TimeoutError):
        return []
    out: list[IPAddress] = []
    for family, *_rest, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = _unwrap_mapped(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]))
        if ip not in out:
            out.append(ip)
    return out


async def decide(policy: EgressPolicy, operator: OperatorNet, host: str, port: int | None,
                 pinned: list[IPAddress] | None = None) -> Decision:
    """The whole decision for host:port (port None: a DNS question). `pinned` skips
    resolution and checks only those addresses (a connection being reused)."""
    try:
        h = normalize_host(host)
    except PolicyError as e:
        return Decision(False, f"invalid host: {e.message}", status=400)
    verdict = name_stage(policy, h, port)
    if verdict.allowed is False:
        return Decision(False, verdict.rule, status=403)
    if pinned is not None:
        addresses = pinned
    elif isinstance(h, str):
        addresses = await resolve(operator, h, port or 443)
    else:
        addresses = [h]
    if not addresses and verdict.allowed is None:
        return Decision(False, verdict.rule, status=403)
    if not addresses:
        return Decision(False, f"cannot resolve {h}", status=502)
    allowed: list[IPAddress] = []
    rules: list[str] = []
    denials: list[str] = []
    for ip in addresses:
        ok, rule = address_stage(policy, operator, verdict, ip, port)
        if ok:
            allowed.append(ip)
            rules.append(rule)
        else:
            denials.append(rule)
    if allowed:
        return Decision(True, rules[0], allowed)
    return Decision(False, denials[0], status=403)
