"""Isolation runtimes behind one interface (`base.Driver`); `driver_for` picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torpor.config import Settings
    from torpor.runtime.base import Driver

DRIVERS = ("gvisor", "fake")
IMAGE_COMPRESSIONS = ("none", "flate")


def driver_for(settings: Settings) -> Driver:
    """The driver `settings.driver` names. Its module is imported only when chosen: the
    fake one needs no runsc, and the gVisor one checks for runsc as it is built."""
    if settings.driver == "gvisor":
        if settings.image_compression not in IMAGE_COMPRESSIONS:
            raise ValueError(f"image_compression must be none or flate, not "
                             f"{settings.image_compression!r}")
        from torpor.runtime.gvisor import GVisorDriver

        return GVisorDriver(settings.data_dir, runsc=settings.runsc,
                            platform=settings.platform,
                            image_compression=settings.image_compression,
                            output_spill_mb=settings.output_spill_mb)
    if settings.driver == "fake":
        from torpor.runtime.fake import FakeDriver

        return FakeDriver()
    raise ValueError(f"unknown driver {settings.driver!r} (known: {', '.join(DRIVERS)})")
