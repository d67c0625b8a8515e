"""`torpor sandbox network | egress | ports | expose | preview-url` and
`torpor domain add | list | rm`: egress policy, the egress log, preview URLs, domains."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from torpor.cli._common import App, conn, handle, out, print_json, seconds, when
from torpor.cli.sandbox import Egress
from torpor.cli.sandbox import app as sandbox_app

domains = App(help="Custom domains routed to a sandbox port by the preview listener.")

ID = Annotated[str, typer.Argument(metavar="ID")]
PORT = Annotated[int, typer.Argument(metavar="PORT", min=1, max=65535)]
JSON = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def policy_options(egress: Egress | None, allow: list[str] | None,
                   deny: list[str] | None) -> dict | None:
    given = {k: v for k, v in (("egress", egress.value if egress else None), ("allow", allow),
                               ("deny", deny)) if v is not None}
    return given or None


@sandbox_app.command()
def network(
    sandbox_id: ID,
    egress: Annotated[Egress | None, typer.Option(help="The default action.")] = None,
    allow: Annotated[list[str] | None, typer.Option(
        metavar="ENTRY", help="Exception to deny-all: domain, *.domain, IP, CIDR, with "
                              "optional :port. Repeatable; replaces the list.")] = None,
    deny: Annotated[list[str] | None, typer.Option(
        metavar="ENTRY", help="Always denied. Repeatable; replaces the list.")] = None,
    clear_allow: Annotated[bool, typer.Option(help="Empty the allow list.")] = False,
    clear_deny: Annotated[bool, typer.Option(help="Empty the deny list.")] = False,
    json: JSON = False,
) -> None:
    """Show a sandbox's egress policy, or change it (at once: open connections close)."""
    given = policy_options(egress, [] if clear_allow else allow, [] if clear_deny else deny)
    with handle(sandbox_id) as sbx:
        info = sbx.update_network(given) if given else sbx.info()
    if json:
        print_json(info.network)
        return
    n = info.network
    out.print(f"egress: {n.get('egress')}")
    out.print(f"allow:  {', '.join(n.get('allow') or []) or '-'}")
    out.print(f"deny:   {', '.join(n.get('deny') or []) or '-'}")
    if info.secrets:
        out.print("secrets: " + ", ".join(f"{k}={v}" for k, v in info.secrets.items()))


@sandbox_app.command()
def egress(
    sandbox_id: ID,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many entries.")] = 50,
    json: JSON = False,
) -> None:
    """The sandbox's egress log, newest first: every connection and request, allowed or
    denied, with the rule that decided."""
    with handle(sandbox_id) as sbx:
        entries = sbx.egress_log(limit=limit)
    if json:
        print_json([e.model_dump(mode="json") for e in entries])
        return
    table = Table(box=None, header_style="bold")
    for col in ("WHEN", "PROTO", "DESTINATION", "REQUEST", "STATUS", "DECISION", "UP",
                "DOWN", "SECRETS"):
        table.add_column(col, no_wrap=col not in ("REQUEST", "DECISION"))
    for e in entries:
        request = f"{e.method or ''} {e.path or ''}".strip()
        table.add_row(when(e.at), e.protocol, f"{e.host}:{e.port}", request,
                      str(e.status or ""), ("allowed: " if e.allowed else "DENIED: ") + e.rule,
                      str(e.bytes_up), str(e.bytes_down), ",".join(e.secrets))
    out.print(table)


@sandbox_app.command()
def ports(sandbox_id: ID, json: JSON = False) -> None:
    """Ports made public with `expose` (every other port is private: token or API key)."""
    with handle(sandbox_id) as sbx:
        items = sbx.ports()
    if json:
        print_json([p.model_dump(mode="json") for p in items])
        return
    for p in items:
        out.print(f"{p.port}\t{'public' if p.public else 'private'}\t{p.url}")


@sandbox_app.command()
def expose(
    sandbox_id: ID,
    port: PORT,
    private: Annotated[bool, typer.Option("--private", help="Make it private again.")] = False,
) -> None:
    """Make a port public: anyone with its preview URL reaches it, no token needed."""
    with handle(sandbox_id) as sbx:
        p = sbx.expose(port, public=not private)
    out.print(p.url)


@sandbox_app.command("preview-url")
def preview_url(
    sandbox_id: ID,
    port: PORT,
    expires_in: Annotated[float, typer.Option(metavar="S", parser=seconds,
                                              help="Lifetime: seconds, or 30m, 2h, 1d.")
                          ] = 3600.0,
) -> None:
    """Print a signed preview URL of a port inside the sandbox."""
    with handle(sandbox_id) as sbx:
        out.print(sbx.preview_url(port, expires_in=expires_in))


@domains.command("add")
def add_domain(
    domain: Annotated[str, typer.Argument(help="e.g. app.example.com")],
    sandbox_id: ID,
    port: PORT,
    public: Annotated[bool, typer.Option(help="No token needed.")] = False,
) -> None:
    """Route requests for DOMAIN (on the preview port) to PORT in the sandbox."""
    with handle(sandbox_id) as sbx:
        d = sbx.add_domain(domain, port, public=public)
    out.print(d.url)


@domains.command("list")
def list_domains(json: JSON = False) -> None:
    """List custom domains."""
    from torpor.sdk import Domains

    with Domains(**conn()) as client:
        items = client.list()
    if json:
        print_json([d.model_dump(mode="json") for d in items])
        return
    table = Table(box=None, header_style="bold")
    for col in ("DOMAIN", "SANDBOX", "PORT", "ACCESS", "CREATED"):
        table.add_column(col, no_wrap=True)
    for d in items:
        table.add_row(d.domain, d.sandbox_id, str(d.port), "public" if d.public else "private",
                      when(d.created_at))
    out.print(table)


@domains.command("rm")
def remove_domain(domain: str) -> None:
    """Remove a custom domain."""
    from torpor.sdk import Domains

    with Domains(**conn()) as client:
        client.remove(domain)
