"""Finding a command in PATH, the way execvp() does, with a cached index of each directory.

`shutil.which` tries every directory in turn with several stat()/access() calls each; inside
gVisor a syscall costs ~70 us, and `true` sits in the fourth directory of the default PATH.
Here each directory's entry names are listed once and kept with the directory's identity
and mtime (an entry added, removed or renamed changes the mtime): a lookup costs one stat()
per directory up to the one holding the name, and no Python-level walk.

The result is a list of candidates in PATH order rather than one path: like execvp(), the
caller tries each and goes on past one it may not execute (EACCES: a directory, a file
without the x bit for that user), so the index need not know file modes, which can change
without touching the directory's mtime.

A directory modified less than RACY_SECONDS before it was listed may change again within
its timestamp granularity without its mtime changing, so it is listed again next time.
"""

from __future__ import annotations

import os
import time

RACY_SECONDS = 2.0
MAX_DIRS = 256  # directories indexed at most; past that the index starts over


class _Dir:
    __slots__ = ("names", "racy", "sig")

    def __init__(self, sig, names, racy):
        self.sig = sig
        self.names = names  # frozenset, or None if the directory could not be listed
        self.racy = racy


_index: dict[str, _Dir] = {}


def _signature(d: str):
    try:
        st = os.stat(d)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_mtime_ns)


def _names(d: str):
    """The index of directory d (absolute), listed again only if it changed."""
    sig = _signature(d)
    entry = _index.get(d)
    if entry is not None and entry.sig == sig and not entry.racy:
        return entry.names
    if sig is None:
        names = frozenset()
        racy = False
    else:
        try:
            names = frozenset(os.listdir(d))
        except OSError:
            names = None
        racy = time.time() - sig[2] / 1e9 < RACY_SECONDS
    if len(_index) >= MAX_DIRS:
        _index.clear()
    _index[d] = _Dir(sig, names, racy)
    return names


def candidates(name: str, path: str):
    """Paths to try, in order, to run command `name` (no slash in it) with this PATH.

    A generator: a caller that stops at the first success never looks at (nor stats) the
    directories after it. Relative directories of PATH (and the empty entry, meaning ".")
    are taken from the current directory, as execvp does: they are not indexed, only tried.
    """
    for d in path.split(":"):
        if not d:
            d = "."
        if d[0] != "/":
            yield os.path.join(d, name)
            continue
        names = _names(d)
        if names is None or name in names:
            yield d + name if d.endswith("/") else d + "/" + name
