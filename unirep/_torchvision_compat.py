"""Make ``import torchvision`` work next to a CPU-only torch when only a CUDA torchvision wheel exists.

PyPI's only torchvision 0.28 wheel for Linux is CUDA-built. Next to the CPU torch its compiled ``_C`` library
cannot load, and ``torchvision/_meta_registrations.py`` then fails at import with
``RuntimeError: operator torchvision::nms does not exist`` (it registers fake kernels for ``nms``/``qnms``
unconditionally). timm and mace-torch (through torchmetrics) import torchvision, so they fail too.

``python -m unirep._torchvision_compat install`` writes a ``.pth`` file and a tiny module into the environment's
site-packages. At interpreter start-up the ``.pth`` adds an import hook; the hook acts only when
``torchvision._meta_registrations`` is imported *and* ``torchvision.extension._has_ops()`` is False, and then
defines the two operator schemas (no kernels) so the registrations succeed. Where ``_C`` loads (any normal
CUDA or CPU install) the hook does nothing. torchvision's Python transforms and models work; its compiled
ops (nms, roi_align) raise torchvision's own "Couldn't load custom C++ ops" error if called.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

HOOK_MODULE = "_unirep_torchvision_hook"

HOOK_SOURCE = '''"""Installed by unirep (python -m unirep._torchvision_compat install); see that module's docstring."""
import importlib.abc
import importlib.machinery
import sys

_TARGET = "torchvision._meta_registrations"
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBS = []


def _define_missing_schemas():
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops():
        return  # the compiled library loaded: nothing to do
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        try:
            torch._C._dispatch_find_schema_or_throw("torchvision::" + name, "")
        except RuntimeError:
            lib.define(schema)
    _LIBS.append(lib)  # keep the library object alive, or the definitions are dropped


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        _define_missing_schemas()
        self.inner.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(getattr(f, "_unirep_torchvision_hook", False) for f in sys.meta_path):
    _f = _Finder()
    _f._unirep_torchvision_hook = True
    sys.meta_path.insert(0, _f)
'''


def torchvision_imports() -> tuple[bool, str]:
    """Whether ``import torchvision`` works in a fresh interpreter of this environment, and its error if not."""
    proc = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return proc.returncode == 0, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def install() -> str:
    """Install the hook if (and only if) torchvision fails to import for the known reason."""
    site = Path(sysconfig.get_paths()["purelib"])
    ok, err = torchvision_imports()
    if ok:
        return "torchvision imports: no hook needed"
    if "torchvision::nms" not in err:
        raise RuntimeError(f"torchvision fails to import for an unknown reason: {err}")
    (site / f"{HOOK_MODULE}.py").write_text(HOOK_SOURCE)
    (site / f"{HOOK_MODULE}.pth").write_text(f"import {HOOK_MODULE}\n")
    ok, err = torchvision_imports()
    if not ok:
        raise RuntimeError(f"torchvision still fails to import after installing the hook: {err}")
    return f"installed {site / (HOOK_MODULE + '.pth')}: torchvision imports with its compiled ops unavailable"


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m unirep._torchvision_compat install")
    print(install())
