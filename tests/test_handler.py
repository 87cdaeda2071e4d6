"""Unit tests of models/handler.py, in TorchServe's own style: build a model directory like the
unpacked .mar, call initialize() and handle() with a context, no server.

The context is TorchServe's real ts.context.Context with one RequestProcessor per request
(what ts.service.Service builds for every batch), so per-request status codes are checked
exactly as the frontend will read them; one test uses TorchServe's MockContext as well.
"""
import ast
import base64
import io
import json
import os
import resource
import shutil
import sys
import time
import uuid

import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from tests.serving_utils import (REPO_ROOT, TEST1_DIR, TRAIN_DIR, bomb_png, dog_probability, encode, eps_bytes,
                                 expected_dog_probabilities, fixture_bytes, flat_png, make_checkpoint, tiny_png,
                                 truncated_jpeg)

ts_context = pytest.importorskip("ts.context")
from ts.metrics.metrics_store import MetricsStore  # noqa: E402
from ts.model_loader import TsModelLoader  # noqa: E402
from ts.utils.util import list_classes_from_module  # noqa: E402

from models import handler as handler_module  # noqa: E402
from models.handler import (ACCEPTED_FORMATS, MAX_FULL_DECODE_PIXELS, DogsVsCatsHandler, open_rgb,  # noqa: E402
                            pick_model_class)

IMG_SIZE = 64


def make_model_dir(directory, conv_net, img_size=IMG_SIZE, with_meta=True, seed=0):
    """What TorchServe unpacks from an archive built by deployment/archive.sh."""
    checkpoint = make_checkpoint(directory, conv_net, img_size, seed=seed)
    if not with_meta:
        os.remove(os.path.splitext(checkpoint)[0] + ".json")
    shutil.copy(os.path.join(REPO_ROOT, "models", conv_net, conv_net + ".py"), directory)
    shutil.copy(os.path.join(REPO_ROOT, "models", "index_to_name.json"), directory)
    manifest = {"model": {"modelName": conv_net, "serializedFile": os.path.basename(checkpoint),
                          "modelFile": conv_net + ".py", "handler": "handler.py", "modelVersion": "1.0"}}
    return checkpoint, manifest


def make_context(model_dir, manifest, yaml_config=None):
    return ts_context.Context(manifest["model"]["modelName"], str(model_dir), manifest, 4, None, "0.12.0",
                              True, MetricsStore(uuid.uuid4(), manifest["model"]["modelName"]),
                              yaml_config or {})


def new_batch(context, size, headers=None):
    """What ts.service.Service does before every handle() call."""
    context.request_processor = [ts_context.RequestProcessor(dict(headers or {})) for _ in range(size)]
    context.request_ids = {i: "req-%d" % i for i in range(size)}
    context.metrics.request_ids = context.request_ids
    return context


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base_cnn_model_dir")
    checkpoint, manifest = make_model_dir(str(directory), "base_cnn")
    sys.path.append(str(directory))  # the worker imports the model file by module name
    yield str(directory), checkpoint, manifest
    sys.path.remove(str(directory))


@pytest.fixture(scope="module")
def loaded(model_dir):
    directory, checkpoint, manifest = model_dir
    context = make_context(directory, manifest)
    handler = DogsVsCatsHandler()
    handler.initialize(context)
    return handler, context, checkpoint


def run(loaded, rows, headers=None):
    """handle() one batch; returns [(status, parsed JSON answer, content type)] per request."""
    handler, context, _ = loaded
    new_batch(context, len(rows), headers)
    out = handler.handle(rows, context)
    assert isinstance(out, list) and len(out) == len(rows)
    return [(context.get_response_status(i)[0], json.loads(out[i]), context.get_response_content_type(i))
            for i in range(len(rows))]


def expected(loaded, images):
    _, _, checkpoint = loaded
    return expected_dog_probabilities("base_cnn", checkpoint, images)


def jpeg_of(name, directory=TRAIN_DIR):
    return fixture_bytes(name, directory)


def rgb_of(name, directory=TRAIN_DIR):
    return Image.open(io.BytesIO(fixture_bytes(name, directory))).convert("RGB")


