"""Tasks (loss, metrics, output shape) and the models that fit them, one process: the metric
arithmetic against scikit-learn, totals split over simulated ranks, choosing and refusing
tasks, a factory of the test's own, and model output shapes."""
import sys
import types

import numpy as np
import pytest
import torch

from hpcaccel import tasks
from hpcaccel.data import Target
from hpcaccel.errors import UsageError
from hpcaccel.models import build_model

LABELS = Target((), "int64", 10)
FLOATS3 = Target((3,), "float32", 0)
MASKS = Target((4, 4), "int64", 3)


def means_over(task, batches):
    """Each statistic's mean per sample over all `batches` (what the loop hands metrics())."""
    totals, count = task.zero_sums(), 0
    for out, y in batches:
        for name, value in task.sums(out, y).items():
            totals[name] += value
        count += len(y)
    return tasks.unflatten(tasks.flatten(totals) / count, totals)


def test_auto_chooses_from_y():
    assert tasks.resolve("auto", LABELS, "--data d").name == "classify"
    assert tasks.resolve("auto", FLOATS3, "--data d").name == "regress"
    assert tasks.resolve("auto", MASKS, "--data d").name == "segment"
    chosen = tasks.resolve("auto", FLOATS3, "--data d")
    assert chosen.chosen_by_auto and chosen.output_shape == (3,)
    assert tasks.resolve("regress", Target((), "float32", 0), "--data d").output_shape == (1,)
    assert tasks.resolve("segment", MASKS, "--data d").output_shape == (3, 4, 4)


@pytest.mark.parametrize("spec,target,flags,needle", [
    ("classify", FLOATS3, {}, "--task classify needs one integer class label per sample, but "
                              "--data d holds float targets of shape (3,) (--task regress fits them)"),
    ("classify", MASKS, {}, "--task segment fits them"),
    ("segment", LABELS, {}, "--task segment needs an integer class label per element"),
    ("segment", FLOATS3, {}, "--task regress fits them"),
    ("regress", FLOATS3, {"loss": "poisson"}, "--loss poisson: regress takes mse, l1, huber"),
    ("classify", LABELS, {"loss": "mse"}, "--loss mse: for --task regress only"),
    ("regress", FLOATS3, {"label_smoothing": 0.1}, "--label-smoothing: for --task classify and segment"),
    ("detect", LABELS, {}, "--task: unknown task 'detect'"),
    ("classify", Target((), "int64", 1), {}, "it needs at least 2 classes"),
    ("nosuchmodule:f", LABELS, {}, "--task nosuchmodule:f: cannot load factory"),
])
def test_bad_task_and_target_combinations_are_one_line(spec, target, flags, needle):
    with pytest.raises(UsageError) as e:
        tasks.resolve(spec, target, "--data d", **flags)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_classify_is_cross_entropy_with_smoothing_and_accuracy():
    task = tasks.resolve("classify", LABELS, "--data d", label_smoothing=0.1)
    out = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    assert torch.equal(task.loss(out, y), torch.nn.functional.cross_entropy(out, y, label_smoothing=0.1))
    assert torch.equal(task.test_loss_sum(out, y), torch.nn.functional.cross_entropy(out, y, reduction="sum"))
    y[:3] = out[:3].argmax(1)
    y[3:] = (out[3:].argmax(1) + 1) % 10
    assert task.metrics(means_over(task, [(out, y)])) == {"accuracy": 0.5}


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_regress_losses(loss):
    task = tasks.resolve("regress", FLOATS3, "--data d", loss=loss)
    out, y = torch.randn(5, 3), torch.randn(5, 3)
    want = {"mse": torch.nn.functional.mse_loss, "l1": torch.nn.functional.l1_loss,
            "huber": torch.nn.functional.huber_loss}[loss](out, y)
    assert torch.equal(task.loss(out, y), want)


