"""training/calibration.py and the calibration the EfficientNet-Lite0 weights carry: the fitted temperature,
the flip-TTA decision, the model applying both in eval mode, and their way through saving, loading
and the ONNX export."""
import pytest
import torch

from training import calibration
from models import CLASSES, build_model
from models.checkpoint import save_model
from models.checkpoint import Checkpoint
from models.inference import Predictor, export_onnx
from tests.support import FIXTURES
from tests.helpers_training import one_thread  # noqa: F401  (autouse: torch on one thread)

IMAGES = FIXTURES + "/train"


def sampled_labels(logits, temperature, seed=0):
    """Labels drawn from softmax(logits / temperature): the model whose calibrated temperature that is."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits / temperature, 1), 1, generator=generator).squeeze(1)


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    logits = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0)) * 6
    for true_t in (0.5, 1.0, 2.5):
        fitted = calibration.fit_temperature(logits, sampled_labels(logits, true_t))
        assert fitted == pytest.approx(true_t, rel=0.1)


def test_fitted_temperature_is_the_minimum_and_never_worse_than_none():
    logits = torch.randn(500, 2, generator=torch.Generator().manual_seed(1)) * 8  # over-confident for its labels
    labels = sampled_labels(logits, 3.0)
    t = calibration.fit_temperature(logits, labels)
    best = calibration.nll(logits, labels, t)
    assert best <= calibration.nll(logits, labels, 1.0)
    assert best <= calibration.nll(logits, labels, t * 1.02) and best <= calibration.nll(logits, labels, t / 1.02)
    assert t > 1.5  # over-confidence is cooled down


def test_flip_tta_is_kept_only_when_it_pays():
    logits = torch.randn(400, 2, generator=torch.Generator().manual_seed(2)) * 4
    labels = sampled_labels(logits, 1.0)
    same = calibration.choose(logits, logits, labels)  # the mirror images say nothing new: not worth twice the cost
    assert same["flip_tta"] is False and same["val_images"] == 400
    assert same["val_loss"] <= same["options"]["plain"]["val_loss_uncalibrated"]
    truth = torch.nn.functional.one_hot(labels, 2).float() * 8 - 4  # mirror logits that know every answer
    helped = calibration.choose(logits, truth, labels)
    assert helped["flip_tta"] is True and helped["val_acc"] >= same["val_acc"]
    assert helped["val_loss"] < same["val_loss"]
    assert "flip TTA on" in calibration.describe(helped) and "flip TTA off" in calibration.describe(same)


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0").eval()


def test_the_model_applies_its_calibration_in_eval_mode_only(lite0):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw, mirrored = lite0.logits(x), lite0.logits(x.flip(3))
        assert torch.allclose(lite0(x), raw)  # uncalibrated: the identity
        lite0.set_calibration(2.0, True)
        try:
            assert torch.allclose(lite0(x), (raw + mirrored) / 2 / 2.0, atol=1e-6)
            lite0.train()
            torch.manual_seed(4)
            trained = lite0(x)
            torch.manual_seed(4)  # the same dropout mask
            assert torch.allclose(trained, lite0.logits(x), atol=1e-6)  # training sees the raw logits
        finally:
            lite0.eval().set_calibration(1.0, False)


def test_calibration_travels_in_the_state_dict_and_old_weights_load_uncalibrated(lite0):
    lite0.set_calibration(1.7, True)
    try:
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in lite0.state_dict().items()}  # state_dict() shares the buffers
    finally:
        lite0.set_calibration(1.0, False)
    fresh = build_model("efficientnet_lite0")
    fresh.load_state_dict(state)
    assert fresh.use_flip_tta is True and float(fresh.temperature) == pytest.approx(1.7)
    old = {k: v for k, v in state.items() if k not in ("temperature", "flip_tta")}  # weights from before calibration
    fresh.load_state_dict(old)  # strict, like the handler and predict
    assert fresh.use_flip_tta is False and float(fresh.temperature) == 1.0


def test_an_export_of_a_calibrated_model_computes_what_torch_computes(lite0, tmp_path):
    lite0.set_calibration(1.3, True)
    try:
        path = str(tmp_path / "model_efficientnet_lite0.pth")
        save_model(lite0, dict(conv_net="efficientnet_lite0", img_size=64, classes=list(CLASSES), dropout=0.2), path)
    finally:
        lite0.set_calibration(1.0, False)
    _, worst = export_onnx(Checkpoint("efficientnet_lite0", path))  # refuses to write beyond 1e-4 on the sample photos
    assert worst <= 1e-4
    onnx = Predictor.open("efficientnet_lite0", path, "onnx")
    reference = Predictor(onnx.checkpoint, "torch")
    image = IMAGES + "/cat.0.jpg"
    assert onnx.classify(image) == pytest.approx(reference.classify(image), abs=1e-4)
