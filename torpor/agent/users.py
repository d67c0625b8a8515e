"""The sandbox's accounts, read from /etc/passwd and /etc/group and cached.

Every command runs as some user, so the agent needs that user's ids, home, shell and
supplementary groups each time. Through glibc (NSS, with "files systemd" in the template's
nsswitch.conf) `getgrouplist()` alone took ~10 ms inside gVisor. Here the two files are
parsed once and parsed again only when one of them changes: checking costs two stat() calls.

A file changed twice within its timestamp granularity could keep the same signature, so a
file modified less than RACY_SECONDS before it was read is read again on the next lookup
(git's "racily clean" rule). Names the files do not know fall back to NSS, uncached.
"""

from __future__ import annotations

import os
import time

from protocol import OpError

PASSWD = "/etc/passwd"
GROUP = "/etc/group"
RACY_SECONDS = 2.0


class Account:
    __slots__ = ("gid", "groups", "home", "name", "shell", "uid")

    def __init__(self, name: str, uid: int, gid: int, home: str, shell: str,
                 groups: tuple[int, ...]):
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home
        self.shell = shell
        self.groups = groups  # supplementary groups, primary first (as getgrouplist)


def _signature(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read(path: str) -> list[list[str]]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if not line or line[0] in "#+-":  # comments, NIS compat entries
            continue
        rows.append(line.split(":"))
    return rows


class _Snapshot:
    """Both files as they were at one moment."""

    def __init__(self):
        now = time.time()
        self.sig = (_signature(PASSWD), _signature(GROUP))
        # a file this fresh may change again without changing its signature: do not trust it
        self.racy = any(s is not None and now - s[3] / 1e9 < RACY_SECONDS for s in self.sig)
        self.by_name: dict[str, tuple] = {}
        self.by_uid: dict[int, tuple] = {}
        for row in _read(PASSWD):
            if len(row) < 7:
                continue
            try:
                entry = (row[0], int(row[2]), int(row[3]), row[5], row[6])
            except ValueError:
                continue
            self.by_name.setdefault(entry[0], entry)  # the first entry wins, as in NSS
            self.by_uid.setdefault(entry[1], entry)
        self.members: dict[str, list[int]] = {}
        self.group_names: dict[int, str] = {}
        for row in _read(GROUP):
            if len(row) < 4:
                continue
            try:
                gid = int(row[2])
            except ValueError:
                continue
            self.group_names.setdefault(gid, row[0])
            for member in row[3].split(","):
                if member:
                    self.members.setdefault(member, []).append(gid)
        self.accounts: dict[str, Account] = {}
        self.nss_names: dict[int, str] = {}  # names of uids the files do not know

    def account(self, entry: tuple) -> Account:
        acc = self.accounts.get(entry[0])
        if acc is None:
            name, uid, gid, home, shell = entry
            groups = [gid]
            for g in self.members.get(name, ()):
                if g not in groups:
                    groups.append(g)
            acc = self.accounts[name] = Account(name, uid, gid, home, shell, tuple(groups))
        return acc


_snap: _Snapshot | None = None


def snapshot() -> _Snapshot:
    """The current accounts: two stat() calls, and a read of the files if they changed."""
    global _snap
    snap = _snap
    if snap is None or snap.racy or snap.sig != (_signature(PASSWD), _signature(GROUP)):
        snap = _snap = _Snapshot()
    return snap


def lookup(user, snap: _Snapshot | None = None) -> Account:
    """The account for a user name or uid (int, or a string of digits)."""
    snap = snap or snapshot()
    by_uid = isinstance(user, int) or str(user).isdigit()
    entry = snap.by_uid.get(int(user)) if by_uid else snap.by_name.get(str(user))
    if entry is not None:
        return snap.account(entry)
    return _lookup_nss(user, by_uid)


def _lookup_nss(user, by_uid: bool) -> Account:
    import pwd

    try:
        pw = pwd.getpwuid(int(user)) if by_uid else pwd.getpwnam(str(user))
    except KeyError:
        raise OpError("unknown_user", f"no user {user!r} in this sandbox") from None
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = (pw.pw_gid,)
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell, groups)


def user_name(uid: int, snap: _Snapshot | None = None) -> str:
    """The name of uid, or the uid as a string (for listings: never fails)."""
    snap = snap or snapshot()
    entry = snap.by_uid.get(uid)
    if entry is not None:
        return entry[0]
    name = snap.nss_names.get(uid)
    if name is None:
        try:
            name = _lookup_nss(uid, True).name
        except OpError:
            name = str(uid)
        snap.nss_names[uid] = name
    return name


def group_name(gid: int, snap: _Snapshot | None = None) -> str:
    """The name of group gid, or the gid as a string (for listings: never fails)."""
    snap = snap or snapshot()
    return snap.group_names.get(gid, str(gid))