def test_regress_metrics_per_output_match_scikit_learn_across_ranks():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(0)
    y = rng.standard_normal((40, 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, -3.0]
    out = y + rng.standard_normal((40, 3)) * [0.5, 2.0, 0.1]
    task = tasks.resolve("regress", FLOATS3, "--data d")
    # 4 "ranks" of 10 samples: the mean of each rank's means per sample is the global mean;
    # ratios (R^2) taken only after
    parts = [(torch.tensor(out[i:i + 10], dtype=torch.float32),
              torch.tensor(y[i:i + 10], dtype=torch.float32)) for i in range(0, 40, 10)]
    per_rank = [tasks.flatten(means_over(task, [p])) for p in parts]
    means = tasks.unflatten(np.mean(per_rank, axis=0), task.zero_sums())
    got = task.metrics(means)
    y32, out32 = (np.asarray(a, np.float32).astype(np.float64) for a in (y, out))
    want_r2 = r2_score(y32, out32, multioutput="raw_values")
    np.testing.assert_allclose(got["r2_per_output"], want_r2, rtol=1e-9)
    np.testing.assert_allclose(got["r2"], want_r2.mean(), rtol=1e-9)
    np.testing.assert_allclose(got["rmse"], np.sqrt(mean_squared_error(y32, out32)), rtol=1e-9)
    np.testing.assert_allclose(got["mae"], mean_absolute_error(y32, out32), rtol=1e-9)
    np.testing.assert_allclose(got["rmse_per_output"],
                               np.sqrt(mean_squared_error(y32, out32, multioutput="raw_values")), rtol=1e-9)
    # the mean of per-rank R^2 is not R^2: what reducing sums avoids
    rank_r2 = [r2_score(y32[i:i + 10], out32[i:i + 10]) for i in range(0, 40, 10)]
    assert abs(np.mean(rank_r2) - got["r2"]) > 1e-3


def test_regress_constant_target_has_no_r2():
    task = tasks.resolve("regress", Target((2,), "float32", 0), "--data d")
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    got = task.metrics(means_over(task, [(y + 0.5, y)]))
    assert got["r2_per_output"][0] is None and got["r2"] == pytest.approx(0.0)
    assert got["rmse"] == pytest.approx(0.5)


def test_segment_pixel_accuracy_and_mean_iou():
    task = tasks.resolve("segment", Target((2, 2), "int64", 3), "--data d")
    y = torch.tensor([[[0, 0], [1, 1]], [[0, 2], [2, 2]]])
    pred = torch.tensor([[[0, 1], [1, 1]], [[0, 2], [2, 0]]])
    out = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    got = task.metrics(means_over(task, [(out[:1], y[:1]), (out[1:], y[1:])]))
    assert got["pixel_accuracy"] == pytest.approx(6 / 8)
    # class 0: inter 2, union 4; class 1: inter 2, union 3; class 2: inter 2, union 3
    assert got["iou_per_class"] == pytest.approx([2 / 4, 2 / 3, 2 / 3])
    assert got["mean_iou"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert torch.equal(task.loss(out, y), torch.nn.functional.cross_entropy(out, y))
    assert task.test_loss_sum(out, y) == pytest.approx(
        float(torch.nn.functional.cross_entropy(out, y)) * 2)


def test_a_factory_of_our_own(monkeypatch):
    seen = {}

    def within(target):
        seen["target"] = target

        def loss(out, y):
            return (out.squeeze(1) - y).abs().mean()

        def hit(out, y):  # a sum over the batch
            return ((out.squeeze(1) - y).abs() < 0.5).sum()

        def error_sign(out, y):  # any fixed shape: [below, above]
            d = out.squeeze(1) - y
            return torch.stack([(d < 0).sum(), (d > 0).sum()])
        return loss, {"hit": hit, "error_sign": error_sign}, (1,)

    monkeypatch.setitem(sys.modules, "mytasks", types.SimpleNamespace(within=within))
    target = Target((), "float32", 0)
    task = tasks.resolve("mytasks:within", target, "--data d")
    assert seen["target"] == target and task.output_shape == (1,) and task.name == "within"
    out, y = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([0.1, 0.0, 2.6, 3.2])
    assert task.loss(out, y) == pytest.approx((0.1 + 1 + 0.6 + 0.2) / 4)
    assert task.metrics(means_over(task, [(out[:2], y[:2]), (out[2:], y[2:])])) == \
        {"hit": 0.5, "error_sign": [0.75, 0.25]}
    for made, needle in [(lambda t: 3, "expected (loss, metrics)"),
                         (lambda t: (None, {}), "the loss is not callable"),
                         (lambda t: (len, {"a b": len}), "metrics must be a dict"),
                         (lambda t: (len, {"loss": len}), "may not be named 'loss'"),
                         (lambda t: (len, {}), "output_shape is empty")]:
        monkeypatch.setitem(sys.modules, "bad", types.SimpleNamespace(f=made))
        with pytest.raises(UsageError) as e:
            tasks.resolve("bad:f", Target((), "int64", 4), "--data d")
        assert needle in str(e.value)


def _factory(loss, metrics, shape):
    return lambda target: (loss, metrics, shape)


@pytest.mark.parametrize("made,needle", [
    (_factory(lambda out, y: (out.reshape(y.shape) - y).abs().mean(), {}, (3,)),
     "the loss fails on the first batch of --data (out (4, 3), y (4,) float32; out is shaped "
     "by the factory's output_shape): RuntimeError: shape '[4]' is invalid"),
    (_factory(lambda out, y: (out.squeeze(1) - y).abs(), {}, (1,)),
     "the loss must return the batch's mean loss, a floating-point scalar tensor; on the "
     "first batch (out (4, 1), y (4,) float32) it returned shape (4,)"),
    (_factory(lambda out, y: (out.squeeze(1) - y).abs().mean().item(), {}, (1,)),
     "it returned float"),
    (_factory(lambda out, y: y.mean(), {}, (1,)), "the loss does not depend on the model's output"),
    (_factory(lambda out, y: (out.squeeze(1) - y).abs().mean(),
              {"error": lambda out, y: (out.squeeze(1) - y).abs()}, (1,)),
     "metric error returned shape (4,) for a batch of 4 and (1,) for one sample; a metric "
     "returns the sum over the batch"),
    (_factory(lambda out, y: (out.squeeze(1) - y).abs().mean(),
              {"broken": lambda out, y: out.nope}, (1,)),
     "a metric fails on the first batch of --data (out (4, 1), y (4,) float32): "
     "AttributeError"),
], ids=["output-shape-misfits-y", "loss-per-sample", "loss-a-float", "loss-without-gradient",
        "metric-per-sample", "metric-raises"])
def test_a_factorys_task_is_checked_on_the_first_batch(monkeypatch, made, needle):
    """What would fail every rank mid-training is one line before it."""
    monkeypatch.setitem(sys.modules, "mine", types.SimpleNamespace(task=made))
    target = Target((), "float32", 0)
    task = tasks.resolve("mine:task", target, "--data d")
    torch.manual_seed(0)
    model = build_model("mlp", (5,), task.output_shape)
    x, y = torch.randn(4, 5), torch.randn(4)
    with pytest.raises(UsageError) as e:
        tasks.check_on_batch(task, model, x, y, "mine:task")
    assert str(e.value).startswith("--task mine:task: ") and needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_fitting_factory_passes_the_check_and_changes_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "mine", types.SimpleNamespace(task=_factory(
        lambda out, y: (out.squeeze(1) - y).abs().mean(),
        {"hit": lambda out, y: ((out.squeeze(1) - y).abs() < 0.5).sum()}, (1,))))
    task = tasks.resolve("mine:task", Target((), "float32", 0), "--data d")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 5), torch.randn(4)
    rng = torch.get_rng_state()  # dropout draws nothing: the run's stream is untouched
    tasks.check_on_batch(task, model, x, y, "mine:task")
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def documented_task_code() -> str:
    """docs/training.md's own task (mytasks.py), as the docs show it."""
    import os
    import re
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "training.md")
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", open(path).read(), re.S)
               if "# mytasks.py" in b]
    return code


