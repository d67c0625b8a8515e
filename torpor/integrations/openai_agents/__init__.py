"""Torpor as a sandbox provider of the OpenAI Agents SDK (`pip install 'torpor[openai-agents]'`).

    from agents.sandbox import Manifest
    from torpor.integrations.openai_agents import TorporSandboxClient, TorporSandboxClientOptions

    client = TorporSandboxClient()                      # TORPOR_URL, TORPOR_API_KEY
    session = await client.create(options=TorporSandboxClientOptions(template="base"))
    async with session:
        print((await session.exec("echo hi")).stdout)   # b"hi\\n"
    state = client.serialize_session_state(session.state)   # JSON: resume it later
    session = await client.resume(client.deserialize_session_state(state))

A serialized session resumes the same sandbox, even one that went to standby or hibernated
meanwhile (the first command wakes it, files and processes as they were). See
docs/integrations/openai-agents.md.
"""

from __future__ import annotations

try:
    import agents.sandbox  # noqa: F401 - fail here, with the way out, not deep inside
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError("torpor.integrations.openai_agents needs the OpenAI Agents SDK: "
                      "pip install 'torpor[openai-agents]'") from e

from torpor.integrations.openai_agents._client import (
    DEFAULT_WORKSPACE_ROOT,
    TorporSandboxClient,
    TorporSandboxClientOptions,
    torpor_sandbox,
)
from torpor.integrations.openai_agents._session import (
    TorporSandboxSession,
    TorporSandboxSessionState,
)

__all__ = [
    "DEFAULT_WORKSPACE_ROOT",
    "TorporSandboxClient",
    "TorporSandboxClientOptions",
    "TorporSandboxSession",
    "TorporSandboxSessionState",
    "torpor_sandbox",
]
