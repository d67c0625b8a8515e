"""The agent's operations, written once: the `op` word of a stream's OPEN frame.

Stdlib only, and no imports at all: the agent loads it at start inside gVisor (by its bare
name, `import ops`), the host as `torpor.agent.ops`. The strings are the wire: an agent
checkpointed by an older Torpor still speaks them after a restore, so never change one;
add a new word instead. Each line says the OPEN's arguments -> the CLOSE's result (a
stream's other frames in brackets); every op may end in an error instead (`protocol.OpError`).
"""

# --- ops the host opens: the agent answers (torpor/agent/agent.py, fsops.py, netops.py) ---
PING = "ping"  # () -> {pid}
CONFIGURE = "configure"  # (env?) -> {env, egress_errors}: env is the base of every command
EXEC = "exec"  # (argv, env?, cwd?, user="user", stdin=False, timeout?, tag?, background=False)
# -> process info; not background: [MSG start {pid}, OUT/ERR output, MSG truncated {lost}],
# with stdin=True the stream's IN bytes and EOF are the process's stdin
PROC_LIST = "proc_list"  # () -> [process info]
PROC_INFO = "proc_info"  # (pid) -> process info
PROC_FOLLOW = "proc_follow"  # (pid, offset?, follow=True) -> process info [as EXEC's]
PROC_STDIN = "proc_stdin"  # (pid, data?, eof=False) -> {pid}; without data, the IN bytes
PROC_SIGNAL = "proc_signal"  # (pid, signal="SIGTERM") -> {pid}
PROC_WAIT = "proc_wait"  # (pid) -> process info, once it exited
OOM_KILL = "oom_kill"  # () -> {killed, ...}: the session using the most memory, killed
PIDS_KILL = "pids_kill"  # () -> {killed, ...}: the session with the most processes, killed
HIBERNATE_CHECK = "hibernate_check"  # () -> {problems}: what would make a checkpoint fail
RESUMED = "resumed"  # () -> {}: after a restore
FS_STAT = "fs_stat"  # (path, user="user") -> entry
FS_EXISTS = "fs_exists"  # (path, user="user") -> {exists}
FS_LIST = "fs_list"  # (path, depth=1, user="user") -> [entry]
FS_MKDIR = "fs_mkdir"  # (path, parents=True, user="user") -> {created, path}
FS_WRITE = "fs_write"  # (path, user="user", mode?, append=False, data?) -> {path, size};
# without data, the IN bytes until EOF
FS_READ = "fs_read"  # (path, user="user", offset=0, length?) -> {path, size}
# [MSG size {size}, OUT bytes]
FS_RENAME = "fs_rename"  # (src, dst, overwrite=False, user="user") -> {path}
FS_REMOVE = "fs_remove"  # (path, recursive=False, user="user") -> {removed, path}
CONNECT = "connect"  # (port, host="127.0.0.1") -> {bytes_to_host, bytes_to_socket}
# [MSG connected {port}, OUT/IN the socket's bytes, EOF a half-close]

HOST_OPS = frozenset({
    PING, CONFIGURE, EXEC, PROC_LIST, PROC_INFO, PROC_FOLLOW, PROC_STDIN, PROC_SIGNAL,
    PROC_WAIT, OOM_KILL, PIDS_KILL, HIBERNATE_CHECK, RESUMED, FS_STAT, FS_EXISTS, FS_LIST,
    FS_MKDIR, FS_WRITE, FS_READ, FS_RENAME, FS_REMOVE, CONNECT,
})

# --- ops the agent opens towards the host (netops.Egress; the host's Channel.on_open) -----
EGRESS = "egress"  # (listener: "http"|"socks", peer_port) [OUT/IN the connection's bytes]
DNS = "dns"  # (query: hex) -> {answer: hex}, the host's answer in its CLOSE

AGENT_OPS = frozenset({EGRESS, DNS})