def test_the_documented_task_counts_samples_within_10_percent(monkeypatch):
    """The docs' within_10pct: per sample, as documented (a sample counts once, whatever
    y's shape), and it passes the first-batch check."""
    module = types.ModuleType("mytasks")
    exec(documented_task_code(), module.__dict__)
    monkeypatch.setitem(sys.modules, "mytasks", module)
    target = Target((3,), "float32", 0)
    task = tasks.resolve("mytasks:within_10pct", target, "--data d")
    y = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    out = torch.tensor([[1.05, 2.1, 3.9], [1.05, 2.5, 4.0]])  # all within; one of three
    assert task.metrics(means_over(task, [(out, y)])) == {"within_10pct": 0.5}
    torch.manual_seed(0)
    tasks.check_on_batch(task, build_model("mlp", (2,), task.output_shape), torch.randn(2, 2), y,
                         "mytasks:within_10pct")


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet", "auto"])
@pytest.mark.parametrize("output", [(10,), (3,), (2, 4), (3, 8, 8)])
def test_built_in_models_fit_every_output_shape(model, output):
    net = build_model(model, (1, 8, 8), output)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, *output)


def test_fcn_is_per_pixel_and_auto_picks_it_for_segment():
    net = build_model("fcn", (2, 6, 5), (4, 6, 5))
    assert net(torch.zeros(3, 2, 6, 5)).shape == (3, 4, 6, 5)
    assert build_model("fcn", (2, 6, 5), (6, 5))(torch.zeros(1, 2, 6, 5)).shape == (1, 6, 5)
    assert any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
               for m in build_model("auto", (1, 8, 8), (3, 8, 8)).modules())
    with pytest.raises(UsageError, match="--model fcn outputs a class or value per pixel"):
        build_model("fcn", (10,), (1,))


