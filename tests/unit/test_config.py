"""Server settings from a TOML file, under the command line's options."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli

from torpor.config import Settings


def test_settings_from_a_file_with_flags_on_top(tmp_path):
    f = tmp_path / "torpor.toml"
    f.write_text('data-dir = "/srv/torpor"\nport = 8080\ndefault_egress = "deny-all"\n'
                 'egress-allow-cidr = ["10.9.0.0/16"]\n'
                 'egress-resolve = ["api.internal=10.9.0.5"]\npreview-domain = "p.example"\n')
    s = Settings.from_file(f, port=9090, preview_port=None)
    assert s.data_dir == Path("/srv/torpor") and s.port == 9090
    assert s.default_egress == "deny-all" and s.egress_allow_cidr == ["10.9.0.0/16"]
    assert s.egress_resolve == ["api.internal=10.9.0.5"] and s.preview_domain == "p.example"
    assert s.preview_port == 7071  # not in the file, not given: the default


def test_bad_config_files_are_refused_clearly(tmp_path):
    f = tmp_path / "torpor.toml"
    f.write_text("egress-alow-cidr = []\n")
    with pytest.raises(ValueError, match="unknown setting 'egress-alow-cidr'"):
        Settings.from_file(f)
    f.write_text("port = \n")
    with pytest.raises(ValueError, match="torpor.toml"):
        Settings.from_file(f)
    with pytest.raises(ValueError, match="cannot read"):
        Settings.from_file(tmp_path / "missing.toml")
    p = cli(None, "serve", "--config", str(f), timeout=60)
    assert p.returncode != 0 and "torpor.toml" in p.stderr


def test_bad_network_flags_stop_the_server_with_a_reason(tmp_path):
    for flags, words in ((["--egress-allow-cidr", "10.0.0.0/33"], "10.0.0.0/33"),
                         (["--egress-resolve", "no-equals-sign"], "no-equals-sign"),
                         (["--egress-upstream-ca", "/nonexistent.pem"], "/nonexistent.pem"),
                         (["--default-egress", "sometimes"], "sometimes"),
                         (["--build-egress", "often"], "often"),
                         (["--build-egress-allow", "bad host!"], "bad host!")):
        p = cli(None, "serve", "--data-dir", str(tmp_path / "d"), "--port", "1", *flags)
        assert p.returncode != 0 and words in p.stderr, (flags, p.stderr[-500:])
