"""Making a fetched root filesystem fit to run as a sandbox, without trusting its content.

An image's files are hostile: a symlink `etc -> /etc` must not make the host's /etc what
Torpor reads or writes, and a device node must not reach the host through a lower layer.
So every path here is resolved as if the rootfs were `/` (symlinks followed inside it,
never out: what securejoin and `openat2(RESOLVE_IN_ROOT)` do), device nodes are removed,
and overlayfs's own xattrs (`trusted.overlay.*`, which would steer the host's overlay
mounts) are dropped. Then what the runtime needs is made: mount points (`/proc`, `/sys`,
`/dev`, `/tmp`, `/.torpor/usr`, `/.torpor/agent`), `/etc/hosts`, `/etc/hostname`,
`/etc/resolv.conf` (the sandbox's resolver), and the default user `user` (uid 1000, home
`/home/user`) when the image has no user of that name.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path, PurePosixPath

from torpor.templates import HOSTNAME, HOSTS, RESOLV_CONF, USER_UID

MAX_LINKS = 40  # symlinks followed in one path, like the kernel's ELOOP limit
MOUNT_POINTS = {"proc": 0o555, "sys": 0o555, "dev": 0o755, "tmp": 0o1777, "root": 0o700,
                "home": 0o755, "etc": 0o755, ".torpor": 0o755, ".torpor/usr": 0o755,
                ".torpor/agent": 0o755}


class UnsafeRootfs(ValueError):
    pass


def resolve_in(root: Path, path: str, follow_last: bool = True) -> Path:
    """`path` inside `root` as a process chrooted there would see it: absolute symlinks start
    again at `root`, `..` never climbs above it. Components that do not exist are appended
    as they are. The result is always under `root`."""
    todo = [p for p in PurePosixPath("/" + path).parts[1:] if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            done.append(part)
            continue
        if stat.S_ISLNK(st.st_mode) and (todo or follow_last):
            links += 1
            if links > MAX_LINKS:
                raise UnsafeRootfs(f"/{path}: too many levels of symbolic links")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in PurePosixPath(target).parts if p not in ("", ".", "/")] + todo
            continue
        done.append(part)
    return root.joinpath(*done)


def scrub(root: Path) -> dict[str, int]:
    """Remove device nodes and overlayfs xattrs anywhere under `root` (never following a
    symlink). Returns what it removed."""
    removed = {"devices": 0, "xattrs": 0}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                os.unlink(path)
                removed["devices"] += 1
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            try:
                names = os.listxattr(path, follow_symlinks=False)
            except OSError:
                continue
            for x in names:
                if x.startswith("trusted.overlay."):
                    os.removexattr(path, x, follow_symlinks=False)
                    removed["xattrs"] += 1
    return removed


def read_text(root: Path, path: str) -> str | None:
    """A regular file inside `root`, or None if there is none (or it is something else, or
    its path loops)."""
    try:
        target = resolve_in(root, path)
    except UnsafeRootfs:
        return None
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(16 << 20).decode("utf-8", "replace")
    finally:
        os.close(fd)


def write_text(root: Path, path: str, text: str, mode: int = 0o644,
               follow_last: bool = True) -> None:
    """Write a regular file inside `root`, making its directories; with `follow_last` false a
    symlink (or anything but a regular file) at the path itself is replaced."""
    target = resolve_in(root, path, follow_last=follow_last)
    make_dirs(root, str(target.parent.relative_to(root)))
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        _remove(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode())
        os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None and stat.S_ISREG(st.st_mode)
                  else mode)


def make_dirs(root: Path, path: str, mode: int = 0o755, owner: tuple[int, int] = (0, 0)
              ) -> Path:
    """A directory inside `root` (its missing parents made root's, 0755); something that
    is not a directory in its place is replaced."""
    target = resolve_in(root, path)
    rel = target.relative_to(root).parts
    cur = root
    for i, part in enumerate(rel):
        cur = cur / part
        last = i == len(rel) - 1
        try:
            st = os.lstat(cur)
            if stat.S_ISDIR(st.st_mode):
                continue
            _remove(cur)  # (a symlink here was resolved already: it dangles or loops)
        except FileNotFoundError:
            pass
        os.mkdir(cur, mode if last else 0o755)
        os.chmod(cur, mode if last else 0o755)  # (not the umask's)
        if last:
            os.lchown(cur, *owner)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _entries(text: str | None) -> list[list[str]]:
    return [line.split(":") for line in (text or "").splitlines() if line and
            not line.startswith("#")]


def prepare(root: Path, workdir: str | None = None) -> dict:
    """Make `root` fit to run as a sandbox (see the module's doc). Returns what it did."""
    did: dict = scrub(root)
    for d, mode in MOUNT_POINTS.items():
        if not resolve_in(root, d).is_dir():
            make_dirs(root, d, mode)
    shell = "/bin/bash" if resolve_in(root, "bin/bash").is_file() else "/bin/sh"
    passwd = read_text(root, "etc/passwd")
    users = {e[0]: e for e in _entries(passwd) if len(e) >= 7}
    added = []
    lines = (passwd or "").rstrip("\n").splitlines()
    if "root" not in users:
        lines.insert(0, f"root:x:0:0:root:/root:{shell}")
        added.append("root")
    if "user" not in users:
        lines.append(f"user:x:{USER_UID}:{USER_UID}:Sandbox user:/home/user:{shell}")
        users["user"] = ["user", "x", str(USER_UID), str(USER_UID), "", "/home/user", shell]
        added.append("user")
    if added:
        write_text(root, "etc/passwd", "\n".join(lines) + "\n")
    group = read_text(root, "etc/group")
    groups = {e[0] for e in _entries(group) if len(e) >= 3}
    glines = (group or "").rstrip("\n").splitlines()
    if "root" not in groups:
        glines.insert(0, "root:x:0:")
    if "user" not in groups:
        glines.append(f"user:x:{USER_UID}:")
    if not {"root", "user"} <= groups:
        write_text(root, "etc/group", "\n".join(glines) + "\n")
    shadow = read_text(root, "etc/shadow")
    if shadow is not None and "user" in added:
        write_text(root, "etc/shadow", shadow.rstrip("\n") + "\nuser:*:19000:0:99999:7:::\n",
                   0o640)
    # the user's home, theirs (an image that has `user` keeps the home it gave it)
    entry = users["user"]
    home = entry[5] or "/home/user"
    try:
        uid, gid = int(entry[2]), int(entry[3])
    except ValueError:
        uid, gid = USER_UID, USER_UID
    if not resolve_in(root, home).is_dir():
        make_dirs(root, home, 0o750, (uid, gid))
    if workdir and not resolve_in(root, workdir).is_dir():
        make_dirs(root, workdir)
    # what a container runtime would bind-mount: the sandbox's own
    write_text(root, "etc/hosts", HOSTS, follow_last=False)
    write_text(root, "etc/hostname", HOSTNAME, follow_last=False)
    write_text(root, "etc/resolv.conf", RESOLV_CONF, follow_last=False)
    did["users_added"] = added
    return did


def is_enospc(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno == errno.ENOSPC
