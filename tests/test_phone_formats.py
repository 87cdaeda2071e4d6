"""HEIC (through the pillow-heif plugin) and AVIF (through Pillow's own plugin): the formats phones save, in the
project's one decode path, models.handler.open_rgb, which training, prediction and the TorchServe handler share.

Every file is a real one, encoded here from the sample photos: AVIF by Pillow's encoder (libavif), HEIC by the
x265 encoder in pillow-heif's wheel. They must decode like the JPEG they came from, upright exactly once when
their EXIF says the camera was turned, refused from the header alone when they claim too many pixels, and be
refused with a message that says what to install where pillow-heif (or an AVIF Pillow) is missing.
"""
import importlib.util
import io
import os
import sys
import time

import numpy as np
import pillow_heif  # requirements.txt pins it: a missing plugin fails these tests, it does not skip them
import PIL
import pytest
from PIL import AvifImagePlugin, Image, ImageOps

from models import handler as handler_module
from models.handler import ACCEPTED_FORMATS, MAX_FULL_DECODE_PIXELS, ImageError, open_rgb
from models.transforms import decode_file, eval_transform, is_image_file
from tests.support import REPO_ROOT, TRAIN_DIR

FORMATS = ["HEIF", "AVIF"]  # Pillow's names: a .heic file is "HEIF"
EXIF_ORIENTATION = 0x0112
# The transpose that stores an upright photo as the sensor saw it, for the EXIF orientation that undoes it.
STORED_AS = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def encode(img, fmt, **params):
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def sample(name="cat.0.jpg"):
    """A fixture photo as the JPEG path decodes it (200x200)."""
    return open_rgb(os.path.join(TRAIN_DIR, name))


def landscape():
    """An upright photo wider than high, so that a missed or doubled rotation shows in its size."""
    return sample().crop((0, 30, 200, 150)).resize((300, 180))


def exif_bytes(orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif.tobytes()


def mean_abs_diff(a, b):
    assert a.size == b.size, (a.size, b.size)
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def test_both_formats_are_accepted_and_pillow_heif_is_the_pinned_one():
    assert "AVIF" in ACCEPTED_FORMATS and "HEIF" in ACCEPTED_FORMATS
    # AVIF before HEIF: both plugins take the generic "mif1" brand, and only Pillow's decodes AV1
    assert ACCEPTED_FORMATS.index("AVIF") < ACCEPTED_FORMATS.index("HEIF")
    assert handler_module.HEIF_MISSING is None and handler_module.AVIF_MISSING is None
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        assert "pillow-heif==%s\n" % pillow_heif.__version__ in f.read()


@pytest.mark.parametrize("fmt", FORMATS)
def test_decodes_to_the_jpeg_sources_size_and_pixels(fmt):
    rgb = sample()
    data = encode(rgb, fmt, quality=90)
    assert Image.open(io.BytesIO(data)).format == fmt  # really that format, not a JPEG renamed
    img = open_rgb(data)
    assert img.mode == "RGB" and img.size == rgb.size
    assert mean_abs_diff(img, rgb) < 4.0  # lossy at quality 90: measured ~1
    assert mean_abs_diff(img, sample("dog.3.jpg")) > 20  # the bound tells photos apart
    # with the model's input side given (what training, prediction and serving pass): the same pixels
    assert mean_abs_diff(open_rgb(data, 64), img) == 0


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_exif_rotated_photo_comes_out_upright_once_like_the_jpeg(fmt, orientation):
    upright = landscape()
    stored = upright.transpose(STORED_AS[orientation])
    assert stored.size == (180, 300)
    jpeg = encode(stored, "JPEG", quality=95, exif=exif_bytes(orientation))
    data = encode(stored, fmt, quality=95, exif=exif_bytes(orientation))
    from_jpeg, img = open_rgb(jpeg), open_rgb(data)
    assert from_jpeg.size == img.size == upright.size == (300, 180)  # width and height swapped back
    assert mean_abs_diff(from_jpeg, upright) < 4.0
    assert mean_abs_diff(img, upright) < 4.0
    assert mean_abs_diff(img, from_jpeg) < 4.0
    # turned twice (180 degrees) would have the right size and the wrong pixels
    assert mean_abs_diff(img, upright.transpose(Image.Transpose.ROTATE_180)) > 20
    assert mean_abs_diff(open_rgb(data, 64), img) == 0


def test_how_each_plugin_carries_the_rotation():
    """What open_rgb relies on: Pillow's AVIF plugin keeps the pixels as stored and the rotation in the EXIF
    orientation (exif_transpose applies it); libheif applies the rotation while decoding and pillow-heif resets
    the EXIF orientation to 1 (exif_transpose leaves it alone). Either way, once."""
    stored = landscape().transpose(STORED_AS[6])
    avif = Image.open(io.BytesIO(encode(stored, "AVIF", quality=95, exif=exif_bytes(6))))
    assert avif.size == stored.size and avif.getexif()[EXIF_ORIENTATION] == 6
    heif = Image.open(io.BytesIO(encode(stored, "HEIF", quality=95, exif=exif_bytes(6))))
    assert heif.size == (300, 180) and heif.getexif()[EXIF_ORIENTATION] == 1
    assert heif.info["original_orientation"] == 6
    for img in (avif, heif):
        assert ImageOps.exif_transpose(img).size == (300, 180)


def test_heic_thumbnail_is_decoded_instead_when_big_enough_and_upright_too():
    """pillow-heif's draft(): with the model's input side given, a HEIC with an embedded thumbnail of at least
    twice that side decodes the thumbnail instead of the full image (rotated like it), as a JPEG is decoded
    at reduced scale."""
    upright = landscape().resize((1200, 720))
    stored = upright.transpose(STORED_AS[6])
    data = encode(stored, "HEIF", quality=95, exif=exif_bytes(6), thumbnails=[300])
    assert Image.open(io.BytesIO(data)).info["thumbnails"] == [300]
    full, small = open_rgb(data), open_rgb(data, 64)
    assert full.size == (1200, 720) and mean_abs_diff(full, upright) < 4.0
    assert small.size == (300, 180) and mean_abs_diff(small, upright.resize((300, 180), Image.BILINEAR)) < 6.0
    assert open_rgb(data, 224).size == (1200, 720)  # 300 px is under 2 x 224: the full image


@pytest.mark.parametrize("fmt", FORMATS)
def test_alpha_is_composited_onto_white_like_a_png(fmt):
    rgba = sample().convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    data = encode(rgba, fmt, quality=95)
    assert Image.open(io.BytesIO(data)).mode == "RGBA"
    assert mean_abs_diff(open_rgb(data), open_rgb(encode(rgba, "PNG"))) < 4.0


def test_10_bit_heic_decodes_like_the_8_bit_source():
    rgb = sample()
    rgb16 = (np.asarray(rgb).astype(np.uint16) * 257).tobytes()
    buf = io.BytesIO()
    pillow_heif.from_bytes(mode="RGB;16", size=rgb.size, data=rgb16).save(buf, quality=95)
    data = buf.getvalue()
    assert pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=False).info["bit_depth"] == 10
    img = open_rgb(data)
    assert img.mode == "RGB" and img.size == rgb.size and mean_abs_diff(img, rgb) < 4.0


