"""TorchServe's stock image classifier, unchanged except for topk (benchmark baseline only).

The stock `image_classifier` handler answers the top 5 classes. These models have
2 classes, so torch.topk(probs, 5) fails on every request (TorchServe answers
HTTP 503 "Prediction failed"); this subclass only lowers topk to 2. Transforms
(Resize(256), CenterCrop(224), ToTensor, Normalize), model loading, batching and
the answer format are the stock ones.
"""
from ts.torch_handler.image_classifier import ImageClassifier


class StockImageClassifierTop2(ImageClassifier):
    topk = 2
