"""The gVisor driver keeps the driver contract (tests/driver_contract.py): real runsc,
on a data dir of its own, every trace of it removed even when a check fails."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
from conftest import make_data_dir
from driver_contract import CHECKS, Harness

from torpor.config import Settings
from torpor.runtime import driver_for
from torpor.runtime.gvisor import purge
from torpor.templates import Template, TemplateStore


def failing_spec(h: Harness):
    """A template whose /.torpor is a file: runsc cannot mount the agent's bundle there,
    so the container fails at once (the layer is made and mounted first, as in a real
    start that fails)."""
    path = h.template.path.with_name("contract-broken")
    if not path.exists():
        (path / "rootfs").mkdir(parents=True)
        (path / "rootfs" / ".torpor").write_text("not a directory\n")
    return h.spec(Template(name="contract-broken", path=path, usr_from="/usr"))


@pytest.fixture(scope="module")
def harness():
    if os.geteuid() != 0:
        pytest.exit("the gVisor driver runs sandboxes and needs root", returncode=2)
    data = make_data_dir()
    settings = Settings(data_dir=data, driver="gvisor")
    driver = None
    try:
        template = TemplateStore(data).ensure_base()
        driver = driver_for(settings)
        yield Harness(driver, template, failing_spec, host_disk=True)
    finally:
        if driver is not None:
            driver.close()
        purge(data, runsc=driver.runsc if driver is not None else "runsc")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_gvisor_driver_keeps_the_contract(harness, check):
    asyncio.run(check(harness))