# ---- loadable by TorchServe, on the stock image's Python ---------------------------------------

def test_torchserve_loads_the_module_level_entry_point_and_it_answers(tmp_path):
    """TorchServe's own loader, on a model directory as a worker unpacks it (the handler file copied in, as
    the archive holds it): it takes the module-level handle(), initializes through it, and a batch is answered.
    With that entry point the file may define several classes (ImageError beside the handler)."""
    directory = tmp_path / "unpacked"
    directory.mkdir()
    checkpoint, manifest = make_model_dir(str(directory), "base_cnn")
    (directory / "MAR-INF").mkdir()
    (directory / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    shutil.copy(os.path.join(REPO_ROOT, "models", "handler.py"), str(directory / "handler.py"))
    assert len(list_classes_from_module(handler_module)) > 1  # a class entry point would be refused
    sys.path.insert(0, str(directory))
    try:
        service = TsModelLoader().load("base_cnn", str(directory), "handler.py")
        module = sys.modules["handler"]
        assert service._entry_point is module.handle and module._service.initialized
        service.context.metrics = MetricsStore(uuid.uuid4(), "base_cnn")  # what the worker sets per batch
        context = new_batch(service.context, 2)
        answers = service._entry_point([{"body": jpeg_of("cat.0.jpg")}, {"body": b"not an image"}], context)
        want = expected_dog_probabilities("base_cnn", checkpoint, [jpeg_of("cat.0.jpg")])[0]
        assert dog_probability(json.loads(answers[0])) == pytest.approx(want, abs=1e-5)
        assert context.get_response_status(1)[0] == 415 and json.loads(answers[1])["type"] == "UnsupportedImageFormat"
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("handler", None)
        sys.modules.pop("base_cnn", None)


ARCHIVED_SOURCES = ["models/handler.py", "models/base_cnn/base_cnn.py",
                    "models/vgg/vgg.py", "models/efficientnet_lite0/efficientnet_lite0.py"]
# The archive of the original README's command holds only the handler, the model file, the
# weights and index_to_name.json: the handler imports nothing from the project or TorchServe.
# onnxruntime: imported only by an archive that holds an ONNX model, and deployment/Dockerfile installs it.
# pillow_heif: optional (HEIC); where it is missing, a HEIC upload is a 415 naming it (tests/test_phone_formats.py).
ALLOWED_IMPORTS = {"base64", "binascii", "http", "importlib", "inspect", "io", "json", "logging", "os", "re",
                   "time", "torch", "PIL", "onnxruntime", "pillow_heif"}


@pytest.mark.parametrize("path", ARCHIVED_SOURCES)
def test_archived_files_parse_as_python39(path):
    with open(os.path.join(REPO_ROOT, path)) as f:
        ast.parse(f.read(), filename=path, feature_version=(3, 9))


def test_handler_imports_only_what_the_archive_and_stock_image_have():
    with open(os.path.join(REPO_ROOT, "models", "handler.py")) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


# ---- answers -------------------------------------------------------------------------------------

def test_answer_is_top_label_and_probability(loaded):
    images = [fixture_bytes(n) for n in ("1.jpg", "2.jpg", "3.jpg", "2124.jpg")]
    results = run(loaded, [{"body": data} for data in images])
    for (status, answer, content_type), want in zip(results, expected(loaded, images)):
        assert status == 200 and content_type == "application/json"
        assert len(answer) == 1
        (label, prob), = answer.items()
        assert label in ("cat", "dog") and 0.5 <= prob <= 1.0
        assert dog_probability(answer) == pytest.approx(want, abs=1e-5)


def test_answer_text_is_compact_json_like_the_readme(loaded):
    handler, context, _ = loaded
    new_batch(context, 1)
    text, = handler.handle([{"body": fixture_bytes("2124.jpg")}], context)
    label = "dog" if '"dog"' in text else "cat"
    assert text == '{"%s": %r}' % (label, json.loads(text)[label])


@pytest.fixture
def keep_pillow_limit():
    # TorchServe's VisionHandler lifts Pillow's bomb limit when the context does not carry
    # limit_max_image_pixels (MockContext doesn't): restore it for the other tests.
    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


def test_with_torchserves_mock_context(model_dir, keep_pillow_limit):
    from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext
    directory, checkpoint, manifest = model_dir
    context = MockContext(model_pt_file=manifest["model"]["serializedFile"], model_dir=directory,
                          model_file=manifest["model"]["modelFile"], model_name="base_cnn")
    handler = DogsVsCatsHandler()
    handler.initialize(context)
    data = fixture_bytes("2124.jpg")
    out = handler.handle([{"data": data}, {"body": b""}], context)
    assert dog_probability(json.loads(out[0])) == pytest.approx(
        expected_dog_probabilities("base_cnn", checkpoint, [data])[0], abs=1e-5)
    assert json.loads(out[1])["code"] == 400


def test_multipart_field_raw_body_and_base64_agree(loaded):
    data = jpeg_of("dog.0.jpg")
    results = run(loaded, [{"data": data}, {"body": data}, {"body": base64.b64encode(data).decode()}])
    assert [r[0] for r in results] == [200, 200, 200]
    assert results[0][1] == results[1][1] == results[2][1]


def test_two_files_in_one_request_are_refused_alone(loaded):
    """A multipart request with a second file under another name: which one would be answered? Neither."""
    dog, cat = jpeg_of("dog.0.jpg"), jpeg_of("cat.0.jpg")
    results = run(loaded, [{"data": dog, "other": cat}, {"data": dog, "note": "a form field, not a file"}])
    assert results[0][0] == 400 and results[0][1]["type"] == "TooManyFiles", results[0]
    assert "['data', 'other']" in results[0][1]["message"]
    assert results[1][0] == 200 and dog_probability(results[1][1]) == pytest.approx(expected(loaded, [dog])[0],
                                                                                     abs=1e-5)


# ---- every image mode classifies like its RGB equivalent -----------------------------------------

def _exif_rotated(img, fmt):
    """The upright `img` stored rotated, with the EXIF orientation (6) that turns it upright again."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = img.transpose(Image.Transpose.ROTATE_90)
    data = encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == img.size
    return data


def _white_composite(rgba):
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


_VARIANTS = {}


def variants():
    """name -> (bytes sent, the RGB image it must classify like, tolerance on P(dog))."""
    if _VARIANTS:
        return _VARIANTS
    import numpy as np
    rgb = rgb_of("cat.0.jpg")
    gray = rgb.convert("L")
    gray_jpeg = encode(gray, "JPEG", quality=95)
    rgba = rgb.convert("RGBA")
    half = rgba.copy()
    half.putalpha(Image.linear_gradient("L").resize(rgb.size))
    palette = rgb.quantize(64)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 0
    gray16 = Image.fromarray(np.asarray(gray).astype("uint16") * 257)
    gray_float = Image.fromarray(np.asarray(gray).astype("float32") / 255)  # 32-bit float, 0..1
    gray_float255 = Image.fromarray(np.asarray(gray).astype("float32"))  # 32-bit float, 0..255
    _VARIANTS.update({
        "grayscale_jpeg": (gray_jpeg, Image.open(io.BytesIO(gray_jpeg)).convert("RGB"), 1e-5),
        "grayscale_png": (encode(gray, "PNG"), gray.convert("RGB"), 1e-5),
        "gray_alpha_png": (encode(gray.convert("LA"), "PNG"), gray.convert("RGB"), 1e-5),
        "gray_16bit_png": (encode(gray16, "PNG"), gray.convert("RGB"), 0.02),
        "gray_float_tiff": (encode(gray_float, "TIFF"), gray.convert("RGB"), 1e-3),
        "gray_float255_tiff": (encode(gray_float255, "TIFF"), gray.convert("RGB"), 1e-3),
        "rgba_opaque_png": (encode(rgba, "PNG"), rgb, 1e-5),
        "rgba_transparent_png": (encode(half, "PNG"), _white_composite(half), 1e-3),
        "palette_png": (encode(palette, "PNG"), palette.convert("RGB"), 1e-5),
        "palette_transparency_png": (encode(palette_transparent, "PNG"),
                                     _white_composite(palette_transparent.convert("RGBA")), 1e-3),
        "cmyk_jpeg": (encode(rgb.convert("CMYK"), "JPEG", quality=95), rgb, 0.02),
        "exif_rotated_png": (_exif_rotated(rgb, "PNG"), rgb, 1e-5),
        "exif_rotated_jpeg": (_exif_rotated(rgb, "JPEG"), rgb, 0.02),
    })
    return _VARIANTS


VARIANTS = ["grayscale_jpeg", "grayscale_png", "gray_alpha_png", "gray_16bit_png", "gray_float_tiff",
            "gray_float255_tiff", "rgba_opaque_png",
            "rgba_transparent_png", "palette_png", "palette_transparency_png", "cmyk_jpeg",
            "exif_rotated_png", "exif_rotated_jpeg"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_mode_classifies_like_rgb(loaded, variant):
    data, reference, tolerance = variants()[variant]
    (status, answer, _), = run(loaded, [{"body": data}])
    assert status == 200, answer
    want, = expected(loaded, [encode(reference, "PNG")])
    assert dog_probability(answer) == pytest.approx(want, abs=tolerance)


def test_exif_orientation_matters(loaded):
    """The rotation is really applied: the same pixels without the tag classify differently."""
    rgb = rgb_of("dog.3.jpg")
    with_tag = _exif_rotated(rgb, "PNG")
    without_tag = encode(rgb.transpose(Image.Transpose.ROTATE_90), "PNG")
    results = run(loaded, [{"body": with_tag}, {"body": without_tag}, {"body": encode(rgb, "PNG")}])
    assert results[0][1] == results[2][1]
    assert results[0][1] != results[1][1]


# ---- bad input: its own 4xx, the rest of the batch answered --------------------------------------

def test_batch_answers_each_request_in_order_and_fails_only_the_bad_ones(loaded):
    goods = [jpeg_of("cat.2.jpg"), jpeg_of("dog.4.jpg"), fixture_bytes("2124.jpg"), jpeg_of("dog.7.jpg")]
    rows = [{"body": goods[0]}, {"body": b""}, {"body": b"this is not an image"}, {"body": goods[1]},
            {"body": truncated_jpeg(goods[1])}, {"body": bomb_png()}, {"body": goods[2]}, {"body": tiny_png()},
            {"body": goods[3]}, {"data": {"json": "body"}}]
    results = run(loaded, rows)
    statuses = [r[0] for r in results]
    # Text is no format we decode: 415. The truncated JPEG is one, broken: 400.
    assert statuses == [200, 400, 415, 200, 400, 413, 200, 400, 200, 400]
    types = [r[1].get("type") for r in results if r[0] != 200]
    assert types == ["EmptyBody", "UnsupportedImageFormat", "InvalidImage", "ImageTooLarge", "ImageTooSmall",
                     "InvalidInput"]
    for status, answer, content_type in results:
        assert content_type == "application/json"
        if status != 200:
            assert answer["code"] == status and answer["message"]
            assert "0x" not in answer["message"]  # no object reprs leak into answers
    got = [dog_probability(r[1]) for r in results if r[0] == 200]
    assert got == pytest.approx(expected(loaded, goods), abs=1e-5)
    # the same images alone give the same answers: batching changes nothing
    alone = [dog_probability(run(loaded, [{"body": g}])[0][1]) for g in goods]
    assert got == pytest.approx(alone, abs=1e-5)


def test_all_bad_batch(loaded):
    # Three bytes of JPEG signature and no header: no decoder can tell what they are, so 415 like any
    # unrecognised bytes (telling "damaged JPEG" from "not a JPEG" would mean parsing them further).
    results = run(loaded, [{"body": b""}, {"body": b"\xff\xd8\xff"}])
    assert [r[0] for r in results] == [400, 415]
    assert [r[1]["type"] for r in results] == ["EmptyBody", "UnsupportedImageFormat"]


def test_eps_is_415_and_never_reaches_the_eps_plugin(loaded, eps_plugin_calls):
    """Issue 17: an EPS upload reached Pillow's EPS plugin, which runs Ghostscript on it."""
    assert Image.open(io.BytesIO(eps_bytes())).format == "EPS"  # plain Pillow hands these bytes to the plugin
    assert len(eps_plugin_calls) == 1
    (status, answer, content_type), = run(loaded, [{"body": eps_bytes()}])
    assert status == 415 and answer["type"] == "UnsupportedImageFormat" and content_type == "application/json"
    assert all(name in answer["message"] for name in ACCEPTED_FORMATS)
    assert len(eps_plugin_calls) == 1  # the handler's decoding never got there


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_accepted_format_is_served(loaded, fmt):
    data = encode(rgb_of("dog.8.jpg"), fmt)
    (status, answer, _), = run(loaded, [{"body": data}])
    assert status == 200, answer
    assert dog_probability(answer) == pytest.approx(expected(loaded, [data])[0], abs=1e-5)


def test_6000x6000_png_is_refused_from_its_header(loaded, monkeypatch):
    """Issue 17: 32 such PNGs of ~120 KB each (108 MB of pixels each) kept a worker busy 14.6 s.
    Formats decoded in full are limited to 4096x4096, checked before a pixel is decoded."""
    data = flat_png(6000)
    assert len(data) < 200 * 1024
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: decoded.append(img.size) or load(img))
    start = time.perf_counter()
    (status, answer, _), = run(loaded, [{"body": data}])
    elapsed = time.perf_counter() - start
    assert status == 413 and answer["type"] == "ImageTooLarge"
    assert "6000x6000" in answer["message"] and str(MAX_FULL_DECODE_PIXELS) in answer["message"]
    assert decoded == []  # not a pixel decoded, which took 0.5-1.2 s on one core
    assert elapsed < 0.5


