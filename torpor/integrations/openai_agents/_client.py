"""`TorporSandboxClient`: create, resume and delete Torpor sandboxes for the Agents SDK."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
from agents.sandbox.errors import WorkspaceStartError
from agents.sandbox.manifest import Manifest
from agents.sandbox.session import SandboxSession, SandboxSessionState
from agents.sandbox.session.dependencies import Dependencies
from agents.sandbox.session.manager import Instrumentation
from agents.sandbox.session.sandbox_client import BaseSandboxClient, BaseSandboxClientOptions
from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot
from pydantic import ConfigDict

from torpor.integrations.openai_agents import _errors
from torpor.integrations.openai_agents._session import (
    LIVE_STATES,
    OnExit,
    TorporSandboxSession,
    TorporSandboxSessionState,
    apply_on_exit,
)
from torpor.sdk import AsyncSandbox
from torpor.sdk.config import DEFAULT_REQUEST_TIMEOUT
from torpor.sdk.errors import NotFoundError, TorporError

logger = logging.getLogger(__name__)

# the SDK's own default (Manifest().root) is /workspace; a session created without a
# manifest works in the template user's home instead, as the base template's commands do
DEFAULT_WORKSPACE_ROOT = "/home/user/workspace"

# what a new sandbox is made with: the options' fields that the state keeps for a remake
_SANDBOX_FIELDS = ("template", "env", "metadata", "cpu", "memory_mb", "disk_mb",
                   "standby_after", "hibernate_after", "ttl", "idle_ttl", "expire_action",
                   "network", "secrets", "volumes", "from_snapshot")


class TorporSandboxClientOptions(BaseSandboxClientOptions):
    """How to make the sandbox (the arguments of Torpor's `Sandbox.create`) and what the
    session does with it.

    - `template`, `env`, `metadata`, `cpu`, `memory_mb`, `disk_mb`, the timers
      (`standby_after`, `hibernate_after`, `ttl`, `idle_ttl`, `expire_action`), `network`
      (egress policy), `secrets` (`{"ENV_VAR": "secret-name"}`) and `volumes`: as for
      `torpor.Sandbox.create`; unset ones are the template's or the server's.
    - `from_snapshot`: a Torpor snapshot's id (`Sandbox.snapshot()`): the sandbox starts as
      a copy of it, processes included when it holds memory (then leave `memory_mb` and
      `disk_mb` out). Not the SDK's `snapshot=`, which is the workspace tar.
    - `on_exit`: what closing the session does to the sandbox. "keep" (default): nothing;
      it falls into standby when idle, then hibernates, and a resume from the session's
      state finds it with its files and processes. "hibernate": checkpoint it now.
      "delete": delete it.
    - `exposed_ports`: ports `resolve_exposed_port` may answer for; `public_ports`: make
      them public (else each answer is a signed URL valid `preview_url_ttl_s` seconds).
    - `workspace_tar_timeout_s`: bound on taring or untaring the workspace (the SDK's
      snapshots).
    """

    # a misspelt option is an error naming it, not a default silently kept
    model_config = ConfigDict(extra="forbid")

    type: Literal["torpor"] = "torpor"
    template: str = "base"
    env: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    cpu: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    standby_after: float | None = None
    hibernate_after: float | None = None
    ttl: float | None = None
    idle_ttl: float | None = None
    expire_action: Literal["delete", "hibernate"] | None = None
    network: dict[str, Any] | None = None
    secrets: dict[str, str] | None = None
    volumes: dict[str, Any] | None = None
    from_snapshot: str | None = None
    on_exit: OnExit = "keep"
    exposed_ports: tuple[int, ...] = ()
    public_ports: bool = False
    preview_url_ttl_s: float = 3600
    workspace_tar_timeout_s: float = 300


class TorporSandboxClient(BaseSandboxClient[TorporSandboxClientOptions]):
    """Sandboxes on a Torpor server. `url` and `api_key` default as for the Torpor SDK
    (TORPOR_URL, TORPOR_API_KEY, then the server's key file); `request_timeout` is per
    HTTP request; `transport` (an httpx async transport) is for tests."""

    backend_id = "torpor"
    supports_default_options = True  # no options: a sandbox of the `base` template

    def __init__(self, *, url: str | None = None, api_key: str | None = None,
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None,
                 instrumentation: Instrumentation | None = None,
                 dependencies: Dependencies | None = None) -> None:
        self._url, self._api_key = url, api_key
        self._request_timeout, self._transport = request_timeout, transport
        self._instrumentation = instrumentation or Instrumentation()
        self._dependencies = dependencies

    def _handle(self, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(sandbox_id, url=self._url, api_key=self._api_key,
                            request_timeout=self._request_timeout, transport=self._transport)

    async def _make_sandbox(self, spec: Mapping[str, Any], root: str) -> AsyncSandbox:
        try:
            return await AsyncSandbox.create(
                spec["template"], env=spec["env"] or None, metadata=spec["metadata"] or None,
                cpu=spec["cpu"], memory_mb=spec["memory_mb"], disk_mb=spec["disk_mb"],
                standby_after=spec["standby_after"], hibernate_after=spec["hibernate_after"],
                ttl=spec["ttl"], idle_ttl=spec["idle_ttl"],
                expire_action=spec["expire_action"], network=spec["network"],
                secrets=spec["secrets"], volumes=spec["volumes"],
                snapshot=spec["from_snapshot"], url=self._url, api_key=self._api_key,
                request_timeout=self._request_timeout, transport=self._transport)
        except TorporError as e:
            raise _errors.create_error(e, root) from e

    def _session(self, state: TorporSandboxSessionState,
                 sbx: AsyncSandbox | None) -> TorporSandboxSession:
        return TorporSandboxSession(state=state, connect=self._handle, sandbox=sbx)

    async def create(self, *, snapshot: SnapshotSpec | SnapshotBase | None = None,
                     manifest: Manifest | None = None,
                     options: TorporSandboxClientOptions | Mapping[str, Any] | None = None,
                     ) -> SandboxSession:
        """Create a sandbox and a session on it (enter it, or `await session.start()`,
        to lay out the workspace)."""
        if options is None:
            options = TorporSandboxClientOptions()
        elif isinstance(options, Mapping):  # e.g. options kept as JSON
            options = TorporSandboxClientOptions.model_validate(dict(options))
        elif not isinstance(options, TorporSandboxClientOptions):
            raise TypeError("TorporSandboxClient.create expects TorporSandboxClientOptions, "
                            f"not {type(options).__name__}")
        manifest = manifest if manifest is not None else Manifest(root=DEFAULT_WORKSPACE_ROOT)
        self._validate_manifest_for_create(manifest)
        spec = {name: getattr(options, name) for name in _SANDBOX_FIELDS}
        sbx = await self._make_sandbox(spec, manifest.root)
        session_id = uuid.uuid4()
        state = TorporSandboxSessionState(
            session_id=session_id, manifest=manifest,
            snapshot=resolve_snapshot(snapshot, str(session_id)), sandbox_id=sbx.id,
            **{k: (v if v is not None else {}) if k in ("env", "metadata") else v
               for k, v in spec.items()},
            on_exit=options.on_exit, exposed_ports=options.exposed_ports,
            public_ports=options.public_ports, preview_url_ttl_s=options.preview_url_ttl_s,
            workspace_tar_timeout_s=options.workspace_tar_timeout_s)
        return self._wrap_session(self._session(state, sbx),
                                  instrumentation=self._instrumentation)

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        """A session on the state's sandbox, as it is: running, in standby or hibernated
        (the first command wakes it, processes and files as they were).

        A sandbox that is gone (deleted, expired, failed) is made again from the state's
        settings only when the state holds a workspace snapshot the SDK can restore (a
        Runner persists one by default); otherwise WorkspaceStartError says so."""
        if not isinstance(state, TorporSandboxSessionState):
            raise TypeError("TorporSandboxClient.resume expects a TorporSandboxSessionState")
        state.assert_path_grants_rebound()
        sbx = self._handle(state.sandbox_id)
        gone: str | None = None
        cause: TorporError | None = None
        try:
            info = await sbx.info()  # reads the record: does not wake it
            if info.state not in LIVE_STATES:
                gone = f"it is {info.state}" + (f" ({info.reason})" if info.reason else "")
        except NotFoundError as e:
            gone, cause = "it was deleted, or never existed on this server", e
        except TorporError as e:
            await sbx.close()
            raise WorkspaceStartError(
                path=Path(state.manifest.root), context=_errors.context(e), cause=e,
                message=f"failed to start session: cannot reach Torpor sandbox "
                        f"{state.sandbox_id}: {e}", retryable=_errors.retryable(e)) from e
        if gone is None:
            session = self._session(state, sbx)
            session._set_start_state_preserved(True, system=True)
            return self._wrap_session(session, instrumentation=self._instrumentation)

        await sbx.close()
        if not await self._restorable(state):
            raise WorkspaceStartError(
                path=Path(state.manifest.root),
                message=f"failed to start session: Torpor sandbox {state.sandbox_id} cannot "
                        f"be resumed: {gone}, and the session state holds no workspace "
                        "snapshot to rebuild it from; create a new session",
                context={"backend": _errors.BACKEND, "reason": "sandbox_not_found",
                         "sandbox_id": state.sandbox_id}, cause=cause, retryable=False)
        logger.warning("Torpor sandbox %s cannot be resumed (%s): making a new one from the "
                       "session's snapshot", state.sandbox_id, gone)
        sbx = await self._make_sandbox(state.model_dump(include=set(_SANDBOX_FIELDS)),
                                       state.manifest.root)
        state.sandbox_id = sbx.id
        state.workspace_root_ready = False
        session = self._session(state, sbx)
        session._set_start_state_preserved(False, system=False)
        return self._wrap_session(session, instrumentation=self._instrumentation)

    async def _restorable(self, state: TorporSandboxSessionState) -> bool:
        try:
            return await state.snapshot.restorable(dependencies=self._resolve_dependencies())
        except Exception as e:  # noqa: BLE001 - a snapshot store that cannot answer: no
            logger.warning("session snapshot %s: cannot tell if restorable: %s",
                           state.snapshot.id, e)
            return False

    async def delete(self, session: SandboxSession) -> SandboxSession:
        """Release the session's resources, as the Runner does after every run: its
        terminals and connections, and the sandbox only if `on_exit` is "delete" (else
        the sandbox stays for a later resume; `delete_sandbox` deletes it whatever
        `on_exit` says)."""
        inner = _inner(session)
        await inner.pty_terminate_all()
        if inner.state.on_exit == "delete":
            await apply_on_exit(inner, "delete")
        await inner.close_connections()
        return session

    async def delete_sandbox(self, session: SandboxSession | TorporSandboxSessionState) -> None:
        """Delete the sandbox behind a session (or a serialized session's state) for good.
        Deleting one already gone is not an error."""
        if isinstance(session, TorporSandboxSessionState):
            sbx = self._handle(session.sandbox_id)
            try:
                await sbx.delete()
            except NotFoundError:
                pass
            finally:
                await sbx.close()
            return
        inner = _inner(session)
        await inner.pty_terminate_all()
        try:
            await inner.sandbox.delete()
        except NotFoundError:
            pass
        finally:
            await inner.close_connections()

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        return self._deserialize_session_state_payload(payload, TorporSandboxSessionState)


def torpor_sandbox(session: SandboxSession | TorporSandboxSession) -> AsyncSandbox:
    """The Torpor SDK's `AsyncSandbox` behind a session this client made, for what the
    Agents SDK has no word for: `snapshot()`, `fork()`, `hibernate()`, `keep_alive()`,
    `update_network()`, `preview_url()`, `run_code()`."""
    return _inner(session).sandbox


def _inner(session: SandboxSession | TorporSandboxSession) -> TorporSandboxSession:
    inner = getattr(session, "_inner", session)  # the SDK's wrapper holds ours
    if not isinstance(inner, TorporSandboxSession):
        raise TypeError("TorporSandboxClient expects a session it made (TorporSandboxSession)")
    return inner
