"""Property-based tests (hypothesis): the image loader, the crop geometry and the config parsers
hold their documented contracts on random inputs, not only on the hand-picked cases of the other
test modules.

- images: any size, PIL mode and format, truncated or corrupted bytes -> an RGB image of the
  file's size, or `ImageError` ('<path>: <reason>', one line). Nothing else escapes.
- crops: a crop lies inside the slide, is non-empty, square unless the slide is smaller, holds
  the whole cell; `base_resize` always gives (size, size, 3) uint8 with the image centred.
- config: any YAML document -> a LabelMap / Params, or `ConfigError` (one line naming the file);
  valid label maps round-trip.

Deterministic: every test uses `derandomize=True` and no example database.
"""

from __future__ import annotations

import io
import math
import string
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import config as cfgmod
from pipeline.config import EXCLUDE, ConfigError, LabelMap, Params, load_params
from pipeline.data.images import ImageError, ImageLimits, decode_rgb, load_rgb, read_bytes
from pipeline.data.transforms import base_resize, normalize
from pipeline.wsi.crops import crop_box, crop_boxes, read_crops, tile_crops
from pipeline.wsi.readers import _ImageSource
from tests.slides import glass

PROPS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# A loader with no size policy, so that the properties below are about decoding only.
ANY_SIZE = ImageLimits(min_side=1, max_pixels=50_000_000)
# Mutated headers may claim anything: keep what a corrupted file can make us allocate small.
SMALL = ImageLimits(min_side=1, max_pixels=4_000_000)
# The file's own modes that must always load (pipeline/data/images.py: _LOSSLESS_MODES).
MUST_LOAD = {"RGB", "L", "LA", "RGBA", "P", "PA", "1", "I;16", "I;16B", "I;16L", "I;16N", "I"}
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}
MODES = (
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "I;16",
    "I;16B",
    "I;16L",
    "I",
    "F",
    "YCbCr",
    "HSV",
    "LAB",
)


def _writable() -> list[tuple[str, str]]:
    """(mode, format) pairs this Pillow can write: the search space of the loader tests."""
    pairs = []
    for mode in MODES:
        for fmt in FORMATS:
            try:
                Image.new(mode, (3, 2)).save(io.BytesIO(), format=fmt)
            except (OSError, KeyError, ValueError, TypeError):
                continue
            pairs.append((mode, fmt))
    return pairs


WRITABLE = _writable()


def random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels in `mode` (every byte random: F and I get NaNs, negatives and extremes)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "1":
        raw = np.packbits(rng.integers(0, 2, (h, w), dtype=np.uint8), axis=1).tobytes()
    else:
        per_pixel = len(Image.new(mode, (1, 1)).tobytes())
        raw = rng.integers(0, 256, w * h * per_pixel, dtype=np.uint8).tobytes()
    img = Image.frombytes(mode, size, raw)
    if mode in ("P", "PA"):
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sizes():
    side = st.integers(1, 64)
    return st.one_of(
        st.tuples(st.integers(1, 4), st.integers(1, 4)),  # tiny
        st.tuples(side, side),
        st.tuples(st.just(1), st.integers(1, 3000)),  # 1xN
        st.tuples(st.integers(1, 3000), st.just(1)),  # Nx1
        st.tuples(st.integers(1, 12), st.integers(200, 2000)),  # extreme aspect ratios
        st.tuples(st.integers(300, 900), st.integers(300, 900)),  # large but bounded
    )


def assert_image_error(exc: ImageError, path: Path) -> None:
    msg = str(exc)
    assert len(msg.splitlines()) == 1, repr(msg)
    assert msg == f"{path}: {exc.reason}" and exc.path == str(path), repr(msg)
    assert exc.reason.strip(), repr(msg)


