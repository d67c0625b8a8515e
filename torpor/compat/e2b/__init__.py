"""The E2B-compatible front door (issue 15): E2B's SDKs, pointed at Torpor with E2B's own
environment variables, work unmodified.

- `routing.py`: `E2BDoor`, the ASGI layer that sends a request to a sandbox's envd, to a
  port of it, to the control plane, or on to the native app;
- `control.py`: the control plane (`/sandboxes`, `/v2/sandboxes`, snapshots, templates);
- `sandboxes.py`: what E2B sees of a Torpor sandbox (its state, timeout, tokens), kept in the
  engine's door state under "e2b";
- `envd.py`: envd, the in-sandbox API (processes, files) over the engine.

It speaks only to the engine (`torpor/engine/manager.py`), its types and its errors.
"""