def test_full_decode_limit_is_4096_squared(loaded):
    """The limit still takes a 12 MP phone photo or a 5K screenshot saved as PNG."""
    results = run(loaded, [{"body": flat_png(4096)}, {"body": bomb_png(4097)}])
    assert [r[0] for r in results] == [200, 413]


def test_big_jpeg_is_decoded_at_reduced_scale(loaded):
    """JPEG draft mode: a 6000x4000 photo is decoded at 1/8 scale, 750x500 (both sides >= 2 x 64 px),
    for a fraction of a full decode's cost, and answered like the project's own code decodes it."""
    handler, _, _ = loaded
    data = encode(rgb_of("dog.3.jpg").resize((6000, 4000)), "JPEG", quality=90)
    assert open_rgb(data, handler.img_size).size == (750, 500)
    assert open_rgb(data).size == (6000, 4000)  # without a size to aim at: in full
    (status, answer, _), = run(loaded, [{"body": data}])
    assert status == 200
    assert dog_probability(answer) == pytest.approx(expected(loaded, [data])[0], abs=1e-5)


@pytest.mark.parametrize("side", [30000, 8000])
def test_decompression_bomb_rejected_fast_without_allocating(loaded, side):
    """30000x30000 (900 MP) trips Pillow's own bomb check; 8000x8000 (64 MP) is under Pillow's
    limit but over the project's 40 MP, checked from the header before decoding."""
    bomb = bomb_png(side)
    assert len(bomb) < 64 * 1024
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    (status, answer, _), = run(loaded, [{"body": bomb}])
    elapsed = time.perf_counter() - start
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert status == 413 and answer["type"] == "ImageTooLarge"
    assert str(side * side) in answer["message"] or "%dx%d" % (side, side) in answer["message"]
    assert elapsed < 1.0
    assert rss_growth_mib < 100  # decoding would need 2.7 GB (30000) or 190 MB (8000)


