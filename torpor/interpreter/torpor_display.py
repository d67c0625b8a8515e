"""Display hooks of the code interpreter's Python kernels, an IPython extension that
`kernel.py` loads into each of them (shipped beside it into the `code-interpreter`
template; the host never imports it). What E2B's code interpreter gives and E2B's SDK
reads, done our own way:

- a pandas DataFrame shown (a cell's value, `display(df)`) also carries `e2b/data`: the
  frame as {column: [values]} (timestamps as ISO text), the result's `data`;
- a matplotlib figure shown (`plt.show()` through the inline backend, a figure as the
  cell's value) also carries `e2b/chart`: its chart data as the `e2b-charts` package
  extracts it (type, title, axes, elements), the result's `chart`;
- PIL: `image.save(<path>)` also displays the image (a PNG result), as on E2B; and
  `image.show()` never starts an image viewer program (there is no display): PIL falls
  through to its IPython viewer, which displays it.

Nothing is imported up front: the formatters look for pandas and matplotlib in
sys.modules (a frame or figure exists only if its module was imported), and PIL is
patched when it is first imported (an import hook), so a context that never uses them
pays nothing. A value these hooks cannot turn into plain JSON gets no `data`/`chart`
(its other forms are unchanged): a display never fails because of them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys

from IPython.core.formatters import BaseFormatter
from traitlets import ObjectName, Unicode


def _plain(value):
    """json.dumps' fallback: numpy scalars as Python numbers, dates and times as ISO
    text (a missing one, NaT, as None), anything else as its str()."""
    pandas = sys.modules.get("pandas")
    if pandas is not None and value is pandas.NaT:
        return None
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return item()
    if isinstance(value, (datetime.date, datetime.time)) or hasattr(value, "isoformat"):
        try:
            return value.isoformat()
        except (TypeError, ValueError):
            pass
    return str(value)


def _jsonable(obj):
    """`obj` as plain JSON values (NaN and infinities as None, as JSON has no such
    numbers)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v
    return clean(json.loads(json.dumps(obj, default=_plain)))


class DataFormatter(BaseFormatter):
    """`e2b/data`: a DataFrame's columns."""

    format_type = Unicode("e2b/data")
    print_method = ObjectName("_repr_e2b_data_")
    _return_type = (dict,)

    def __call__(self, obj):
        pandas = sys.modules.get("pandas")
        if pandas is None or not isinstance(obj, pandas.DataFrame):
            return super().__call__(obj)
        try:
            columns = obj.to_dict(orient="list")
            return _jsonable({str(k): v for k, v in columns.items()})
        except Exception:  # noqa: BLE001 - an extra form; the others stand
            return None


class ChartFormatter(BaseFormatter):
    """`e2b/chart`: a matplotlib figure's chart data (the `e2b-charts` package)."""

    format_type = Unicode("e2b/chart")
    print_method = ObjectName("_repr_e2b_chart_")
    _return_type = (dict,)

    def __call__(self, obj):
        figure = sys.modules.get("matplotlib.figure")
        if figure is None or not isinstance(obj, figure.Figure):
            return super().__call__(obj)
        try:
            from e2b_charts import chart_figure_to_dict

            return _jsonable(chart_figure_to_dict(obj))
        except Exception:  # noqa: BLE001 - a figure it cannot read is still shown as PNG
            return None


# --- PIL, patched when first imported -------------------------------------------------------

def _patch_image(module) -> None:
    """Image.save to a path also displays the image (once saved)."""
    original = module.Image.save

    def save(self, fp, format=None, **params):
        out = original(self, fp, format, **params)
        if isinstance(fp, (str, bytes, os.PathLike)):
            from IPython.display import display

            display(self)
        return out

    save.__doc__, save.__wrapped__ = original.__doc__, original
    module.Image.save = save


def _patch_image_show(module) -> None:
    """No viewer program: every Unix viewer (xdg-open, display, eog, ...: each its own
    show_file) declines at once, so PIL goes on to the next viewer registered, its IPython
    viewer, which displays the image."""
    def show(self, image, **options):
        return 0

    module.UnixViewer.show = show


class _AfterImport:
    """A meta path finder that runs a hook on a module right after its first import."""

    def __init__(self, hooks: dict):
        self.hooks = hooks

    def find_spec(self, name, path, target=None):
        hook = self.hooks.get(name)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module  # a loader made for this spec: patching it is local

        def exec_module(module):
            run(module)
            if self.hooks.pop(name, None) is not None:
                hook(module)
            if not self.hooks and self in sys.meta_path:
                sys.meta_path.remove(self)

        loader.exec_module = exec_module
        return spec


def load_ipython_extension(ip) -> None:
    formatters = ip.display_formatter.formatters
    formatters["e2b/data"] = DataFormatter(parent=ip.display_formatter)
    formatters["e2b/chart"] = ChartFormatter(parent=ip.display_formatter)
    hooks = {"PIL.Image": _patch_image, "PIL.ImageShow": _patch_image_show}
    for name in list(hooks):
        if name in sys.modules:  # imported already (not in a fresh kernel)
            hooks.pop(name)(sys.modules[name])
    if hooks:
        sys.meta_path.insert(0, _AfterImport(hooks))
