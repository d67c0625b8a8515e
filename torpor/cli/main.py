"""`torpor`: the command line. Each verb is a few lines over one SDK call (or, for
`serve`, over `torpor.server.run`); see docs/cli.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from torpor.cli import (
    _common,
    admin,
    files,
    network,
    sandbox,
    secret,
    snapshot,
    template,
    volume,
)
from torpor.cli._common import App, fail
from torpor.cli.code import run_code_command
from torpor.cli.exec import exec_command
from torpor.cli.mcp import mcp_command
from torpor.cli.shell import shell_command

app = App(help="Torpor: perpetual sandboxes for AI agents.")
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(files.app, name="files")
app.add_typer(template.app, name="template")
app.add_typer(snapshot.app, name="snapshot")  # (also adds `sandbox fork|restore`)
app.add_typer(volume.volumes, name="volume")
app.add_typer(volume.drives, name="drive")
app.add_typer(admin.keys, name="keys")
app.add_typer(secret.app, name="secret")
app.add_typer(network.domains, name="domain")  # (network also adds `sandbox` verbs)
# options after the sandbox id belong to the command: `torpor exec ID ls -la`
app.command("exec", context_settings={"allow_interspersed_args": False})(exec_command)
app.command("run-code")(run_code_command)
app.command("shell", context_settings={"allow_interspersed_args": False})(shell_command)
app.command("mcp")(mcp_command)


@app.callback()
def root(
    url: Annotated[str | None, typer.Option(envvar="TORPOR_URL", show_envvar=True,
                                            help="Server URL [default: "
                                                 "http://127.0.0.1:7070].")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="TORPOR_API_KEY", show_envvar=False,
                                                help="API key [env var: TORPOR_API_KEY; "
                                                     "default: $TORPOR_DATA/api-key].")
                       ] = None,
) -> None:
    """Torpor: perpetual sandboxes for AI agents."""
    _common.CONNECTION.update(url=url, api_key=api_key)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on "
                                                  "[default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: 7070].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="State directory [default: "
                                                       "$TORPOR_DATA or /var/lib/torpor].")
                        ] = None,
    pool_size: Annotated[int | None, typer.Option(help="Sandboxes kept booted per template "
                                                       "[default: 2].")] = None,
    config: Annotated[Path | None, typer.Option(
        help="TOML file of settings (keys as these options, e.g. egress-allow-cidr = "
             "[\"10.9.0.0/16\"]); options given here win.")] = None,
    default_egress: Annotated[str | None, typer.Option(
        help="Egress of a sandbox whose create says nothing: allow-all (public addresses "
             "only) or deny-all [default: allow-all].")] = None,
    egress_allow_cidr: Annotated[list[str] | None, typer.Option(
        help="Let sandboxes reach this otherwise always-denied range (private, loopback, "
             "link-local, the host), when their policy allows it. Repeatable.")] = None,
    egress_resolve: Annotated[list[str] | None, typer.Option(
        help="NAME=IP: a static answer the egress proxy uses before DNS (like curl "
             "--resolve). Repeatable.")] = None,
    egress_upstream_ca: Annotated[list[str] | None, typer.Option(
        help="A PEM file of extra CAs the egress proxy trusts upstream. Repeatable.")
    ] = None,
    build_egress: Annotated[str | None, typer.Option(
        help="Egress of template builds' sandboxes: allow-all or deny-all (a build may "
             "narrow it) [env var: TORPOR_BUILD_EGRESS; default: --default-egress].")
    ] = None,
    build_egress_allow: Annotated[list[str] | None, typer.Option(
        help="A host, *.domain, IP or CIDR builds may reach under deny-all. Repeatable.")
    ] = None,
    build_egress_deny: Annotated[list[str] | None, typer.Option(
        help="A host, *.domain, IP or CIDR builds may never reach. Repeatable.")] = None,
    preview_port: Annotated[int | None, typer.Option(
        help="Port of the preview listener; 0 turns previews off [env var: "
             "TORPOR_PREVIEW_PORT; make serve PREVIEW_PORT=N; default: 7071].")] = None,
    preview_domain: Annotated[str | None, typer.Option(
        help="Preview URLs are http://PORT-ID.DOMAIN:PREVIEW_PORT/ [default: localhost].")
    ] = None,
    e2b_port: Annotated[int | None, typer.Option(
        help="Serve the E2B-compatible API on this port of its own too (it is always on "
             "the main port); 0: not [env var: TORPOR_E2B_PORT; default: 0].")] = None,
    registry_mirror: Annotated[list[str] | None, typer.Option(
        help="REGISTRY=MIRROR, or MIRROR (of docker.io): where template builds pull images "
             "first. Repeatable [env var: TORPOR_REGISTRY_MIRROR, comma-separated].")
    ] = None,
    registry_insecure: Annotated[list[str] | None, typer.Option(
        help="A registry (host[:port]) reached over plain HTTP or unverified TLS. "
             "Repeatable [env var: TORPOR_REGISTRY_INSECURE].")] = None,
    registry_auth_file: Annotated[str | None, typer.Option(
        help="Registry credentials: a docker config.json / containers auth.json "
             "[env var: TORPOR_REGISTRY_AUTH_FILE].")] = None,
    registry_cert_dir: Annotated[str | None, typer.Option(
        help="A directory of CA certificates (*.crt) for registries "
             "[env var: TORPOR_REGISTRY_CERT_DIR].")] = None,
    debian_mirror: Annotated[str | None, typer.Option(
        help="The Debian mirror of from_debian builds [env var: TORPOR_DEBIAN_MIRROR; "
             "default: the host's apt mirror].")] = None,
) -> None:
    """Run the Torpor server (needs root and gVisor's runsc)."""
    from torpor import errors
    from torpor.config import Settings

    given = {"host": host, "port": port, "data_dir": data_dir, "pool_size": pool_size,
             "default_egress": default_egress, "egress_allow_cidr": egress_allow_cidr or None,
             "egress_resolve": egress_resolve or None,
             "egress_upstream_ca": egress_upstream_ca or None, "build_egress": build_egress,
             "build_egress_allow": build_egress_allow or None,
             "build_egress_deny": build_egress_deny or None, "preview_port": preview_port,
             "preview_domain": preview_domain, "e2b_port": e2b_port,
             "registry_mirror": registry_mirror or None,
             "registry_insecure": registry_insecure or None,
             "registry_auth_file": registry_auth_file, "registry_cert_dir": registry_cert_dir,
             "debian_mirror": debian_mirror}
    try:
        if config is not None:
            settings = Settings.from_file(config, **given)
        else:
            settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except (ValueError, TypeError) as e:
        fail(str(e))
    try:
        from torpor.server import run
    except ImportError as e:
        fail(f"the server's packages are not installed here ({e}): "
             "pip install 'torpor[server]' (make serve does), or use the client against "
             "a server elsewhere (TORPOR_URL)")
    try:
        run(settings)
    except errors.TorporError as e:
        fail(str(e))
    except PermissionError as e:
        fail(f"{e.strerror}: {e.filename}; run as root, or pass --data-dir to a directory "
             "you own")


if __name__ == "__main__":
    app()
