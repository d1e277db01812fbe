"""`prune_sweep` with a 🤗 evaluate metric through `metric_evaluator`, offline: the metric is a local
script (an `evaluate.Metric` subclass written into tmp_path) loaded with `evaluate.load(path)`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hf_tdrop import MetricEvaluator, metric_evaluator, prune_sweep

evaluate = pytest.importorskip("evaluate")

ACCURACY_SCRIPT = '''
import datasets
import evaluate


class LocalAccuracy(evaluate.Metric):
    """Fraction of predictions equal to their reference (a local copy of `accuracy`)."""

    def _info(self):
        return evaluate.MetricInfo(
            description="accuracy", citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, normalize=True):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references) if normalize else float(correct),
                "per_example": [int(p == r) for p, r in zip(predictions, references)]}
'''


@pytest.fixture(scope="module")
def accuracy_metric(tmp_path_factory):
    path = tmp_path_factory.mktemp("metric") / "local_accuracy.py"
    path.write_text(ACCURACY_SCRIPT)
    return evaluate.load(str(path))


@pytest.fixture
def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(64, 8)
    with torch.no_grad():
        y = model(x).argmax(-1)  # the unpruned model is exactly right on these labels
    return model, x, y


def test_sweep_with_a_local_evaluate_metric(accuracy_metric, model_and_data):
    model, x, y = model_and_data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    seen_modes = []

    def predict(m):
        seen_modes.append((m.training, torch.is_grad_enabled()))
        return m(x).argmax(-1), y  # tensors: converted to NumPy for the metric

    evaluator = metric_evaluator(accuracy_metric, predict)
    assert isinstance(evaluator, MetricEvaluator)
    result = prune_sweep(model, evaluator, [0.0, 0.5, 0.9], progress=False, exclude_modules=["2"])
    # only the scalar result is recorded (the per-example list is left out)
    assert result.metric_names() == ["accuracy"]
    acc = result.metrics["accuracy"]
    assert acc[0] == 1.0 and all(0.0 <= a <= 1.0 for a in acc) and acc[2] < 1.0
    # predict ran in eval mode without autograd; the sweep restored the weights and the train flag
    assert seen_modes == [(False, False)] * 3
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # same numbers as a hand-written evaluate_fn
    manual = prune_sweep(model, lambda m: {"accuracy": (m(x).argmax(-1) == y).float().mean().item()},
                         [0.0, 0.5, 0.9], progress=False, exclude_modules=["2"])
    assert manual.metrics["accuracy"] == pytest.approx(acc)


def test_keys_and_compute_kwargs(accuracy_metric, model_and_data):
    model, x, y = model_and_data
    evaluator = metric_evaluator(accuracy_metric, lambda m: (m(x).argmax(-1).tolist(), y.tolist()),
                                 keys=["accuracy"], compute_kwargs={"normalize": False})
    assert evaluator(model) == {"accuracy": 64.0}
    with pytest.raises(ValueError, match=r"returned no \['f1'\]; it returned \['accuracy', 'per_example'\]"):
        metric_evaluator(accuracy_metric, lambda m: (m(x).argmax(-1), y), keys="f1")(model)
    with pytest.raises(ValueError, match=r"\['per_example'\] are not single numbers"):
        metric_evaluator(accuracy_metric, lambda m: (m(x).argmax(-1), y), keys=["per_example"])(model)


def test_trainer_style_compute_metrics(model_and_data):
    """A compute_metrics function written for Trainer gets an EvalPrediction of NumPy arrays."""
    model, x, y = model_and_data

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        assert isinstance(logits, np.ndarray) and logits.shape == (64, 4)
        return {"accuracy": float((logits.argmax(-1) == labels).mean()), "note": "text is left out"}

    result = prune_sweep(model, metric_evaluator(compute_metrics, lambda m: (m(x), y)), [0.0, 0.8], progress=False)
    assert result.metric_names() == ["accuracy"] and result.metrics["accuracy"][0] == 1.0


def test_validation(accuracy_metric, model_and_data):
    model, x, y = model_and_data
    predict = lambda m: (m(x).argmax(-1), y)  # noqa: E731
    with pytest.raises(ValueError, match=r"metric_evaluator\(metric, predict_fn\)"):
        prune_sweep(model, accuracy_metric, progress=False)  # a metric module is not an evaluate_fn
    with pytest.raises(ValueError, match="`metric` must be a 🤗 evaluate metric"):
        metric_evaluator("accuracy", predict)
    with pytest.raises(ValueError, match="`predict_fn` must be callable"):
        metric_evaluator(accuracy_metric, None)
    with pytest.raises(ValueError, match="`keys` must be None or a non-empty list"):
        metric_evaluator(accuracy_metric, predict, keys=[])
    with pytest.raises(ValueError, match="reserved names"):
        metric_evaluator(accuracy_metric, predict, keys=["sparsity"])
    with pytest.raises(ValueError, match="may not set 'references'"):
        metric_evaluator(accuracy_metric, predict, compute_kwargs={"references": [1]})
    with pytest.raises(ValueError, match="only applies to an evaluate metric"):
        metric_evaluator(lambda p: {"a": 1.0}, predict, compute_kwargs={"normalize": False})
    with pytest.raises(ValueError, match=r"must return a pair \(predictions, references\), got Tensor"):
        prune_sweep(model, metric_evaluator(accuracy_metric, lambda m: m(x)), [0.0], progress=False)
    with pytest.raises(ValueError, match="returned no single-number result"):
        prune_sweep(model, metric_evaluator(lambda p: {"per_class": [1.0, 0.5]}, predict), [0.0], progress=False)
