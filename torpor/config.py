"""Server settings: embedded defaults, overridden by environment variables and CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:7070"


def default_data_dir() -> Path:
    return Path(os.environ.get("TORPOR_DATA", "/var/lib/torpor"))


def _env_list(name: str) -> list[str]:
    """A list setting from an environment variable: comma-separated."""
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


@dataclass
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = 7070
    # sandboxes kept booted per template so a create hands one out at once
    pool_size: int = int(os.environ.get("TORPOR_POOL_SIZE", "2"))
    platform: str = os.environ.get("TORPOR_PLATFORM", "ptrace")
    runsc: str | None = os.environ.get("TORPOR_RUNSC") or None
    # the isolation runtime (torpor.runtime.driver_for): "gvisor", or "fake" (in memory,
    # no isolation at all: for tests of the engine only)
    driver: str = os.environ.get("TORPOR_DRIVER", "gvisor")
    max_body_bytes: int = 1 << 20
    # defaults for a sandbox when the template and the request say nothing
    default_cpu: float = 1.0
    default_memory_mb: int = 512
    default_disk_mb: int = 4096
    default_timeout: float = 60.0
    # standby: idle seconds before standby, then before hibernation (0 turns one off)
    standby_after: float = float(os.environ.get("TORPOR_STANDBY_AFTER", "15"))
    hibernate_after: float = float(os.environ.get("TORPOR_HIBERNATE_AFTER", "600"))
    # fraction of host memory in use past which idle sandboxes hibernate, oldest first
    memory_watermark: float = float(os.environ.get("TORPOR_MEMORY_WATERMARK", "0.85"))
    # hibernation images: "none" (memory as it is: faster deep resume, as much disk as the
    # sandbox's memory in use) or "flate" (compressed: less disk, slower resume)
    image_compression: str = os.environ.get("TORPOR_IMAGE_COMPRESSION", "none")
    # MiB of process output each sandbox keeps on its own disk past the agent's in-memory
    # log (all its processes together; the oldest goes first; 0: none, the oldest is dropped)
    output_spill_mb: int = int(os.environ.get("TORPOR_OUTPUT_SPILL_MB", "256"))
    # a graceful stop hibernates sandboxes for at most this long, then exits
    shutdown_timeout: float = float(os.environ.get("TORPOR_SHUTDOWN_TIMEOUT", "60"))
    log_level: str = os.environ.get("TORPOR_LOG_LEVEL", "info")
    # network (docs/network.md): the egress policy a sandbox gets when its create says
    # nothing, operator exceptions to the always-denied ranges, static DNS answers for the
    # proxy, extra CAs the proxy trusts upstream
    default_egress: str = os.environ.get("TORPOR_DEFAULT_EGRESS", "allow-all")
    egress_allow_cidr: list[str] = field(default_factory=list)
    egress_resolve: list[str] = field(default_factory=list)
    egress_upstream_ca: list[str] = field(default_factory=list)
    egress_log_days: float = 30.0  # egress records older than this are removed (0: keep)
    # the egress policy of template builds' sandboxes (a build may narrow it): its mode
    # (None: default_egress) and entries
    build_egress: str | None = os.environ.get("TORPOR_BUILD_EGRESS") or None
    build_egress_allow: list[str] = field(default_factory=list)
    build_egress_deny: list[str] = field(default_factory=list)
    # preview URLs: http://<port>-<sandbox id>.<preview_domain>:<preview_port>/
    preview_port: int = int(os.environ.get("TORPOR_PREVIEW_PORT", "7071"))
    preview_domain: str = os.environ.get("TORPOR_PREVIEW_DOMAIN", "localhost")
    preview_max_expiry: float = 7 * 86400.0  # the longest a signed preview URL lives
    # the E2B-compatible door is on the main port; this serves it on a port of its own
    # too (E2B only there), 0: not
    e2b_port: int = int(os.environ.get("TORPOR_E2B_PORT", "0"))
    # E2B's debug mode (E2B_DEBUG=true) sends envd traffic for "debug_sandbox_id": the id
    # of the sandbox that answers it (None: it gets the 502 of an unknown sandbox)
    e2b_debug_sandbox: str | None = os.environ.get("TORPOR_E2B_DEBUG_SANDBOX") or None
    # template sources (torpor/sources, docs/operations.md): registry mirrors ("REGISTRY=
    # MIRROR", or "MIRROR" for docker.io), registries reached without TLS (host[:port]), a
    # docker/containers auth file and a directory of CA certificates for skopeo, and the
    # Debian mirror for from_debian (None: the host's apt mirror)
    registry_mirror: list[str] = field(default_factory=lambda: _env_list(
        "TORPOR_REGISTRY_MIRROR"))
    registry_insecure: list[str] = field(default_factory=lambda: _env_list(
        "TORPOR_REGISTRY_INSECURE"))
    registry_auth_file: str | None = os.environ.get("TORPOR_REGISTRY_AUTH_FILE") or None
    registry_cert_dir: str | None = os.environ.get("TORPOR_REGISTRY_CERT_DIR") or None
    debian_mirror: str | None = os.environ.get("TORPOR_DEBIAN_MIRROR") or None

    @classmethod
    def from_file(cls, path: Path, **overrides) -> Settings:
        """Settings from a TOML file (keys are the field names, dashes or underscores),
        then `overrides` (the command line) on top."""
        import tomllib

        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"cannot read the config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path}: {e}") from None
        known = {f.name: f for f in fields(cls)}
        given = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"config file {path}: unknown setting {key!r} (known: "
                                 f"{', '.join(sorted(known))})")
            given[name] = Path(value) if name == "data_dir" else value
        given.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**given)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "torpor.db"

    @property
    def api_key_file(self) -> Path:
        return self.data_dir / "api-key"
