"""Torpor inside agent frameworks: client-side adapters over the Torpor SDK (`torpor.sdk`).

Each adapter is an optional extra and imports nothing of the server side:
- `torpor.integrations.openai_agents`: a sandbox provider for the OpenAI Agents SDK
  (`pip install 'torpor[openai-agents]'`).
"""