def test_tiny_images_refused_and_small_ones_served(loaded):
    results = run(loaded, [{"body": tiny_png()},
                           {"body": encode(rgb_of("cat.3.jpg").resize((16, 16)), "PNG")}])
    assert results[0][0] == 400 and "1x1" in results[0][1]["message"]
    assert results[1][0] == 200


def test_non_image_text_and_form_fields(loaded):
    results = run(loaded, [{"body": "not base64 !"}, {"hello": b""}])
    assert [r[0] for r in results] == [400, 400]
    assert "hello" in results[1][1]["message"]


def test_explanations_are_refused_per_request(loaded):
    results = run(loaded, [{"body": fixture_bytes("1.jpg")}], headers={"explain": "True"})
    assert results[0][0] == 501


def test_describe(loaded):
    handler, context, _ = loaded
    new_batch(context, 1, {"describe": "True"})
    info = json.loads(handler.handle([{}], context)[0])
    assert info["img_size"] == IMG_SIZE and info["classes"] == ["cat", "dog"]


# ---- loading ---------------------------------------------------------------------------------------

def test_img_size_comes_from_the_weights(loaded):
    handler, _, _ = loaded
    assert handler.img_size == IMG_SIZE


@pytest.mark.parametrize("conv_net,yaml_config,want", [
    ("base_cnn", {}, IMG_SIZE),  # the weights' own img_size buffer
    ("base_cnn", {"handler": {"img_size": 96}}, 96),  # the model config overrides it
    ("efficientnet_lite0", {}, 224),  # no buffer and no meta JSON: the fallback
])
def test_img_size_without_the_meta_json(tmp_path, conv_net, yaml_config, want):
    directory = str(tmp_path)
    _, manifest = make_model_dir(directory, conv_net, with_meta=False)
    sys.path.append(directory)
    try:
        handler = DogsVsCatsHandler()
        context = make_context(directory, manifest, yaml_config)
        handler.initialize(context)
        assert handler.img_size == want
        new_batch(context, 1)
        assert json.loads(handler.handle([{"body": fixture_bytes("3.jpg")}], context)[0])
    finally:
        sys.path.remove(directory)


