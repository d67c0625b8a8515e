"""OCI images: references as docker writes them, the registry settings skopeo reads, and what
skopeo's failures mean.

Fetching and unpacking are skopeo's and umoci's (see `torpor/sources/__init__.py`); this
module only turns `python:3.12-slim` into `docker.io/library/python:3.12-slim`, the
operator's mirrors and insecure registries into a registries.conf(5), and skopeo's last
words into an error that names the image, the registry and the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")
# the grammar of github.com/distribution/reference (what docker and skopeo accept)
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)"
                     r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port]
    repository: str  # path inside it: library/python
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return (self.name + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))

    def pinned(self, digest: str) -> str:
        """The same image by the digest it has now (a tag that moves meanwhile is not
        followed)."""
        return f"{self.name}@{digest}"


def parse_image(ref: str) -> ImageRef:
    """An image reference normalised as docker does: `python` is
    docker.io/library/python:latest, `me/app:1` docker.io/me/app:1, `ghcr.io/x/y` and
    `127.0.0.1:5000/x` name their registry. ValueError says what is wrong."""
    if not isinstance(ref, str) or not ref or len(ref) > 512 or ref != ref.strip():
        raise ValueError(f"image reference {ref!r} is not valid")
    name, _, digest = ref.partition("@")
    tag = None
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1:]
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"
                  or first != first.lower()):
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if not _DOMAIN.fullmatch(registry):
        raise ValueError(f"image reference {ref!r}: {registry!r} is not a registry host")
    if not path or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
        raise ValueError(f"image reference {ref!r}: repository {path!r} is not valid "
                         "(lowercase letters, digits, and . _ - between them, / between "
                         "parts)")
    if tag is not None and not _TAG.fullmatch(tag):
        raise ValueError(f"image reference {ref!r}: tag {tag!r} is not valid")
    if digest and not _DIGEST.fullmatch(digest):
        raise ValueError(f"image reference {ref!r}: digest {digest!r} is not valid")
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(registry, path, tag, digest or None)


def parse_mirrors(entries: list[str] | tuple[str, ...]) -> tuple[dict[str, str], set[str]]:
    """The operator's mirrors: "REGISTRY=MIRROR" (MIRROR is host[:port][/path]) or a bare
    "MIRROR", which mirrors docker.io. An http:// mirror is reached without TLS. Returns
    ({registry: mirror}, {mirror hosts to reach without TLS})."""
    mirrors: dict[str, str] = {}
    plain: set[str] = set()
    for entry in entries:
        registry, sep, location = str(entry).strip().partition("=")
        if not sep:
            registry, location = DOCKER_HUB, registry
        registry = DOCKER_HUB if registry in _HUB_ALIASES else registry.strip()
        location = location.strip().rstrip("/")
        if location.startswith("http://"):
            location = location.removeprefix("http://")
            plain.add(location.split("/")[0])
        location = location.removeprefix("https://")
        host = location.split("/")[0]
        if not _DOMAIN.fullmatch(registry) or not host or not _DOMAIN.fullmatch(host):
            raise ValueError(f"registry mirror {entry!r}: write REGISTRY=HOST[:PORT][/PATH] "
                             "or HOST[:PORT][/PATH] (a mirror of docker.io)")
        mirrors[registry] = location
    return mirrors, plain


def registries_conf(mirrors: dict[str, str], insecure: set[str]) -> str:
    """A registries.conf(5) for skopeo: each mirrored registry with its mirror (tried first;
    the registry itself after it), and the hosts reached without TLS."""
    out = ["# written by Torpor from its registry settings; do not edit",
           'short-name-mode = "disabled"', ""]
    for registry in sorted(set(mirrors) | {h for h in insecure if h not in mirrors}):
        out += ["[[registry]]", f"prefix = {json.dumps(registry)}",
                f"location = {json.dumps(registry)}",
                f"insecure = {json.dumps(registry in insecure)}"]
        if registry in mirrors:
            mirror = mirrors[registry]
            out += ["[[registry.mirror]]", f"location = {json.dumps(mirror)}",
                    f"insecure = {json.dumps(mirror.split('/')[0] in insecure)}"]
        out.append("")
    return "\n".join(out)


def skopeo_reason(stderr: str) -> str:
    """skopeo's own message (the `msg="..."` of its fatal log line), else its last line."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        m = re.search(r'level=fatal msg="((?:[^"\\]|\\.)*)"', line)
        if m:
            try:
                return json.loads(f'"{m.group(1)}"')
            except ValueError:
                return m.group(1)
    return lines[-1] if lines else "no output"


_NOT_FOUND = ("manifest unknown", "name unknown", "not found", "no such image",
              "repository name not known")
_DENIED = ("unauthorized", "authentication required", "denied", "forbidden")
_UNREACHABLE = ("pinging container registry", "dial tcp", "connection refused",
                "no such host", "i/o timeout", "tls:", "x509:", "eof",
                "server gave http response", "network is unreachable", "timeout",
                "connection reset")


def classify(reason: str) -> str:
    """"unreachable", "not_found", "denied", "disk_full" or "other" for skopeo's reason."""
    low = reason.lower()
    if "no space left on device" in low:
        return "disk_full"
    # (a registry that cannot be reached says so before anything else)
    if "pinging container registry" in low or any(w in low for w in ("dial tcp",
                                                                     "no such host")):
        return "unreachable"
    if any(w in low for w in _NOT_FOUND):
        return "not_found"
    if any(w in low for w in _DENIED):
        return "denied"
    if any(w in low for w in _UNREACHABLE):
        return "unreachable"
    return "other"


def hint(reason: str) -> str:
    low = reason.lower()
    if "x509:" in low or "certificate" in low:
        return (" (the registry's certificate is not trusted: give its CA with "
                "--registry-cert-dir, or list the host in --registry-insecure)")
    if "server gave http response" in low:
        return " (it speaks plain HTTP: list the host in --registry-insecure)"
    return ""
