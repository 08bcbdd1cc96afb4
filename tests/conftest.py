"""Shared fixtures: synthetic images in tmp_path, the real reference data (required), the session's one
tiny project, and the layer markers.

Layers (by folder; `make test-fast` runs the first):
  tests/unit/         no model training, no ../shared/data        -> marker `unit`
  tests/integration/  the tiny project, training, real data       -> marker `integration`
  tests/e2e/          dvc, notebooks, browser, REST, torchrun, kills -> marker `e2e`
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
HEAVY_MODULES = ("torch", "timm", "mlflow", "albumentations")
TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    """Mark every test with the layer its folder names (tests/unit -> `unit`, ...)."""
    for item in items:
        try:
            layer = Path(item.fspath).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


def herlev_images(n: int) -> list[Path]:
    """n real Herlev images, taken from the class folders in turn."""
    herlev = SHARED_DATA / "herlev"
    per_class = [sorted(c.glob("*.jpg")) for c in sorted(p for p in herlev.iterdir() if p.is_dir())]
    return [per_class[i % len(per_class)][i // len(per_class)] for i in range(n)]


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
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    )
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


MLFLOW_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def forget_mlflow_store() -> None:
    """Forget the MLflow store this process used last. mlflow.set_tracking_uri / set_registry_uri keep it in
    module globals and export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI (for subprocesses); cytopipe reads
    MLFLOW_TRACKING_URI before params.yaml, and an MlflowClient(tracking_uri) without a registry_uri asks
    the remembered registry. With one tiny project per session, not per module, the store of one test
    would otherwise answer the next one's questions."""
    for var in MLFLOW_VARS:
        os.environ.pop(var, None)
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.fixture(autouse=True)
def no_mlflow_env():
    """Commands use the project's own sqlite store, not one named in the environment (the user's
    MLFLOW_TRACKING_URI included) or remembered from an earlier test: every test starts and ends with no
    MLflow store set (forget_mlflow_store)."""
    forget_mlflow_store()
    yield
    forget_mlflow_store()


# --------------------------------------------------------------------------- the session's tiny project


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """The one tiny project of the session (tests/tiny_project.py: ingest -> split -> train -> evaluate on
    configs/tiny.yaml, promotion minimums at 0 so that the model holds @champion): (root, evaluate
    result, params). Shared, so read-only: a test that writes into it (files, MLflow runs, registered
    versions, aliases) takes `tiny_project_copy` instead."""
    from tests.tiny_project import PROMOTED
    from tests.tiny_project import tiny_project as built

    with built(tmp_path_factory, **PROMOTED) as project:
        forget_mlflow_store()  # set while building
        yield project


@pytest.fixture(scope="session")
def exported_project(tiny_project, tmp_path_factory):
    """`tiny_project`, copied (with its MLflow store) and exported to ONNX, the export registered as a new
    version that takes over @champion: {"root", "evaluate", "export", "params"}. Read-only, like
    `tiny_project`, which it leaves untouched (there @champion stays the calibrated torch model)."""
    from tests.tiny_project import copy_project, export_tiny_project

    root, evaluated, _ = tiny_project
    copy = copy_project(root, tmp_path_factory.mktemp("exported") / "project")
    forget_mlflow_store()  # the export registers in the copy's store (its params.yaml), nowhere else
    project = export_tiny_project(copy, evaluated)
    forget_mlflow_store()
    return project


@pytest.fixture
def tiny_project_copy(tiny_project, tmp_path_factory):
    """A private copy of `tiny_project` (its files and MLflow store, every recorded path moved) for a
    test that writes into it: (root, evaluate result, params read from the copy)."""
    from tests.tiny_project import loaded_copy

    return loaded_copy(tiny_project, tmp_path_factory.mktemp("project-copy") / "project")


# ---------------------------------------------------------------- shared read-only inputs
# Scored once per session: tests/integration/test_score_slide.py and tests/e2e/test_score_slide_report.py
# read the same report, and test_bad_inputs / test_rest_serving the same bad-input corpus.


@pytest.fixture(scope="session")
def slides(tmp_path_factory):
    """A synthetic slide with drawn cells, and a blank one (tests/slides.py)."""
    from tests.slides import CELLS, SIZE, draw_cells, glass, write_pyramid

    folder = tmp_path_factory.mktemp("slides")
    cells = write_pyramid(folder / "cells.tiff", draw_cells(glass(SIZE), CELLS))
    blank = write_pyramid(folder / "blank.tiff", glass(SIZE, seed=3))
    return cells, blank


@pytest.fixture(scope="session")
def scored(tiny_project, slides, tmp_path_factory):
    """(report folder, summary) of score-slide on the drawn slide with the session's calibrated model."""
    from pipeline.inference.score_slide import score_slide

    root, _, params = tiny_project
    out = tmp_path_factory.mktemp("report")
    before = tree_digest(slides[0].parent)
    summary = score_slide(
        str(slides[0]), str(root / "models/calibrated"), out, params.slide, top=8, log=lambda *_: None
    )
    assert tree_digest(slides[0].parent) == before  # the slide is never modified
    return out, summary


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The bad-input corpus (tests/corpus.py), built once and never modified by any test."""
    from tests.corpus import build_corpus

    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def state_before(corpus) -> tuple[dict, dict]:
    from tests.corpus import corpus_state

    return corpus_state(corpus)