def test_model_file_with_building_blocks_loads(tmp_path):
    """efficientnet_lite0.py also defines MBConvBlock: TorchServe's stock loader refuses that."""
    directory = str(tmp_path)
    checkpoint, manifest = make_model_dir(directory, "efficientnet_lite0", img_size=64)
    sys.path.append(directory)
    try:
        handler = DogsVsCatsHandler()
        context = make_context(directory, manifest)
        handler.initialize(context)
        assert type(handler.model).__name__ == "EfficientNetLite0"
        data = fixture_bytes("2.jpg")
        new_batch(context, 1)
        answer = json.loads(handler.handle([{"body": data}], context)[0])
        assert dog_probability(answer) == pytest.approx(
            expected_dog_probabilities("efficientnet_lite0", checkpoint, [data])[0], abs=1e-5)
    finally:
        sys.path.remove(directory)


def test_pick_model_class_refuses_ambiguous_files():
    import types
    from torch import nn
    module = types.ModuleType("some_model")
    for name in ("A", "B"):
        cls = type(name, (nn.Module,), {})
        cls.__module__ = "some_model"
        setattr(module, name, cls)
    with pytest.raises(ValueError, match="expected one"):
        pick_model_class(module)


def test_weights_are_loaded_without_unpickling_code(tmp_path):
    """A checkpoint that pickles a whole module (arbitrary code on load) is refused."""
    directory = str(tmp_path)
    checkpoint, manifest = make_model_dir(directory, "base_cnn")
    from models import build_model
    torch.save(build_model("base_cnn"), checkpoint)
    sys.path.append(directory)
    try:
        with pytest.raises(Exception, match="(?i)weights.only"):
            DogsVsCatsHandler().initialize(make_context(directory, manifest))
    finally:
        sys.path.remove(directory)


def test_every_fixture_image_is_served_as_prediction_classifies_it(loaded):
    """Every image prediction would read in the fixture folders, in one batch: each is answered 200 with the
    probability the project's own code (models.load_trained + transforms) gives it, in request order."""
    from dataset import find_images
    paths = find_images(TEST1_DIR) + find_images(TRAIN_DIR)
    assert [os.path.basename(p) for p in paths[:4]] == ["1.jpg", "2.jpg", "3.jpg", "2124.jpg"]  # numeric order
    images = [fixture_bytes(os.path.basename(p), os.path.dirname(p)) for p in paths]
    results = run(loaded, [{"body": data} for data in images])
    assert [r[0] for r in results] == [200] * len(images) == [200] * 28
    assert [dog_probability(r[1]) for r in results] == pytest.approx(expected(loaded, images), abs=1e-5)