def test_a_model_whose_output_does_not_fit_is_one_line(monkeypatch):
    def classifier(input_shape, output_shape):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

    def legacy(input_shape, num_classes):  # the form before tasks: gets the class count
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))

    def old_names(shape, classes):  # any name but a shape's: the count too
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, classes))
    monkeypatch.setitem(sys.modules, "mymodels", types.SimpleNamespace(
        classifier=classifier, legacy=legacy, old_names=old_names))
    assert build_model("mymodels:old_names", (1, 8, 8), (5,))(torch.zeros(1, 1, 8, 8)).shape == (1, 5)
    with pytest.raises(UsageError) as e:
        build_model("mymodels:classifier", (1, 8, 8), (3,))
    assert str(e.value) == ("--model mymodels:classifier: outputs shaped (10,) per sample, "
                            "the task needs (3,)")
    assert build_model("mymodels:legacy", (1, 8, 8), (7,))(torch.zeros(1, 1, 8, 8)).shape == (1, 7)
    with pytest.raises(UsageError, match="write it as factory\\(input_shape, output_shape\\)"):
        build_model("mymodels:legacy", (1, 8, 8), (3, 8, 8))
    with pytest.raises(UsageError, match="--model mymodels:classifier: fails on samples shaped"):
        build_model("mymodels:classifier", (2, 8, 8), (10,))


def test_augmentation_is_refused_where_targets_are_per_pixel():
    from hpcaccel.augment import check_targets

    check_targets("shift+flip", (1, 8, 8), ())          # labels: fine
    check_targets("flip", (1, 8, 8), (3,))               # a vector to regress: fine
    check_targets("none", (1, 8, 8), (8, 8))
    for target in ((8, 8), (2, 8, 8)):                   # a class or value per pixel
        with pytest.raises(UsageError, match=r"--augment shift: would shift or flip"):
            check_targets("shift", (1, 8, 8), target)
