"""The workspace as a tar, for the SDK's snapshots (`persist_workspace`,
`hydrate_workspace`): made and unpacked by `tar` in the sandbox, moved whole by the files
API (exact bytes; a command's output is text). The SDK's ephemeral mounts are taken down
around the tar, as its other providers do."""

from __future__ import annotations

import io
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from agents.sandbox.entries import Mount
from agents.sandbox.errors import (
    WorkspaceArchiveReadError,
    WorkspaceArchiveWriteError,
    WorkspaceWriteTypeError,
)
from agents.sandbox.session.tar_workspace import shell_tar_exclude_args
from agents.sandbox.util.tar_utils import UnsafeTarMemberError, validate_tar_bytes

from torpor.integrations.openai_agents import _errors
from torpor.sdk.errors import TorporError

if TYPE_CHECKING:
    from torpor.integrations.openai_agents._session import TorporSandboxSession


async def persist(session: TorporSandboxSession) -> io.IOBase:
    """The workspace as a tar: written in the sandbox's /tmp, read whole by the files API."""
    root = session._workspace_root_path()
    tar_path = f"/tmp/openai-agents-persist-{session.state.session_id.hex}.tar"
    excludes = " ".join(shell_tar_exclude_args(session._persist_workspace_skip_relpaths()))
    script = (f"tar {excludes} -C {shlex.quote(root.as_posix())} "
              f"-cf {shlex.quote(tar_path)} .")
    torn_down: list[tuple[Mount, Path]] = []
    try:
        for mount, mount_path in session.state.manifest.ephemeral_mount_targets():
            await mount.mount_strategy.teardown_for_snapshot(mount, session, mount_path)
            torn_down.append((mount, mount_path))
        result = await session._run(["sh", "-c", script], cwd="/",
                                 timeout=session.state.workspace_tar_timeout_s)
        if result.exit_code != 0:
            raise WorkspaceArchiveReadError(
                path=root, context={"backend": _errors.BACKEND, "reason": "tar_failed",
                                    "exit_code": result.exit_code,
                                    "stderr": result.stderr[-4096:]}, retryable=False)
        try:
            raw = await session.sandbox.files.read(tar_path, "bytes")
        except TorporError as e:
            raise WorkspaceArchiveReadError(path=root, context=_errors.context(e),
                                            cause=e, retryable=_errors.retryable(e)) from e
    except WorkspaceArchiveReadError:
        raise
    except Exception as e:
        raise WorkspaceArchiveReadError(path=root, cause=e) from e
    finally:
        await _remove_quietly(session, tar_path)
        for mount, mount_path in reversed(torn_down):
            await mount.mount_strategy.restore_after_snapshot(mount, session, mount_path)
    return io.BytesIO(raw)


async def hydrate(session: TorporSandboxSession, data: io.IOBase) -> None:
    """A tar from `persist` (checked by the SDK first) unpacked into the workspace."""
    root = session._workspace_root_path()
    tar_path = f"/tmp/openai-agents-hydrate-{session.state.session_id.hex}.tar"
    raw = data.read()
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    if not isinstance(raw, bytes | bytearray):
        raise WorkspaceWriteTypeError(path=Path(tar_path), actual_type=type(raw).__name__)
    try:
        validate_tar_bytes(bytes(raw), allow_external_symlink_targets=False)
    except UnsafeTarMemberError as e:
        raise WorkspaceArchiveWriteError(
            path=root, context={"reason": "unsafe_or_invalid_tar", "member": e.member,
                                "detail": str(e)}, cause=e) from e
    try:
        await session.sandbox.files.write(tar_path, bytes(raw))
        result = await session._run(
            ["sh", "-c", 'mkdir -p -- "$1" && tar -C "$1" -xf "$2"', "sh",
             root.as_posix(), tar_path], cwd="/", timeout=session.state.workspace_tar_timeout_s)
    except TorporError as e:
        raise WorkspaceArchiveWriteError(path=root, context=_errors.context(e), cause=e,
                                         retryable=_errors.retryable(e)) from e
    finally:
        await _remove_quietly(session, tar_path)
    if result.exit_code != 0:
        raise WorkspaceArchiveWriteError(
            path=root, context={"backend": _errors.BACKEND, "reason": "tar_extract_failed",
                                "exit_code": result.exit_code,
                                "stderr": result.stderr[-4096:]})


async def _remove_quietly(session: TorporSandboxSession, path: str) -> None:
    try:
        await session.sandbox.files.remove(path)
    except TorporError:
        pass  # absent already, or the sandbox is gone: nothing to tidy
