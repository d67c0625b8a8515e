"""The sandbox's environment as a file, for programs started before it was known:
imported by `op_configure` when it sets the environment every command starts from.

A sandbox restored from a template's boot snapshot has processes that started in the
template's build (the code interpreter's server and its warm kernel), long before the
sandbox's own env existed; they read it here. ENV_FILE is JSON `{"env": {name: value}}`
(what the agent gives every new process on top of its defaults), written whole and moved
into place (a reader never sees half of it), root-owned with mode 0644 in a root-owned
directory of mode 0755: any user of the sandbox may read it (every command it starts gets
the same values anyway), none but root may change or replace it. Rewritten on every
configure, so it follows the env when the host sets it again.
"""

from __future__ import annotations

import os

from protocol import dumps  # the C half of json, as the agent's frames

ENV_DIR = os.environ.get("TORPOR_ENV_DIR", "/run/torpor")  # tests write it elsewhere
ENV_FILE = os.path.join(ENV_DIR, "env.json")


def write(env: dict[str, str]) -> str | None:
    """Write `env` to ENV_FILE; None, or why it could not be written."""
    try:
        os.makedirs(ENV_DIR, mode=0o755, exist_ok=True)
        st = os.lstat(ENV_DIR)
        if st.st_uid != os.geteuid() or not os.path.isdir(ENV_DIR) \
                or os.path.islink(ENV_DIR):
            # made by someone else (before the agent ever wrote it): not ours to trust
            return f"{ENV_DIR} is not a directory the agent owns"
        os.chmod(ENV_DIR, 0o755)
        tmp = f"{ENV_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, dumps({"env": env}).encode())
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.replace(tmp, ENV_FILE)
    except OSError as e:
        return f"{ENV_FILE}: {e.strerror or e}"
    return None
