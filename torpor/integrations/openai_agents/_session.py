"""`TorporSandboxSession`: one Torpor sandbox behind the Agents SDK's session interface.

Commands, files, ports and terminals go through the Torpor SDK's `AsyncSandbox`; anything
the SDK builds from `exec` (ls, rm, mkdir, mv, path checks, fingerprints) runs as it does
for the other remote providers. Paths are confined to the workspace the SDK's way: a helper
it installs resolves each one inside the sandbox (symlinks included) before use.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Literal
from urllib.parse import urlsplit

from agents.sandbox.errors import (
    ExecNonZeroError,
    ExposedPortUnavailableError,
    WorkspaceArchiveReadError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
    WorkspaceStartError,
    WorkspaceWriteTypeError,
)
from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
from agents.sandbox.session.bounded_read import collect_bounded
from agents.sandbox.session.pty_types import PtyExecUpdate
from agents.sandbox.session.runtime_helpers import (
    RESOLVE_WORKSPACE_PATH_HELPER,
    RuntimeHelperScript,
)
from agents.sandbox.session.sandbox_session_state import SandboxSessionState
from agents.sandbox.types import ExecResult, ExposedPortEndpoint, User
from agents.sandbox.workspace_paths import (
    coerce_posix_path,
    posix_path_as_path,
    sandbox_path_str,
)
from pydantic import Field

from torpor.integrations.openai_agents import _errors, _workspace
from torpor.integrations.openai_agents._pty import PtyProcesses
from torpor.sdk import AsyncSandbox
from torpor.sdk.errors import NotFoundError, TorporError
from torpor.sdk.models import CommandResult

logger = logging.getLogger(__name__)

OnExit = Literal["keep", "hibernate", "delete"]
# states in which any request reaches the sandbox (a sleeping one is woken by it)
LIVE_STATES = ("creating", "running", "standby", "hibernated")
FAST_OP_S = 30.0


class TorporSandboxSessionState(SandboxSessionState):
    """What resumes a session: the sandbox's id, and how to make it again were it gone.

    It holds no API key and no server URL (the client brings those). `env` values are
    kept as given; pass secrets as Torpor secrets (`secrets={"VAR": "secret-name"}`), of
    which only the name is kept."""

    type: Literal["torpor"] = "torpor"
    sandbox_id: str
    template: str = "base"
    env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    cpu: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    standby_after: float | None = None
    hibernate_after: float | None = None
    ttl: float | None = None
    idle_ttl: float | None = None
    expire_action: Literal["delete", "hibernate"] | None = None
    network: dict[str, object] | None = None
    secrets: dict[str, str] | None = None
    volumes: dict[str, object] | None = None
    from_snapshot: str | None = None
    on_exit: OnExit = "keep"
    public_ports: bool = False
    preview_url_ttl_s: float = 3600
    workspace_tar_timeout_s: float = 300


class TorporSandboxSession(BaseSandboxSession):
    """A session on one Torpor sandbox. `session.sandbox` is the Torpor SDK's
    `AsyncSandbox` for what the Agents SDK has no word for (snapshots, fork, hibernate,
    keep-alive holds, egress policy)."""

    state: TorporSandboxSessionState

    def __init__(self, *, state: TorporSandboxSessionState,
                 connect: Callable[[str], AsyncSandbox],
                 sandbox: AsyncSandbox | None = None) -> None:
        self.state = state
        self._connect = connect
        self._sandbox = sandbox
        self._root_ready = state.workspace_root_ready
        self._ptys = PtyProcesses()

    @property
    def sandbox_id(self) -> str:
        return self.state.sandbox_id

    @property
    def sandbox(self) -> AsyncSandbox:
        """The Torpor SDK handle (made again if the session closed its connections)."""
        if self._sandbox is None:
            self._sandbox = self._connect(self.state.sandbox_id)
        return self._sandbox

    async def close_connections(self) -> None:
        """Release the HTTP connections; the sandbox itself is untouched."""
        sbx, self._sandbox = self._sandbox, None
        if sbx is not None:
            await sbx.close()

    # --- start and stop ---------------------------------------------------------------------

    def _runtime_helpers(self) -> tuple[RuntimeHelperScript, ...]:
        return (RESOLVE_WORKSPACE_PATH_HELPER,)

    def _current_runtime_helper_cache_key(self) -> object | None:
        return self.state.sandbox_id

    async def _validate_path_access(self, path: Path | str, *, for_write: bool = False) -> Path:
        return await self._validate_remote_path_access(path, for_write=for_write)

    def _mark_workspace_root_ready_from_probe(self) -> None:
        super()._mark_workspace_root_ready_from_probe()
        self._root_ready = True

    async def _ensure_runtime_helper_installed(self, helper: RuntimeHelperScript) -> PurePath:
        """As the SDK's own (cached per sandbox, looked for before each use, installed when
        missing), with the files API instead of processes: a stat instead of `test -x`,
        one write instead of a heredoc through sh (~3 ms each under gVisor, not 15-100)."""
        self._sync_runtime_helper_install_cache()
        installed = self._runtime_helpers_installed
        if installed is None:
            installed = self._runtime_helpers_installed = set()
        path = helper.install_path
        if path in installed:
            try:
                info = await self.sandbox.files.stat(str(path))
                if info.type == "file" and info.mode & 0o111:
                    return path
            except NotFoundError as e:
                if _errors.sandbox_gone(e):
                    raise _errors.exec_error(e, helper.present_command(), None) from e
            except TorporError as e:
                raise _errors.exec_error(e, helper.present_command(), None) from e
            installed.discard(path)
        try:
            await self.sandbox.files.write(str(path), helper.content + "\n", mode=0o555)
        except TorporError as e:
            raise _errors.exec_error(e, ("install_runtime_helper", str(path)), None) from e
        installed.add(path)
        return path

    async def mkdir(self, path: Path | str, *, parents: bool = False,
                    user: str | User | None = None) -> None:
        """As the SDK's (the path checked first; an existing directory is an error without
        `parents`), made by the files API instead of a `mkdir` process."""
        if user is not None:
            path = await self._check_mkdir_with_exec(path, parents=parents, user=user)
        else:
            path = await self._validate_path_access(path, for_write=True)
        try:
            made = await self.sandbox.files.make_dir(sandbox_path_str(path), parents=parents,
                                                     user=user_name(user))
        except TorporError as e:
            raise WorkspaceArchiveWriteError(
                path=path, context=_errors.context(e, reason="mkdir_failed"), cause=e,
                retryable=_errors.retryable(e)) from e
        if not made and not parents:
            raise WorkspaceArchiveWriteError(
                path=path, context={"backend": _errors.BACKEND, "reason": "exists"},
                message=f"cannot create directory {path}: it exists")

    async def _prepare_backend_workspace(self) -> None:
        if self._workspace_state_preserved_on_start() and self._root_ready:
            return
        root = self._workspace_root_path().as_posix()
        # as the template's user, through the files API (no process: ~3 ms, not ~35); a
        # root it may not create (the SDK's default, /workspace) is made by root and given
        # to it
        try:
            await self.sandbox.files.make_dir(root, parents=True)
            self._root_ready = True
            return
        except NotFoundError as e:
            if _errors.sandbox_gone(e):
                raise WorkspaceStartError(path=Path(root), context=_errors.context(e),
                                          cause=e, retryable=False) from e
        except TorporError:
            pass  # not the user's to make: root does it below, and says why if it cannot
        script = 'mkdir -p -- "$1" 2>/dev/null && exit 0; echo "$(id -u):$(id -g)"; exit 3'
        first = await self._run(["sh", "-c", script, "sh", root], cwd="/", timeout=FAST_OP_S)
        result = first
        if first.exit_code == 3:
            owner = first.stdout.strip()
            result = await self._run(["sh", "-c", 'mkdir -p -- "$1" && chown -- "$2" "$1"',
                                      "sh", root, owner], cwd="/", user="root",
                                     timeout=FAST_OP_S)
        if result.exit_code != 0:
            raise WorkspaceStartError(
                path=Path(root), message=f"failed to start session: cannot create the "
                f"workspace root {root} in sandbox {self.sandbox_id}: {result.stderr.strip()}",
                context={"backend": _errors.BACKEND, "reason": "workspace_root_nonzero_exit",
                         "exit_code": result.exit_code, "stderr": result.stderr[-4096:]})
        self._root_ready = True

    async def _shutdown_backend(self) -> None:
        """What `on_exit` says: keep the sandbox (it sleeps when idle and a resume finds
        it as it was), hibernate it now, or delete it."""
        await apply_on_exit(self, self.state.on_exit)

    async def _after_shutdown(self) -> None:
        await self.close_connections()

    async def running(self) -> bool:
        if not self._root_ready:
            return False
        try:
            info = await self.sandbox.info()
        except TorporError:
            return False
        return info.state in LIVE_STATES

    # --- commands ---------------------------------------------------------------------------

    async def _resolved_env(self) -> dict[str, str]:
        return dict(await self.state.manifest.environment.resolve())

    def _cwd(self) -> str | None:
        return self._workspace_root_path().as_posix() if self._root_ready else None

    async def _run(self, argv: list[str], *, cwd: str | None, user: str | None = None,
                   timeout: float | None) -> CommandResult:
        """Run `argv` in the sandbox (woken if asleep); SDK errors for what went wrong."""
        env = await self._resolved_env()
        try:
            return await self.sandbox.commands.run(argv, env=env or None, cwd=cwd, user=user,
                                                   timeout=timeout)
        except TorporError as e:
            raise _errors.exec_error(e, argv, timeout, cwd) from e

    async def _exec_internal(self, *command: str | Path,
                             timeout: float | None = None) -> ExecResult:
        argv, user = split_user([str(c) for c in command])
        if timeout is not None and timeout <= 0:
            timeout = 0.001  # "no time at all": Torpor refuses 0, so the least it takes
        result = await self._run(argv, cwd=self._cwd(), user=user, timeout=timeout)
        # Torpor returns a command's output as text (UTF-8, invalid bytes as U+FFFD)
        return ExecResult(stdout=result.stdout.encode(), stderr=result.stderr.encode(),
                          exit_code=result.exit_code)

    async def _exec_checked_nonzero(self, *command: str | Path) -> ExecResult:
        """The SDK's administrative commands (accounts for a manifest's users and groups,
        an entry's group and mode, mounts) need root, which a Docker backend's default
        user is; here they run as the sandbox's root, not the template's user."""
        result = await self.exec(*command, shell=False, user="root")
        if not result.ok():
            raise ExecNonZeroError(result, command=command)
        return result

    def supports_pty(self) -> bool:
        return True

    async def pty_exec_start(self, *command: str | Path, timeout: float | None = None,
                             shell: bool | list[str] = True, user: str | User | None = None,
                             tty: bool = False, yield_time_s: float | None = None,
                             max_output_tokens: int | None = None) -> PtyExecUpdate:
        argv, as_user = split_user(self._prepare_exec_command(*command, shell=shell,
                                                              user=user))
        env, cwd = await self._resolved_env(), self._cwd()
        try:
            return await self._ptys.start(self.sandbox, argv, tty=tty, env=env or None,
                                          cwd=cwd, user=as_user, timeout=timeout,
                                          yield_time_s=yield_time_s,
                                          max_output_tokens=max_output_tokens)
        except TorporError as e:
            raise _errors.exec_error(e, argv, timeout, cwd) from e

    async def pty_write_stdin(self, *, session_id: int, chars: str,
                              yield_time_s: float | None = None,
                              max_output_tokens: int | None = None) -> PtyExecUpdate:
        try:
            return await self._ptys.write(session_id, chars, yield_time_s=yield_time_s,
                                          max_output_tokens=max_output_tokens)
        except TorporError as e:
            raise _errors.exec_error(e, ["write_stdin", str(session_id)], None) from e

    async def pty_terminate_all(self) -> None:
        await self._ptys.terminate_all()

    # --- files ------------------------------------------------------------------------------

    async def read(self, path: Path | str, *, user: str | User | None = None) -> io.IOBase:
        error_path = posix_path_as_path(coerce_posix_path(path))
        workspace_path = await self._validate_path_access(path)
        try:
            data = await self.sandbox.files.read(sandbox_path_str(workspace_path), "bytes",
                                                 user=user_name(user))
        except TorporError as e:
            raise read_error(e, error_path) from e
        return io.BytesIO(data)

    async def _read_bounded(self, path: Path, *, max_bytes: int) -> bytes:
        workspace_path = await self._validate_path_access(path)
        try:
            stream = await self.sandbox.files.read(sandbox_path_str(workspace_path), "stream")
            try:
                return await collect_bounded(stream, max_bytes)
            finally:
                await stream.aclose()
        except TorporError as e:
            raise read_error(e, path) from None

    async def write(self, path: Path | str, data: io.IOBase, *,
                    user: str | User | None = None) -> None:
        error_path = posix_path_as_path(coerce_posix_path(path))
        payload = data.read()
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if not isinstance(payload, bytes | bytearray):
            raise WorkspaceWriteTypeError(path=error_path, actual_type=type(payload).__name__)
        workspace_path = await self._validate_path_access(path, for_write=True)
        try:
            await self.sandbox.files.write(sandbox_path_str(workspace_path), bytes(payload),
                                           user=user_name(user))
        except TorporError as e:
            raise WorkspaceArchiveWriteError(path=workspace_path, context=_errors.context(e),
                                             cause=e, retryable=_errors.retryable(e)) from e

    # --- ports ------------------------------------------------------------------------------

    async def _resolve_exposed_port(self, port: int) -> ExposedPortEndpoint:
        """A URL of the port on Torpor's preview listener: public (`public_ports`), or
        signed, with its token in the query, valid for `preview_url_ttl_s`."""
        try:
            if self.state.public_ports:
                url = (await self.sandbox.expose(port, public=True)).url
            else:
                url = await self.sandbox.preview_url(port, self.state.preview_url_ttl_s)
        except TorporError as e:
            raise ExposedPortUnavailableError(
                port=port, exposed_ports=self.state.exposed_ports, reason="backend_unavailable",
                context=_errors.context(e), cause=e) from e
        split = urlsplit(url)
        if not split.hostname:
            raise ExposedPortUnavailableError(
                port=port, exposed_ports=self.state.exposed_ports, reason="backend_unavailable",
                context={"backend": _errors.BACKEND, "detail": "invalid_preview_url",
                         "url": url})
        tls = split.scheme == "https"
        return ExposedPortEndpoint(host=split.hostname, port=split.port or (443 if tls else 80),
                                   tls=tls, query=split.query)

    # --- the workspace as a tar (the SDK's snapshots; _workspace.py) ---------------------

    async def persist_workspace(self) -> io.IOBase:
        return await _workspace.persist(self)

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        await _workspace.hydrate(self, data)
        self._root_ready = True


# --- shared with the client ----------------------------------------------------------------

async def apply_on_exit(session: TorporSandboxSession, on_exit: OnExit) -> None:
    """Keep, hibernate or delete the session's sandbox; failures are logged, not raised
    (a sandbox that cannot hibernate now still sleeps by itself when idle)."""
    if on_exit == "keep":
        return
    try:
        if on_exit == "hibernate":
            await session.sandbox.hibernate()
        else:
            await session.sandbox.delete()
    except NotFoundError:
        pass  # gone already
    except TorporError as e:
        logger.warning("Torpor sandbox %s: on_exit=%s failed: %s", session.sandbox_id,
                       on_exit, e)


def split_user(argv: list[str]) -> tuple[list[str], str | None]:
    """The SDK runs a command as another user by prefixing `sudo -u NAME --`; Torpor runs
    it as that user itself (no sudo needed in the template)."""
    if len(argv) >= 4 and argv[0] == "sudo" and argv[1] == "-u" and argv[3] == "--":
        return argv[4:], argv[2]
    return argv, None


def user_name(user: str | User | None) -> str | None:
    return user.name if isinstance(user, User) else user


def read_error(error: TorporError, path: Path) -> Exception:
    if isinstance(error, NotFoundError) and not _errors.sandbox_gone(error):
        return WorkspaceReadNotFoundError(path=path, context=_errors.context(error),
                                          cause=error)
    return WorkspaceArchiveReadError(path=path, context=_errors.context(error), cause=error,
                                     retryable=_errors.retryable(error))
