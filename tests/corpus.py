"""The bad-input corpus (issue 7) that tests/integration/test_bad_inputs.py feeds to every entry point
(and tests/e2e/test_rest_serving.py to the REST server): truncated, empty, mislabelled, odd-mode,
tiny, bomb, unreadable, dangling and oddly named images and slides, derived from real Herlev cells;
and `cytopipe` run as a subprocess, so stderr is exactly what a user sees. As root a chmod 000 file
is still readable, so the subprocesses drop the capabilities that allow it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, png_header_only, tree_digest, without_root_file_access
from tests.slides import draw_cells, glass, write_pyramid

HERLEV = ROOT.parent / "shared" / "data" / "herlev"
LABELS = ROOT / "configs" / "labels" / "herlev_binary.yaml"
MODEL = "models:/cytology-classifier@champion"
BENIGN, MALIGNANT = "normal_superficiel", "carcinoma_in_situ"
EMPTY_CLASS = "normal_columnar"  # a class of the label map whose folder is empty
ODD_DIR = "ünï cødé 细胞 folder"  # unicode and spaces in a path
CALLS = {"benign", "malignant", "indeterminate"}


# --------------------------------------------------------------------------- the corpus: images


def _copy(path: Path, src: Path) -> None:
    shutil.copyfile(src, path)


def _truncated(path: Path, src: Path) -> None:
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero_bytes(path: Path, src: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path, src: Path) -> None:
    path.write_text("field notes, not pixels\n")


def _html(path: Path, src: Path) -> None:
    path.write_text("<!doctype html><html><body><h1>404 Not Found</h1></body></html>\n")


def _alpha(path: Path, src: Path) -> None:
    rgba = Image.open(src).convert("RGBA")
    alpha = np.linspace(0, 255, rgba.width, dtype=np.uint8)[None, :].repeat(rgba.height, axis=0)
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(path, format="PNG")


def _grey(path: Path, src: Path) -> None:
    Image.open(src).convert("L").save(path, format="PNG")


def _palette(path: Path, src: Path) -> None:
    Image.open(src).convert("RGB").quantize(64).save(path, format="PNG")


def _cmyk(path: Path, src: Path) -> None:
    Image.open(src).convert("CMYK").save(path, format="JPEG", quality=95)


def _sixteen_bit(path: Path, src: Path) -> None:
    grey = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(path, format="TIFF")


def _one_pixel(path: Path, src: Path) -> None:
    Image.new("RGB", (1, 1), (180, 120, 200)).save(path, format="PNG")


def _bomb(path: Path, src: Path) -> None:
    png_header_only(path, 60000, 60000)  # the header claims 3.6 gigapixels; the file is tiny


def _locked(path: Path, src: Path) -> None:
    shutil.copyfile(src, path)
    path.chmod(0)


def _dangling(path: Path, src: Path) -> None:
    path.symlink_to(path.parent / "gone.jpg")


def _folder(path: Path, src: Path) -> None:
    path.mkdir()


def _locked_folder(path: Path, src: Path) -> None:
    path.mkdir()
    shutil.copyfile(src, path / "inside.jpg")
    path.chmod(0)


@dataclass(frozen=True)
class Case:
    rel: str  # posix path under corpus/images: <class>/<name>
    reason: str | None  # in its one-line error; None: accepted and scored
    make: Callable[[Path, Path], None]  # (path, a real cell image to derive it from)
    mode: str = "RGB"  # the file's own mode, for accepted ones

    @property
    def id(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


ACCEPTED = [
    Case(f"{BENIGN}/good-1.jpg", None, _copy),
    Case(f"{BENIGN}/good-2.jpg", None, _copy),
    Case(f"{MALIGNANT}/good-1.jpg", None, _copy),
    Case(f"{MALIGNANT}/good-2.jpg", None, _copy),
    Case(f"{BENIGN}/alpha.png", None, _alpha, "RGBA"),
    Case(f"{BENIGN}/grey.png", None, _grey, "L"),
    Case(f"{BENIGN}/palette.png", None, _palette, "P"),
    Case(f"{MALIGNANT}/cmyk.jpg", None, _cmyk, "CMYK"),
    Case(f"{MALIGNANT}/deep-16bit.tif", None, _sixteen_bit, "I;16"),
    Case(f"{MALIGNANT}/{ODD_DIR}/cell with spaces ñ.jpg", None, _copy),
]
REJECTED = [
    Case(f"{MALIGNANT}/truncated.jpg", "truncated or corrupt", _truncated),
    Case(f"{BENIGN}/zero-bytes.jpg", "empty file (0 bytes)", _zero_bytes),
    Case(f"{MALIGNANT}/text.jpg", "not an image", _text),
    Case(f"{BENIGN}/page.png", "not an image", _html),
    Case(f"{MALIGNANT}/one-pixel.png", "below the minimum side", _one_pixel),
    Case(f"{BENIGN}/bomb.png", "decompression-bomb", _bomb),
    Case(f"{MALIGNANT}/locked.jpg", "permission denied", _locked),
    Case(f"{BENIGN}/dangling.jpg", "broken symlink", _dangling),
    Case(f"{MALIGNANT}/folder.jpg", "is a directory", _folder),
    Case(f"{BENIGN}/locked folder", "cannot list folder: Permission denied", _locked_folder),
]
# Kinds a REST client can send (file-system kinds never reach the server).
SENDABLE = {_truncated, _zero_bytes, _text, _html, _one_pixel, _bomb}
LOCKED = [c.rel for c in REJECTED if c.make in (_locked, _locked_folder)]


# --------------------------------------------------------------------------- the corpus: slides

SLIDE_MPP = 0.25
SLIDE_CELLS = [(200, 200, 30), (520, 300, 35), (820, 520, 25), (300, 600, 28)]


def _pyramid(path: Path, seed: int = 0, compression: str | None = None) -> Path:
    return write_pyramid(path, draw_cells(glass((1024, 768), seed=seed), SLIDE_CELLS), SLIDE_MPP, compression)


def _slide(path: Path) -> None:
    _pyramid(path, seed=1)


def _truncated_slide(path: Path) -> None:
    data = _pyramid(path).read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


def _corrupt_tile_slide(path: Path) -> None:
    """Opens fine (its corners are intact), then a tile of level 1 fails to decode in the middle
    of cell detection, in a worker thread."""
    import tifffile

    _pyramid(path, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[1]
        offset, size = page.dataoffsets[1], page.databytecounts[1]  # top right: not a probed corner
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = b"\0" * size
    path.write_bytes(bytes(data))


def _no_mpp(path: Path) -> None:
    Image.fromarray(draw_cells(glass((400, 300)), [(150, 150, 30)])).save(path, format="PNG")


def _text_slide(path: Path) -> None:
    path.write_text("not a slide\n")


def _locked_slide(path: Path) -> None:
    _pyramid(path)
    path.chmod(0)


def _dangling_slide(path: Path) -> None:
    path.symlink_to(path.parent / "gone.tiff")


def _folder_slide(path: Path) -> None:
    path.mkdir()


def _missing(path: Path) -> None:
    pass


@dataclass(frozen=True)
class SlideCase:
    rel: str  # under corpus/slides
    reason: str | None
    make: Callable[[Path], None]

    @property
    def id(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


GOOD_SLIDES = [SlideCase("field.tiff", None, _slide), SlideCase(f"{ODD_DIR}/slide with spaces ñ.tiff", None, _slide)]
BAD_SLIDES = [
    SlideCase("truncated.tiff", "truncated or corrupt", _truncated_slide),
    SlideCase("corrupt-tile.tiff", "cannot read region", _corrupt_tile_slide),
    SlideCase("no-mpp.png", "has no mpp", _no_mpp),
    SlideCase("notes.tiff", "not a slide", _text_slide),
    SlideCase("locked.tiff", "permission denied", _locked_slide),
    SlideCase("dangling.tiff", "broken symlink", _dangling_slide),
    SlideCase("folder.tiff", "is a directory", _folder_slide),
    SlideCase("missing.tiff", "not found", _missing),
]


# --------------------------------------------------------------------------- building and checking


def _real_cells(n: int) -> list[Path]:
    """n distinct real Herlev crops (distinct bytes, so ingest finds no duplicates)."""
    if not (HERLEV / "MANIFEST.csv").is_file():
        pytest.fail(f"reference data missing: {HERLEV} (tests need ../shared/data from the project root)")
    files = sorted((HERLEV / BENIGN).glob("*.jpg"))[: n // 2] + sorted((HERLEV / MALIGNANT).glob("*.jpg"))[: n - n // 2]
    assert len(files) == n
    return files


def build_corpus(folder: Path) -> Path:
    images = folder / "images"
    (images / EMPTY_CLASS).mkdir(parents=True)
    for case, src in zip(ACCEPTED + REJECTED, _real_cells(len(ACCEPTED) + len(REJECTED))):
        path = images / case.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        case.make(path, src)
    for case in GOOD_SLIDES + BAD_SLIDES:
        path = folder / "slides" / case.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        case.make(path)
    (folder / "empty").mkdir()
    return folder


@contextmanager
def _unlocked(corpus: Path):
    """Locked entries readable for a moment, so a non-root digest can read them too."""
    paths = [corpus / "images" / rel for rel in LOCKED] + [corpus / "slides" / "locked.tiff"]
    for p in paths:
        p.chmod(0o700)
    try:
        yield
    finally:
        for p in paths:
            p.chmod(0)


def corpus_state(corpus: Path) -> tuple[dict, dict]:
    """sha256 of every file, and every entry's mode and link target (a chmod or a lost link shows)."""
    with _unlocked(corpus):
        files = tree_digest(corpus)
    entries = {}
    for dirpath, dirnames, filenames in os.walk(corpus):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            entries[str(p.relative_to(corpus))] = (p.lstat().st_mode, os.readlink(p) if p.is_symlink() else None)
    return files, entries