@pytest.fixture
def decoder_calls(monkeypatch):
    """A list that grows each time a HEIF or AVIF image starts decoding pixels (its plugin's load(), or
    pillow-heif's draft(), which decodes a thumbnail)."""
    from pillow_heif.as_plugin import HeifImageFile
    calls = []
    for cls, name in ((HeifImageFile, "load"), (HeifImageFile, "draft"), (AvifImagePlugin.AvifImageFile, "load")):
        def spy(self, *args, _original=getattr(cls, name), _name=name):
            calls.append((self.format, _name))
            return _original(self, *args)
        monkeypatch.setattr(cls, name, spy)
    return calls


@pytest.mark.parametrize("fmt", FORMATS)
def test_too_many_pixels_refused_from_the_header_before_any_decoding(fmt, decoder_calls):
    """The limit of every format decoded in full (MAX_FULL_DECODE_PIXELS, 4096x4096), checked like a PNG's:
    a real 4100x4100 file, a few KB when flat, that its plugin would decode, is refused without a pixel
    decoded."""
    data = encode(Image.new("RGB", (4100, 4100), (120, 80, 40)), fmt, quality=50,
                  **({"speed": 10} if fmt == "AVIF" else {}))
    assert len(data) < 64 * 1024
    start = time.perf_counter()
    with pytest.raises(ImageError) as refused:
        open_rgb(data, 64)
    elapsed = time.perf_counter() - start
    assert decoder_calls == []  # not a pixel decoded
    assert elapsed < 0.5
    error = refused.value
    assert (error.code, error.error_type) == (413, "ImageTooLarge")
    assert "4100x4100" in error.message and str(MAX_FULL_DECODE_PIXELS) in error.message and fmt in error.message
    # the same bytes are a valid image its plugin decodes (checked after, so the spy saw open_rgb alone)
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == (4100, 4100) and decoder_calls == [(fmt, "load")]


@pytest.mark.parametrize("name", ["IMG_0001.HEIC", "x.heic", "x.HEIF", "x.heif", "x.AVIF", "photo.avif"])
def test_phone_file_names_are_image_files(name):
    assert is_image_file(name)


def test_hidden_and_other_names_are_not():
    assert not is_image_file(".x.heic") and not is_image_file("x.heic.txt") and not is_image_file("heic")


