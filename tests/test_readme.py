"""The README's Python examples run as written, offline: every ```python block (but the >>> transcripts),
in order, in one namespace, with downloads made to fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    return [b for b in blocks if not b.lstrip().startswith(">>>")]


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 3


def test_readme_python_examples_run_offline(monkeypatch, tmp_path):
    pytest.importorskip("torchvision")

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"a README example downloads {url}: examples must run offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights either
    monkeypatch.chdir(tmp_path)  # files an example writes (a reliability diagram) land there
    namespace: dict = {}
    for i, block in enumerate(python_blocks()):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