def cytopipe(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`cytopipe ARGS` as a user runs it, with file permissions that apply even to root."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = without_root_file_access([sys.executable, "-m", "pipeline.cli", *map(str, args)])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def lines_about(stderr: str, path: str) -> list[str]:
    return [line for line in stderr.splitlines() if f"{path}: " in line]


def leftovers(folder: Path) -> list[str]:
    """Temporary or hidden files an interrupted write would leave."""
    return [str(p) for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    out: Path
    state_after: tuple[dict, dict]


def run_cli(corpus, work, name: str, *args) -> Run:
    """`cytopipe ARGS` in `work`, its output at work/`name`, and the corpus's state after it."""
    out = work / name
    proc = cytopipe(*args, cwd=work)
    return Run(proc, out, corpus_state(corpus))


def run_predict(project: dict, corpus: Path, work: Path) -> Run:
    """`cytopipe predict` over the corpus's images, an empty folder and a missing path, with the project's
    exported model: its predictions.csv is what every other way of scoring the corpus must agree with."""
    return run_cli(
        corpus,
        work,
        "predict",
        "predict",
        corpus / "images",
        corpus / "empty",
        corpus / "nowhere",
        "--model",
        project["root"] / "models/exported",
        "--params",
        project["root"] / "params.yaml",
        "--out",
        work / "predict" / "predictions.csv",
    )
