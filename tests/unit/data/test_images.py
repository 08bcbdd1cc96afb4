"""The one image reader: every bad-file case gets a one-line reason; lossless modes become RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import ImageError, ImageLimits, load_rgb
from tests.conftest import make_image, png_header_only


def _reason(path, **limits) -> str:
    with pytest.raises(ImageError) as info:
        load_rgb(path, ImageLimits(**limits))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    return info.value.reason


def test_good_rgb_jpeg(tmp_path):
    img = load_rgb(make_image(tmp_path / "a.jpg", size=(40, 30)))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_zero_bytes(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert "0 bytes" in _reason(p)


def test_text_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, not an image\n")
    assert "not an image" in _reason(p)


def test_html_named_png(tmp_path):
    p = tmp_path / "page.png"
    p.write_text("<!doctype html><html><body>404</body></html>")
    assert "not an image" in _reason(p)


def test_truncated_jpeg(tmp_path):
    good = make_image(tmp_path / "good.jpg", size=(64, 64))
    p = tmp_path / "cut.jpg"
    p.write_bytes(good.read_bytes()[:300])
    assert "truncated" in _reason(p)


def test_too_small(tmp_path):
    p = make_image(tmp_path / "dot.png", size=(1, 1))
    assert "below the minimum side" in _reason(p, min_side=16)


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    p = png_header_only(tmp_path / "bomb.png", 60000, 60000)
    assert "decompression-bomb" in _reason(p)
    # Our own limit applies too, below PIL's.
    p2 = png_header_only(tmp_path / "big.png", 5000, 5000)
    assert "pixel limit" in _reason(p2, max_pixels=1_000_000)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    p = make_image(tmp_path / "cmyk.jpg", mode="CMYK")
    img = load_rgb(p)
    assert Image.open(p).mode == "CMYK" and img.mode == "RGB" and img.size == (40, 32)
    # PIL's own conversion, so the colours match what any PIL-based viewer shows.
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(p).convert("RGB")))


def test_mode_without_a_conversion_is_rejected(tmp_path):
    p = tmp_path / "float.tif"
    Image.fromarray(np.zeros((20, 20), np.float32)).save(p)
    assert "unsupported colour mode F" in _reason(p)


def test_directory_and_broken_symlink(tmp_path):
    d = tmp_path / "x.jpg"
    d.mkdir()
    assert "directory" in _reason(d)
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "missing.jpg")
    assert "broken symlink" in _reason(link)


def test_permission_denied(tmp_path, monkeypatch):
    # Tests run as root here, where chmod 000 does not stop a read; simulate the OS error.
    p = make_image(tmp_path / "locked.jpg")

    def deny(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    assert "permission denied" in _reason(p)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "I;16"])
def test_lossless_modes_become_rgb(tmp_path, mode):
    p = make_image(tmp_path / f"img_{mode.replace(';', '')}.png", mode=mode)
    img = load_rgb(p)
    assert img.mode == "RGB" and img.size == (40, 32)


def test_transparent_pixels_composite_on_white(tmp_path):
    p = tmp_path / "alpha.png"
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(p)
    assert np.asarray(load_rgb(p))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_scaled_to_eight(tmp_path):
    p = tmp_path / "deep.tif"
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(p)
    assert np.asarray(load_rgb(p))[0, 0].tolist() == [255, 255, 255]