def check_load(path: Path, data: bytes, limits: ImageLimits) -> Image.Image | None:
    """The loader contract on one file: RGB of the header's size from every entry point, or a
    one-line ImageError from every entry point. Returns the image, or None on ImageError."""
    path.write_bytes(data)
    try:
        img = load_rgb(path, limits)
    except ImageError as exc:
        assert_image_error(exc, path)
        # decode_rgb on the same bytes agrees (load_rgb is read_bytes + decode_rgb).
        with pytest.raises(ImageError) as again:
            decode_rgb(data, path, limits)
        assert_image_error(again.value, path)
        return None
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (img.height, img.width, 3)
    img2, info = decode_rgb(data, path, limits)
    assert img2.mode == "RGB" and img2.size == img.size == (info.width, info.height)
    assert min(img.size) >= limits.min_side and img.width * img.height <= limits.max_pixels
    return img


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


# --------------------------------------------------------------------------- image loader


@PROPS
@given(pair=st.sampled_from(WRITABLE), size=sizes(), seed=st.integers(0, 2**32 - 1))
# Always tried, whatever the draw: thin, large, 16-bit, CMYK (rejected today, accepted soon).
@example(pair=("L", "PNG"), size=(1, 3000), seed=1)
@example(pair=("RGB", "JPEG"), size=(900, 700), seed=2)
@example(pair=("I;16", "TIFF"), size=(3000, 1), seed=3)
@example(pair=("CMYK", "JPEG"), size=(64, 48), seed=4)
@example(pair=("CMYK", "TIFF"), size=(17, 1), seed=5)
@example(pair=("P", "BMP"), size=(1, 1), seed=6)
def test_loader_any_mode_size_format(scratch, pair, size, seed):
    mode, fmt = pair
    if fmt == "JPEG":
        size = (min(size[0], 2000), min(size[1], 2000))
    # Palette PNGs with a transparent index too (tRNS: composited onto white).
    extra = {"transparency": seed % 256} if (mode, fmt) == ("P", "PNG") and seed % 2 else {}
    data = encode(random_image(mode, size, seed), fmt, **extra)
    file_mode = Image.open(io.BytesIO(data)).mode
    path = scratch / f"img-{mode.replace(';', '_')}{FORMATS[fmt]}"
    img = check_load(path, data, ANY_SIZE)
    if file_mode in MUST_LOAD:
        assert img is not None, f"{mode} {fmt} (file mode {file_mode}) {size} must load"
    if img is not None:
        # Of the file's own size (a clean file: the size that was written).
        assert img.size == size
    # CMYK, F, YCbCr, LAB...: either outcome, but only the documented one of each.


@PROPS
@given(
    fmt=st.sampled_from(["PNG", "TIFF", "BMP"]),
    mode=st.sampled_from(["RGB", "L", "1", "RGBA", "LA", "I;16"]),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    seed=st.integers(0, 2**32 - 1),
)
def test_loader_lossless_pixels(scratch, fmt, mode, size, seed):
    """Lossless formats: pixels survive (greys replicated, alpha over white, 16 bit scaled)."""
    assume((mode, fmt) in WRITABLE)
    src = random_image(mode, size, seed)
    data = encode(src, fmt)
    if Image.open(io.BytesIO(data)).mode != mode:
        return  # e.g. BMP stores RGBA as RGB: the pixel rule below is for the file's own mode
    img = check_load(scratch / f"px{FORMATS[fmt]}", data, ANY_SIZE)
    assert img is not None and img.size == size
    got = np.asarray(img).astype(np.int64)
    if mode in ("RGB", "L", "1"):
        want = np.asarray(src.convert("RGB")).astype(np.int64)
        np.testing.assert_array_equal(got, want)
    elif mode == "I;16":
        v = np.asarray(src, dtype=np.float64)
        want = np.rint(v / 65535.0 * 255.0).astype(np.int64)
        np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))
    else:  # RGBA, LA: composited onto white
        rgba = np.asarray(src.convert("RGBA")).astype(np.int64)
        alpha = rgba[..., 3]
        np.testing.assert_array_equal(got[alpha == 255], rgba[..., :3][alpha == 255])
        assert (got[alpha == 0] == 255).all()
        # Anything partly transparent is at least as light as its own colour.
        assert (got >= rgba[..., :3] - 1).all()


