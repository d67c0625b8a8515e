"""Debian suites: bootstrapped with mmdebstrap on the host, from the operator's mirror.

The mirror is the `debian_mirror` setting, else the one the host's apt uses (deb822
`/etc/apt/sources.list.d/*.sources`, then the one-line `/etc/apt/sources.list` forms),
else deb.debian.org. The archive keys are the host's (`/etc/apt/trusted.gpg.d`; on
bookworm, debian-archive-keyring 2023.3+deb12u2 and later hold trixie's keys too).
"""

from __future__ import annotations

import re
from pathlib import Path

SUITES = ("bookworm", "trixie")
# Essential, apt and the packages of priority `required`: what debootstrap's minbase and
# Debian's container images hold; the agent brings its own Python
VARIANT = "minbase"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT = Path("/etc/apt")


def _suites_ok(suites: list[str]) -> bool:
    # the main archive: not the security archive, not a -updates or -backports suite only
    return any(not re.search(r"-(security|updates|backports|proposed-updates)$", s)
               for s in suites)


def host_mirror(apt: Path = APT) -> str:
    """The Debian mirror the host's apt uses (its first main archive), else
    deb.debian.org."""
    sources = sorted((apt / "sources.list.d").glob("*.sources")) if (
        apt / "sources.list.d").is_dir() else []
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for para in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in para.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in fields.get("types", "").split():
                continue
            uris = fields.get("uris", "").split()
            if uris and _suites_ok(fields.get("suites", "").split()):
                for uri in uris:
                    if uri.startswith(("http://", "https://")) and "security" not in uri:
                        return uri.rstrip("/")
    lists = [apt / "sources.list"]
    if (apt / "sources.list.d").is_dir():
        lists += sorted((apt / "sources.list.d").glob("*.list"))
    for path in lists:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            words = re.sub(r"\[[^\]]*\]", " ", line.split("#")[0]).split()
            if len(words) >= 3 and words[0] == "deb" and _suites_ok([words[2]]) \
                    and words[1].startswith(("http://", "https://")) \
                    and "security" not in words[1]:
                return words[1].rstrip("/")
    return DEFAULT_MIRROR


def mmdebstrap_argv(suite: str, target: Path, mirror: str) -> list[str]:
    # root mode (we are root); the device nodes it makes in /dev go with rootfs.scrub (a
    # sandbox's /dev is a tmpfs of its own)
    return ["mmdebstrap", f"--variant={VARIANT}", "--mode=root", "--format=directory",
            suite, str(target), mirror]