@pytest.mark.parametrize("fmt,suffix", [("HEIF", ".HEIC"), ("HEIF", ".heif"), ("AVIF", ".avif")])
def test_decode_file_what_training_and_prediction_use(tmp_path, fmt, suffix):
    path = tmp_path / ("cat.1" + suffix)
    rgb = sample()
    path.write_bytes(encode(rgb, fmt, quality=90))
    tensor, why = decode_file(str(path), 64, eval_transform(64))
    assert why is None and tuple(tensor.shape) == (3, 64, 64)
    want = eval_transform(64)(rgb)
    assert float((tensor - want).abs().mean()) < 0.1  # ImageNet-normalized: ~5 of 255 levels
    assert mean_abs_diff(open_rgb(str(path)), rgb) < 4.0  # a path, as well as bytes


def test_damaged_files_are_image_errors_not_crashes(tmp_path):
    rgb = sample()
    heic, avif = encode(rgb, "HEIF", quality=90), encode(rgb, "AVIF", quality=90)
    corrupt_avif = bytearray(avif)
    corrupt_avif[len(avif) // 2:len(avif) // 2 + 200] = bytes(200)  # libavif: RuntimeError, caught
    for data in (heic[: len(heic) // 2], bytes(corrupt_avif)):
        with pytest.raises(ImageError) as refused:
            open_rgb(data)
        assert refused.value.code == 400 and refused.value.message.startswith("cannot decode image: ")
        assert not refused.value.message.endswith("\n")
    # as decode_file says it, a file skipped with its reason rather than a crash of training
    path = tmp_path / "bad.avif"
    path.write_bytes(bytes(corrupt_avif))
    assert decode_file(str(path), 64, eval_transform(64))[1].startswith("cannot decode image: ")


def test_avif_of_the_generic_mif1_brand_reaches_pillows_decoder():
    """Some writers put the generic "mif1" brand first, which both plugins accept; libheif here has no AV1
    decoder, so AVIF is tried first."""
    avif = encode(sample(), "AVIF", quality=90)
    assert avif[8:12] == b"avif"
    mif1 = avif[:8] + b"mif1" + avif[12:]
    assert mean_abs_diff(open_rgb(mif1), open_rgb(avif)) == 0


# ---- where a decoder is missing: the stock TorchServe image --------------------------------------------------

def fresh_handler(monkeypatch, name):
    """models/handler.py imported anew as its own module, as a TorchServe worker imports the archive's copy."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "models", "handler.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_without_pillow_heif_heic_is_415_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` raises ImportError
    handler = fresh_handler(monkeypatch, "handler_without_pillow_heif")
    assert "HEIF" not in handler.ACCEPTED_FORMATS and "AVIF" in handler.ACCEPTED_FORMATS
    assert "pip install pillow-heif" in handler.HEIF_MISSING and "failed" not in handler.HEIF_MISSING
    rgb = sample()
    heic = encode(rgb, "HEIF", quality=90)
    for source in (heic, io.BytesIO(heic)):
        with pytest.raises(handler.ImageError) as refused:
            handler.open_rgb(source, 64)
        error = refused.value
        assert (error.code, error.error_type) == (415, "UnsupportedImageFormat")
        assert error.message == handler.HEIF_MISSING
    # everything else as before, AVIF included
    assert mean_abs_diff(handler.open_rgb(encode(rgb, "AVIF", quality=90)), rgb) < 4.0
    assert handler.open_rgb(os.path.join(TRAIN_DIR, "cat.0.jpg")).size == rgb.size
    with pytest.raises(handler.ImageError) as refused:
        handler.open_rgb(b"this is not an image")
    assert refused.value.code == 415 and "pillow-heif" not in refused.value.message
    assert "HEIF" not in refused.value.message and "AVIF" in refused.value.message


def test_without_an_avif_pillow_avif_is_415_saying_what_to_install(monkeypatch):
    """A Pillow older than 11.2 has no AVIF plugin, and Image.open(formats=...) raises KeyError for a format
    it has never registered: the handler leaves AVIF out of the formats it asks for there."""
    rgb = sample()
    avif, heic = encode(rgb, "AVIF", quality=90), encode(rgb, "HEIF", quality=90)
    monkeypatch.setitem(sys.modules, "PIL.AvifImagePlugin", None)
    monkeypatch.delattr(PIL, "AvifImagePlugin")
    monkeypatch.delitem(Image.OPEN, "AVIF")  # as if never registered
    handler = fresh_handler(monkeypatch, "handler_without_avif")
    assert "AVIF" not in handler.ACCEPTED_FORMATS and "HEIF" in handler.ACCEPTED_FORMATS
    with pytest.raises(handler.ImageError) as refused:
        handler.open_rgb(avif)
    assert refused.value.code == 415 and refused.value.message == handler.AVIF_MISSING
    assert "pip install -U pillow" in refused.value.message
    with pytest.raises(handler.ImageError) as refused:  # not a KeyError out of Image.open
        handler.open_rgb(b"this is not an image")
    assert refused.value.code == 415
    assert mean_abs_diff(handler.open_rgb(heic), rgb) < 4.0