@PROPS
@given(
    size=st.tuples(st.integers(1, 80), st.integers(1, 80)),
    min_side=st.integers(1, 100),
    max_pixels=st.integers(1, 7000),
    fmt=st.sampled_from(["PNG", "JPEG", "BMP", "TIFF"]),
)
def test_loader_limits(scratch, size, min_side, max_pixels, fmt):
    """ImageLimits: loads exactly when the header passes both limits."""
    data = encode(random_image("RGB", size, 0), fmt)
    path = scratch / f"lim{FORMATS[fmt]}"
    limits = ImageLimits(min_side=min_side, max_pixels=max_pixels)
    img = check_load(path, data, limits)
    ok = min(size) >= min_side and size[0] * size[1] <= max_pixels
    assert (img is not None) == ok, (size, limits)
    if not ok:
        reason = pytest.raises(ImageError, load_rgb, path, limits).value.reason
        assert ("pixel limit" in reason) if size[0] * size[1] > max_pixels else ("minimum side" in reason)


MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1), st.integers(0, 0)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("flip-header"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("garbage"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.integers(1, 64)),
)


def mutate(data: bytes, ops, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = bytearray(data)
    for kind, where, n in ops:
        if not buf:
            break
        if kind == "flip-header":
            pos = int(where * min(len(buf) - 1, 63))  # magic, sizes, offsets, tags
        else:
            pos = int(where * (len(buf) - 1))
        if kind == "truncate":
            del buf[pos:]
        elif kind in ("flip", "flip-header"):
            buf[pos] ^= n
        elif kind == "garbage":
            buf[pos : pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        else:
            buf[pos:pos] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(buf)


# PIL warns about the corrupt TIFF tags it skips; the outcome is what is checked.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")
@settings(PROPS, max_examples=200)
@given(
    pair=st.sampled_from(WRITABLE),
    size=st.tuples(st.integers(1, 48), st.integers(1, 48)),
    ops=st.lists(MUTATIONS, min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_loader_corrupt_bytes(scratch, pair, size, ops, seed):
    """Truncated, flipped and garbled files: ImageError or an RGB image, nothing else."""
    mode, fmt = pair
    data = mutate(encode(random_image(mode, size, seed), fmt), ops, seed)
    img = check_load(scratch / f"bad{FORMATS[fmt]}", data, SMALL)
    if img is not None:
        # The size the (possibly corrupted) header declares.
        assert img.size == Image.open(io.BytesIO(data)).size


# PIL warns about the corrupt TIFF tags it skips; the outcome is what is checked.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")
@PROPS
@given(
    head=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF89a"]),
    body=st.binary(max_size=300),
    suffix=st.sampled_from(sorted(FORMATS.values())),
)
def test_loader_garbage_files(scratch, head, body, suffix):
    """Random bytes, with or without a real magic number: an ImageError, or (rarely) an image."""
    data = head + body
    path = scratch / f"garbage{suffix}"
    if not data:
        path.write_bytes(b"")
        with pytest.raises(ImageError, match="0 bytes") as info:
            load_rgb(path)
        assert_image_error(info.value, path)
        return
    check_load(path, data, SMALL)


@PROPS
@given(
    name=st.text(string.ascii_letters + string.digits + "._- ", min_size=1, max_size=20),
    kind=st.sampled_from(["missing", "dir", "empty", "dangling"]),
)
def test_read_bytes_bad_paths(scratch, name, kind):
    assume(name not in (".", ".."))
    base = scratch / "paths"
    base.mkdir(exist_ok=True)
    path = base / name
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        path.rmdir()
    if kind == "dir":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "dangling":
        path.symlink_to(base / f"{name}.nowhere")
    for call in (lambda: read_bytes(path), lambda: load_rgb(path)):
        with pytest.raises(ImageError) as info:
            call()
        assert_image_error(info.value, path)
    reason = info.value.reason
    assert {"missing": "not found", "dir": "directory", "empty": "0 bytes", "dangling": "broken symlink"}[
        kind
    ] in reason


# --------------------------------------------------------------------------- crops


def boxes_and_slides():
    """A slide size, a margin and cell bboxes anywhere: inside, at the edges, partly outside."""
    return st.integers(1, 400).flatmap(
        lambda w: st.integers(1, 400).flatmap(
            lambda h: st.tuples(
                st.just((w, h)),
                st.one_of(st.just(0.0), st.floats(0, 2, allow_nan=False), st.sampled_from([0.25, 0.5, 1.0])),
                st.lists(
                    st.tuples(
                        st.integers(-50, w + 50),
                        st.integers(-50, h + 50),
                        st.integers(1, max(w, h) + 60),
                        st.integers(1, max(w, h) + 60),
                    ),
                    min_size=1,
                    max_size=8,
                ),
            )
        )
    )


@settings(PROPS, max_examples=200)
@given(case=boxes_and_slides())
def test_crop_box_geometry(case):
    (width, height), margin, raw = case
    cells = pd.DataFrame([{"x0": x, "y0": y, "x1": x + bw, "y1": y + bh} for x, y, bw, bh in raw])
    boxes = crop_boxes(cells, margin, (width, height))
    assert len(boxes) == len(cells)
    for (x, y, w, h), row in zip(boxes, cells.itertuples()):
        assert all(isinstance(v, int) for v in (x, y, w, h))
        assert (x, y, w, h) == crop_box(row._asdict(), margin, (width, height))
        # Inside the slide, non-empty.
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        assert w >= 1 and h >= 1
        # Square, side = long side x (1 + 2 margin), unless the slide is smaller (then clipped to it).
        side = math.ceil(max(row.x1 - row.x0, row.y1 - row.y0) * (1 + 2 * margin))
        assert w == min(side, width) and h == min(side, height)
        # The part of the cell on the slide is inside the crop.
        ix0, iy0, ix1, iy1 = max(row.x0, 0), max(row.y0, 0), min(row.x1, width), min(row.y1, height)
        if ix0 < ix1 and iy0 < iy1:
            assert x <= ix0 and ix1 <= x + w and y <= iy0 and iy1 <= y + h
        # Centred on the cell when the slide leaves room (shifted, never shrunk, at its edges).
        cx, cy = (row.x0 + row.x1) / 2, (row.y0 + row.y1) / 2
        if side / 2 + 1 <= cx <= width - side / 2 - 1:
            assert abs(x + w / 2 - cx) <= 0.5
        if side / 2 + 1 <= cy <= height - side / 2 - 1:
            assert abs(y + h / 2 - cy) <= 0.5


@settings(PROPS, max_examples=60)
@given(
    size=st.tuples(st.integers(8, 240), st.integers(8, 240)),
    seed=st.integers(0, 2**32 - 1),
    margin=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.5]),
    out=st.sampled_from([8, 17, 32]),
    discs=st.lists(st.tuples(st.floats(-0.2, 1.2), st.floats(-0.2, 1.2), st.integers(2, 40)), min_size=1, max_size=5),
)
def test_crops_hold_the_whole_cell(size, seed, margin, out, discs):
    """Cells drawn anywhere on a fake in-memory slide (also across its edges): each crop holds
    every pixel of its cell that is on the slide; tile_crops == base_resize of read_crops."""
    width, height = size
    rows, masks = [], []
    for fx, fy, r in discs:
        mask = np.zeros((height, width), bool)
        yy, xx = np.mgrid[:height, :width]
        mask[(xx - fx * width) ** 2 + (yy - fy * height) ** 2 <= r * r] = True
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        # Detection's bboxes: level-0, x1/y1 exclusive, clipped to the slide.
        rows.append({"x0": int(xs.min()), "y0": int(ys.min()), "x1": int(xs.max()) + 1, "y1": int(ys.max()) + 1})
        masks.append(mask)
    assume(rows)
    img = glass(size, seed=seed % 1000)
    for mask in masks:  # (draw_disc needs the disc's centre on the image; these may be off it)
        img[mask] = (70, 40, 110)
    source = _ImageSource(Path("fake.png"), img)
    cells = pd.DataFrame(rows)
    crops = read_crops(source, cells, margin)
    boxes = crop_boxes(cells, margin, source.dimensions)
    for crop, (x, y, w, h), mask in zip(crops, boxes, masks):
        assert crop.shape == (h, w, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, img[y : y + h, x : x + w])  # inside the slide: no white fill
        assert mask[y : y + h, x : x + w].sum() == mask.sum()
    cut = tile_crops(source, cells, margin, out)
    assert cut.shape == (len(cells), out, out, 3) and cut.dtype == np.uint8
    np.testing.assert_array_equal(cut, np.stack([base_resize(c, out) for c in crops]))


def _extent(h: int, w: int, size: int) -> tuple[int, int]:
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


@settings(PROPS, max_examples=150)
@given(
    shape=st.one_of(
        st.tuples(st.just(1), st.integers(1, 5000)),
        st.tuples(st.integers(1, 5000), st.just(1)),
        st.tuples(st.integers(1, 300), st.integers(1, 300)),
        st.tuples(st.integers(1, 4), st.integers(500, 4000)),
        st.tuples(st.integers(500, 4000), st.integers(1, 4)),
    ),
    size=st.integers(1, 256),
    seed=st.integers(0, 2**32 - 1),
    view=st.booleans(),
)
def test_base_resize_shape_and_centring(shape, size, seed, view):
    import cv2

    h, w = shape
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if view:  # a crop out of a larger region, as tile_crops passes it
        big = rng.integers(0, 256, (h + 2, w + 3, 3), dtype=np.uint8)
        big[1 : 1 + h, 2 : 2 + w] = img
        img = big[1 : 1 + h, 2 : 2 + w]
    before = img.copy()
    res = base_resize(img, size)
    assert res.shape == (size, size, 3) and res.dtype == np.uint8
    np.testing.assert_array_equal(img, before)  # the input is not modified
    # The long side fills the square; the short side keeps the aspect ratio.
    nh, nw = _extent(h, w, size)
    assert max(nh, nw) == size
    top, left = (size - nh) // 2, (size - nw) // 2
    bottom, right = size - nh - top, size - nw - left
    assert abs(top - bottom) <= 1 and abs(left - right) <= 1  # centred
    # The image sits at (top, left); the padding repeats its edge rows / columns.
    inner = res[top : top + nh, left : left + nw]
    want = (
        img
        if (nh, nw) == (h, w)
        else cv2.resize(np.ascontiguousarray(img), (nw, nh), interpolation=cv2.INTER_CUBIC).reshape(nh, nw, 3)
    )
    np.testing.assert_array_equal(inner, want)
    np.testing.assert_array_equal(res[:top], np.broadcast_to(res[top], (top, size, 3)))
    np.testing.assert_array_equal(res[top + nh :], np.broadcast_to(res[top + nh - 1], (bottom, size, 3)))
    np.testing.assert_array_equal(res[:, :left], np.broadcast_to(res[:, left : left + 1], (size, left, 3)))
    np.testing.assert_array_equal(
        res[:, left + nw :], np.broadcast_to(res[:, left + nw - 1 : left + nw], (size, right, 3))
    )


@PROPS
@given(
    shape=st.tuples(st.integers(1, 200), st.integers(1, 200)),
    size=st.integers(1, 128),
    colour=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
)
def test_base_resize_flat_stays_flat(shape, size, colour):
    h, w = shape
    flat = np.empty((h, w, 3), np.uint8)
    flat[:] = colour
    res = base_resize(flat, size)
    assert res.shape == (size, size, 3) and (res == np.array(colour, np.uint8)).all()


@PROPS
@given(shape=st.tuples(st.integers(3, 60), st.integers(3, 60)), extra=st.integers(0, 100))
def test_base_resize_keeps_a_centred_cell_centred(shape, extra):
    """A dark pixel in the middle of a white crop ends up in the middle of the square
    (upscaling, so that the padding, which repeats the white edges, stays white)."""
    h, w = shape
    size = max(h, w) + extra
    marked = np.full((h, w, 3), 255, np.uint8)
    marked[h // 2, w // 2] = 0
    res = base_resize(marked, size)
    ys, xs = np.nonzero(res.min(axis=2) == res.min())
    # The marker's centre, (h//2 + 0.5) / h of the image's height, lands that far down the
    # image, which starts half the padding down the square.
    scale = size / max(h, w)
    ey = (size - h * scale) / 2 + (h // 2 + 0.5) * scale
    ex = (size - w * scale) / 2 + (w // 2 + 0.5) * scale
    tol = 1.0 + scale / 2
    assert abs(ys.mean() + 0.5 - ey) <= tol and abs(xs.mean() + 0.5 - ex) <= tol, (ys, xs, ey, ex)
    # Nothing dark near the square's border: the cell did not slide off-centre.
    assert res[[0, -1]].min() >= 200 and res[:, [0, -1]].min() >= 200


# --------------------------------------------------------------------------- config parsing


def _defaults() -> dict:
    """params.yaml with every section at its defaults: the starting point of the mutations."""
    doc = Params(cfgmod.DataConfig(), cfgmod.SplitConfig()).to_dict()
    herlev = doc["data"]["sources"]["herlev"]
    herlev["group"] = {"regex": herlev["group"]["regex"]}
    return doc


DEFAULTS = _defaults()
SECTION_NAMES = list(DEFAULTS)
HERLEV_SOURCE = ("data", "sources", "herlev")
FIELD_PATHS = [(s, k) for s in SECTION_NAMES for k in DEFAULTS[s]] + [
    HERLEV_SOURCE + ("path",),
    HERLEV_SOURCE + ("label_map",),
    HERLEV_SOURCE + ("group", "regex"),
    HERLEV_SOURCE + ("group", "column"),
]


def assert_config_error(exc: ConfigError, path: Path) -> None:
    msg = str(exc)
    assert len(msg.splitlines()) == 1, repr(msg)
    assert msg.startswith(f"{path}: ") and len(msg) > len(f"{path}: "), repr(msg)


KEYS = st.one_of(
    st.text(max_size=12),
    st.integers(-5, 10**30),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.sampled_from(["labels", "classes", "data", "split", "train", "model", "slide", "regex", "column"]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**400), 10**400),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["benign", "malignant", EXCLUDE, "", "\n", "a\nb", "ünïcødé", "(\\d+)", "(", "sensitivity"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


def dump(doc) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def write_yaml(path: Path, doc) -> Path:
    path.write_text(dump(doc), encoding="utf-8")
    return path


def try_label_map(path: Path) -> LabelMap | None:
    try:
        lm = LabelMap.load(path)
    except ConfigError as exc:
        assert_config_error(exc, path)
        return None
    assert isinstance(lm, LabelMap) and lm.path == str(path)
    assert len(lm.labels) >= 2 and len(set(lm.labels)) == len(lm.labels) and EXCLUDE not in lm.labels
    assert lm.classes and all(isinstance(k, str) and v in (*lm.labels, EXCLUDE) for k, v in lm.classes.items())
    return lm


def try_params(path: Path):
    try:
        params = load_params(path)
    except ConfigError as exc:
        assert_config_error(exc, path)
        return None
    assert params.path == str(path)
    return params


LABEL_DOCS = st.one_of(
    VALUES,
    st.fixed_dictionaries({"labels": VALUES, "classes": VALUES}),
    st.fixed_dictionaries(
        {
            "labels": st.lists(st.one_of(st.text(max_size=8), SCALARS), max_size=5),
            "classes": st.dictionaries(
                KEYS, st.one_of(st.sampled_from(["benign", "malignant", EXCLUDE]), VALUES), max_size=6
            ),
        },
        optional={"extra": VALUES},
    ),
)


@settings(PROPS, max_examples=200)
@given(doc=LABEL_DOCS)
def test_label_map_random_documents(scratch, doc):
    path = write_yaml(scratch / "labels.yaml", doc)
    lm = try_label_map(path)
    if lm is not None:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))  # as YAML reads it back
        assert list(lm.labels) == doc["labels"]
        assert len(lm.classes) == len(doc["classes"])
        for name, label in doc["classes"].items():
            assert lm.label_of(str(name)) == label


@PROPS
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda a, b: a + b,
            st.sampled_from(
                [
                    "labels: [a, b]\nclasses:\n",
                    "data:\n  ",
                    "[",
                    "{",
                    "- ",
                    "&a x: *a\n",
                    "!!python/object:os.system\n",
                    "? [a, b]\n: c\n",
                    "x: 1\n---\ny: 2\n",
                ]
            ),
            st.text(max_size=80),
        ),
    ),
    raw=st.binary(max_size=60),
    kind=st.sampled_from(["text", "bytes", "huge", "deep"]),
    where=st.sampled_from(FIELD_PATHS),
    n=st.one_of(st.integers(1, 6000), st.sampled_from([4300, 4301])),
    depth=st.one_of(st.integers(1, 700), st.just(1000)),
)
def test_config_random_text_and_bytes(scratch, text, raw, kind, where, n, depth):
    """Any file content, even invalid YAML, invalid UTF-8, an unsafe tag, integers of thousands
    of digits (decimal or hex) anywhere, or deep nesting: ConfigError or a result."""
    path = scratch / "random.yaml"
    if kind == "bytes":
        path.write_bytes(raw)
    elif kind == "text":
        path.write_text(text, encoding="utf-8")
    elif kind == "huge":
        number = ("-" if n % 2 else "") + ("0x" + "f" * n if n % 3 else "9" * n)
        nested = "".join(f"{'  ' * i}{key}:\n" for i, key in enumerate(where[:-1]))
        doc = f"{nested}{'  ' * (len(where) - 1)}{where[-1]}: {number}\n{number}: x\n"
        path.write_text(doc if n % 5 else f"labels: [a, b]\nclasses: {{{number}: a, x: {number}}}\n")
    else:
        path.write_text(f"{where[0]}: " + "[" * depth + "]" * depth + "\n")
    try_label_map(path)
    try_params(path)


LABEL_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=10).filter(
    lambda s: s != EXCLUDE
)


