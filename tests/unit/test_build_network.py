"""The build network policy (a server's build policy narrowed by a build request) and the
built-in templates' step lists."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest

from torpor import builtin_templates
from torpor.builtin_templates import BUILTINS, INTERPRETER_DIR, INTERPRETER_PORT, builtin
from torpor.network.policy import EgressPolicy, PolicyError, covers, narrow, parse_entry


def policy(egress: str, allow=(), deny=()) -> EgressPolicy:
    return EgressPolicy.parse({"egress": egress, "allow": list(allow), "deny": list(deny)})


@pytest.mark.parametrize(("outer", "inner", "expected"), [
    ("pypi.org", "pypi.org", True),
    ("pypi.org", "pypi.org:443", True),
    ("pypi.org:443", "pypi.org", False),
    ("pypi.org:443", "pypi.org:80", False),
    ("*.pythonhosted.org", "files.pythonhosted.org", True),
    ("*.pythonhosted.org", "*.a.pythonhosted.org", True),
    ("*.pythonhosted.org", "*.pythonhosted.org", True),
    ("*.pythonhosted.org", "pythonhosted.org", False),  # a wildcard never covers its apex
    ("*.pythonhosted.org", "evilpythonhosted.org", False),
    ("files.pythonhosted.org", "*.pythonhosted.org", False),
    ("10.0.0.0/8", "10.1.0.0/16", True),
    ("10.0.0.0/8", "10.1.2.3:443", True),
    ("10.1.0.0/16", "10.0.0.0/8", False),
    ("10.0.0.0/8", "2001:db8::/32", False),
    ("10.0.0.0/8", "pypi.org", False),  # a name may resolve anywhere
    ("pypi.org", "151.101.0.223", False),
])
def test_an_allow_entry_covers_only_what_it_allows_in_full(outer, inner, expected):
    assert covers(parse_entry(outer), parse_entry(inner)) is expected


def test_a_request_narrows_the_build_policy_and_never_widens_it():
    server = policy("allow-all", deny=["evil.example"])
    assert narrow(server, None) == server
    # deny entries add up; the mode stays
    assert narrow(server, {"deny": ["pypi.org"]}).to_dict() == {
        "egress": "allow-all", "allow": [], "deny": ["evil.example", "pypi.org"]}
    # deny-all under allow-all: only what the request allows, the server's denies kept
    assert narrow(server, {"egress": "deny-all", "allow": ["pypi.org"]}).to_dict() == {
        "egress": "deny-all", "allow": ["pypi.org"], "deny": ["evil.example"]}

    index = policy("deny-all", allow=["pypi.org", "*.pythonhosted.org", "10.0.0.0/8"])
    # allow-all asked under deny-all: still deny-all with the server's allow entries
    assert narrow(index, {"egress": "allow-all"}) == index
    # only more denied: the server's allow entries stay
    assert narrow(index, {"deny": ["files.pythonhosted.org"]}).to_dict() == {
        **index.to_dict(), "deny": ["files.pythonhosted.org"]}
    # a missing mode is the server's: deny-all allowing what is asked, if the server does
    assert narrow(index, {"allow": ["files.pythonhosted.org", "10.2.0.0/16"]}).to_dict() == {
        "egress": "deny-all", "allow": ["files.pythonhosted.org", "10.2.0.0/16"], "deny": []}
    assert narrow(index, {"allow": []}).allow == ()
    for wider in (["example.com"], ["pythonhosted.org"], ["0.0.0.0/0"], ["*.org"]):
        with pytest.raises(PolicyError, match=re.escape(wider[0])) as e:
            narrow(index, {"egress": "deny-all", "allow": ["pypi.org", *wider]})
        assert e.value.field == "network.allow" and "allow[1]" in e.value.message


def test_a_bad_request_policy_is_refused_with_its_field():
    server = policy("allow-all")
    with pytest.raises(PolicyError) as e:
        narrow(server, {"egress": "sometimes"})
    assert e.value.field == "network.egress"
    with pytest.raises(PolicyError, match="unknown network keys"):
        narrow(server, {"allow-all": True})
    with pytest.raises(PolicyError, match="at most 256") as e:
        narrow(policy("allow-all", deny=[f"h{i}.example" for i in range(200)]),
               {"deny": [f"r{i}.example" for i in range(100)]})
    assert e.value.field == "network.deny"


def test_code_interpreter_is_pinned_and_ends_with_its_server_ready():
    b = builtin("code-interpreter")
    assert b is BUILTINS["code-interpreter"] and builtin("nosuch") is None
    steps = b.steps()
    assert steps[0] == {"type": "from_template", "template": "base"}
    kinds = [s["type"] for s in steps]
    assert kinds[-1] == "start_cmd" and kinds.count("start_cmd") == 1
    packages = next(s["packages"] for s in steps if s["type"] == "pip_install")
    names = {re.split(r"==", p)[0].lower().replace("_", "-") for p in packages}
    assert {"ipykernel", "jupyter-client", "numpy", "pandas", "matplotlib",
            "e2b-charts"} <= names
    # every package pinned, once: a rebuild elsewhere installs the same files
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", p) for p in packages)
    assert len(names) == len(packages)
    assert {"type": "env", "env": {"MPLBACKEND": "Agg"}} in steps
    start = steps[-1]
    # the code interpreter's server, copied in from the context the built-in provides
    assert start["ready"] == {"port": INTERPRETER_PORT} and INTERPRETER_PORT == 49999
    assert f"{INTERPRETER_DIR}/server.py" in start["cmd"]
    [copy] = [s for s in steps if s["type"] == "copy"]
    assert copy["dst"] == INTERPRETER_DIR and copy["user"] == "root"
    with tarfile.open(fileobj=io.BytesIO(b.context())) as tar:
        member = tar.getmember(f"{copy['src']}/server.py")
        assert (member.uid, member.mtime) == (0, 0)  # nothing but the contents in the key
        source = tar.extractfile(member).read()
        # beside it: the kernel launcher, the sandbox's env, the kernels' display hooks
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == [
            f"{copy['src']}/{n}" for n in ("kernel.py", "sandbox_env.py", "server.py",
                                           "torpor_display.py")]
    assert source == (Path(builtin_templates.__file__).parent / "interpreter"
                      / "server.py").read_bytes()
    # the same steps and context every time: the cached layers and the boot snapshot are
    # found again
    assert b.steps() == steps and b.context() == b.context()
