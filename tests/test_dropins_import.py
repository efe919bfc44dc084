"""The drop-in adapters are import-light: neither ``import focal_cuda`` nor importing an adapter imports its peer
(mmseg's adapter imports mmseg's registry only to register itself, where mmseg is installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ["segmentation_models_pytorch", "kornia", "fvcore", "detectron2", "ultralytics", "mmseg", "mmcv", "mmdet",
         "timm"]


def test_adapters_do_not_import_their_peers():
    code = (
        "import sys, focal_cuda\n"
        "before = sorted(m for m in sys.modules if m.split('.')[0] in PEERS)\n"
        "import focal_cuda.integrations.smp, focal_cuda.integrations.kornia, focal_cuda.integrations.fvcore\n"
        "import focal_cuda.integrations.ultralytics\n"
        "after = sorted(m for m in sys.modules if m.split('.')[0] in PEERS)\n"
        "print(before, after)\n"
    )
    out = subprocess.run([sys.executable, "-c", f"PEERS = {PEERS!r}\n" + code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] []", out.stdout