@settings(PROPS, max_examples=150)
@given(
    labels=st.lists(LABEL_NAMES, min_size=2, max_size=6, unique=True),
    names=st.lists(
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
        min_size=1,
        max_size=12,
        unique=True,
    ),
    picks=st.lists(st.integers(0, 100), min_size=12, max_size=12),
    missing=st.text(max_size=12),
)
def test_label_map_round_trip(scratch, labels, names, picks, missing):
    """A valid label map (unicode names and labels, 'exclude' among the targets) loads as written."""
    targets = [*labels, EXCLUDE]
    classes = {n: targets[p % len(targets)] for n, p in zip(names, picks)}
    # PyYAML itself writes some characters (NEL, U+2028...) raw and reads them back as spaces.
    assume(yaml.safe_load(dump({"labels": labels, "classes": classes})) == {"labels": labels, "classes": classes})
    path = write_yaml(scratch / "valid_labels.yaml", {"labels": labels, "classes": classes})
    lm = LabelMap.load(path)
    assert lm.labels == tuple(labels)  # the model's output order, exactly as written
    assert lm.classes == classes
    for name, label in classes.items():
        assert lm.label_of(name) == label
    if missing not in classes:
        with pytest.raises(ConfigError) as info:
            lm.label_of(missing)
        assert len(str(info.value).splitlines()) == 1 and str(path) in str(info.value)
    # The same map written with its keys in another order: same labels, same mapping.
    again = LabelMap.load(
        write_yaml(scratch / "valid_labels2.yaml", {"classes": dict(reversed(list(classes.items()))), "labels": labels})
    )
    assert again.labels == lm.labels and again.classes == lm.classes


