"""The set-up's torchvision hook: timm, mace and torchvision import in a fresh interpreter of this environment."""

import subprocess
import sys


def test_timm_mace_torchvision_import():
    code = (
        "import torchvision, timm, mace, torch_geometric, e3nn; import torchvision.transforms.functional; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
