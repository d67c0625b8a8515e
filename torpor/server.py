"""`torpor serve`: the engine plus the REST front door under uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from torpor.config import Settings

KEEP_ALIVE_SECONDS = 75  # how long an idle client connection stays open


def build(settings: Settings):
    from torpor.api.app import create_app
    from torpor.engine.manager import Engine

    engine = Engine(settings)
    key = engine.ensure_admin_key()
    if key:
        print(f"Torpor: created the admin API key (shown once, also in "
              f"{settings.api_key_file}, mode 0600):\n  {key}", file=sys.stderr, flush=True)
    elif not engine.keys.has_valid_admin():
        # keys exist but no admin can manage them: say so, never mint one behind the
        # operator's back (a revoked key was revoked on purpose)
        print(f"Torpor: WARNING: no valid admin API key in {settings.db_path} (every one "
              "is revoked), so keys and secrets cannot be managed over the API. To get back "
              f"in, on this host run:\n  torpor keys create NAME --admin --offline --data-dir "
              f"{settings.data_dir}", file=sys.stderr, flush=True)
    return create_app(engine)


def run(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Alembic tells every plugin it sets up and every migration check at INFO: a dozen lines
    # per start that say nothing to an operator; its warnings and errors still show
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.root.level))
    app = build(settings)
    print(f"Torpor listening on http://{settings.host}:{settings.port} "
          f"(data: {settings.data_dir})", file=sys.stderr, flush=True)
    # keep idle connections well past the clients' own expiry (httpx's is 5 s, the same as
    # uvicorn's default): with equal timers the server sometimes closes a connection just as
    # a client sends its next request on it, which the client sees as a reset connection
    opts = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 10,
            "timeout_keep_alive": KEEP_ALIVE_SECONDS}
    if not settings.e2b_port:
        uvicorn.run(app, host=settings.host, port=settings.port, **opts)
        return
    # the E2B-compatible door on a port of its own too: one server, one app, two sockets
    # (the door tells them apart by the port a request came in on)
    print(f"Torpor: the E2B-compatible API also on http://{settings.host}:"
          f"{settings.e2b_port}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, **opts)
    sockets = [config.bind_socket(),
               uvicorn.Config(app, host=settings.host, port=settings.e2b_port).bind_socket()]
    uvicorn.Server(config).run(sockets=sockets)