GOOD_VALUES = st.one_of(
    st.integers(-3, 300),
    st.floats(-1, 2),
    st.floats(0, 1),
    st.booleans(),
    st.none(),
    st.sampled_from(
        [
            "auto",
            "cpu",
            "cuda",
            "sampler",
            "none",
            "train_light",
            "eval",
            "youden",
            "phased",
            "overlapped",
            "(\\w+)-\\d",
            "\\d+",
            "[",
            "class",
            "imagenet",
            "",
        ]
    ),
    st.lists(st.sampled_from(["malignant", "benign"]), max_size=3),
    st.fixed_dictionaries({"train": st.floats(0, 1), "val": st.floats(0, 1), "test": st.floats(0, 1)}),
    st.just({"train": 0.5, "val": 0.25, "test": 0.25}),
)
EDIT = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(FIELD_PATHS), st.one_of(GOOD_VALUES, VALUES)),
    st.tuples(st.just("drop"), st.sampled_from(FIELD_PATHS), st.none()),
    st.tuples(st.just("drop-section"), st.sampled_from(SECTION_NAMES), st.none()),
    st.tuples(st.just("replace-section"), st.sampled_from(SECTION_NAMES), VALUES),
    st.tuples(st.just("unknown-key"), st.sampled_from(SECTION_NAMES + [None]), KEYS),
)


