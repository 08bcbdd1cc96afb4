"""Shared fixtures: synthetic images in tmp_path, and the real reference data (required)."""
from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
HEAVY_MODULES = ("torch", "timm", "mlflow", "albumentations")


def make_image(path: Path, size=(40, 32), mode="RGB", seed=0, fmt=None) -> Path:
    """Write a small random image; distinct seeds give distinct bytes."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
        if mode != "RGB":
            img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height (a decompression bomb), without the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    return path


def without_root_file_access(cmd: list[str]) -> list[str]:
    """`cmd` run so that file permissions apply even to root, who otherwise reads a chmod 000
    file: the capabilities that bypass them are dropped (root-owned 0700 folders stay usable)."""
    if os.geteuid() != 0:
        return cmd
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, to prove inputs are left untouched."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file():
                out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def herlev_dir() -> Path:
    path = SHARED_DATA / "herlev"
    if not (path / "MANIFEST.csv").is_file():
        pytest.fail(f"reference data missing: {path} (tests need ../shared/data from the project root)")
    return path


@pytest.fixture
def binary_map(tmp_path) -> Path:
    path = tmp_path / "labels.yaml"
    path.write_text("labels: [benign, malignant]\nclasses:\n  normal: benign\n  cancer: malignant\n  junk: exclude\n")
    return path


@pytest.fixture(scope="module")
def exported_project(tmp_path_factory):
    """One exported tiny project per test module (see tests/tiny_project.exported_tiny_project)."""
    from tests.tiny_project import exported_tiny_project

    with exported_tiny_project(tmp_path_factory) as built:
        yield built


@pytest.fixture
def no_mlflow_env(monkeypatch):
    """Commands use the project's own sqlite store, not one named in the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