def apply_edits(doc: dict, edits) -> dict:
    doc = yaml.safe_load(dump(doc))  # a deep copy
    for kind, where, value in edits:
        if kind in ("set", "drop"):
            node = doc
            for key in where[:-1]:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            if kind == "set":
                node[where[-1]] = value
            else:
                node.pop(where[-1], None)
        elif kind == "drop-section":
            doc.pop(where, None)
        elif kind == "replace-section":
            doc[where] = value
        elif where is None:
            doc[value] = 1
        elif isinstance(doc.get(where), dict):
            doc[where][value] = 1
    return doc


@settings(PROPS, max_examples=200)
@given(edits=st.lists(EDIT, min_size=1, max_size=4))
def test_params_mutated_documents(scratch, edits):
    """params.yaml with sections dropped or replaced, unknown keys, wrong types, NaN, huge ints:
    a Params whose values are the document's, or a one-line ConfigError."""
    doc = apply_edits(DEFAULTS, edits)
    path = write_yaml(scratch / "params.yaml", doc)
    params = try_params(path)
    if params is None:
        return
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name, section in doc.items():
        if not isinstance(section, dict):
            continue
        obj = getattr(params, name)
        for key, value in section.items():
            got = getattr(obj, key)
            if key == "sources":  # each source's path and label map as written (group rules: below)
                got = {n: (s.path, s.label_map) for n, s in got.items()}
                value = {n: (s["path"], s["label_map"]) for n, s in value.items()}
            if isinstance(value, float) and math.isnan(value):
                assert isinstance(got, float) and math.isnan(got)
            else:
                assert got == value, (name, key, got, value)
    # Validated invariants hold for whatever loaded.
    fr = params.split.fractions
    assert set(fr) == {"train", "val", "test"} and all(0 < v <= 1 for v in fr.values())
    assert abs(sum(fr.values()) - 1) <= 1e-6
    assert params.train.lr > 0 and params.slide.crop_margin >= 0 and math.isfinite(params.slide.crop_margin)
    for rule in (s.group for s in params.data.source_list() if s.group is not None):  # None: ingest decides
        assert (rule.regex is None) != (rule.column is None)
        assert all(v is None or isinstance(v, str) for v in (rule.regex, rule.column))


@PROPS
@given(doc=st.one_of(VALUES, st.dictionaries(st.sampled_from(SECTION_NAMES), VALUES, max_size=4)))
def test_params_random_documents(scratch, doc):
    try_params(write_yaml(scratch / "params_random.yaml", doc))


def test_settings_and_search_space():
    """The examples do not depend on the run (derandomized, no example database), and the
    search spaces still hold what they are meant to (a Pillow upgrade could drop a writer)."""
    assert PROPS.derandomize is True and PROPS.database is None and PROPS.deadline is None
    assert {f.name for f in fields(Params)} == set(SECTION_NAMES) | {"path"}
    written = {m for m, _ in WRITABLE}
    assert written >= {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr", "LAB"}, written
    assert {f for _, f in WRITABLE} == set(FORMATS)


@settings(PROPS, max_examples=60)
@given(
    batch=st.integers(0, 4),
    size=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    mean=st.tuples(*[st.floats(0.0, 1.0)] * 3),
    std=st.tuples(*[st.floats(0.05, 1.0)] * 3),
)
def test_normalize_is_the_whole_array_formula_bit_for_bit(batch, size, seed, mean, std):
    """The per-plane, in-place normalisation gives the same float32 bits as ((x / 255) - mean) / std
    on the whole array, then HWC -> CHW; for one image and for a batch."""
    rng = np.random.default_rng(seed)
    shape = (size, size + 1, 3) if batch == 0 else (batch, size, size + 1, 3)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    before = x.copy()
    want = (x.astype(np.float32) / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    want = np.moveaxis(want, -1, -3)
    got = normalize(x, mean, std)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(x, before)
