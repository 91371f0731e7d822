"""Accuracy in percent (nn/metrics.py) and the batch evaluation built on it (nn/evaluation.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nas.nn.evaluation import evaluate
from lightning_nas.nn.metrics import PercentAccuracy, percent_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def logits_and_labels(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[: n // 2, :] += 3.0 * F.one_hot(labels[: n // 2], classes)  # about half right: not a trivial share
    return logits, labels


def test_batch_accuracy_is_the_percent_share_of_rows_with_the_label_in_their_top_k() -> None:
    logits, labels = logits_and_labels(53, 10, 0)
    correct = int((logits.argmax(1) == labels).sum())
    assert 0 < correct < 53
    assert percent_accuracy(logits, labels).item() == pytest.approx(100 * correct / 53, rel=1e-6)
    in_top5 = int((logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum())
    assert in_top5 > correct
    assert percent_accuracy(logits, labels, top_k=5).item() == pytest.approx(100 * in_top5 / 53, rel=1e-6)
    # predicted class indices instead of logits
    assert percent_accuracy(logits.argmax(1), labels, num_classes=10).item() == pytest.approx(100 * correct / 53)
    with pytest.raises(ValueError, match="need num_classes"):
        percent_accuracy(logits.argmax(1), labels)


def test_accumulated_accuracy_is_correct_rows_over_all_rows_not_a_mean_of_batch_shares() -> None:
    logits, labels = logits_and_labels(70, 7, 1)
    sizes = [3, 50, 17]  # uneven batches: a mean of batch shares would weigh the 3 rows like the 50
    metric = PercentAccuracy(num_classes=7)
    shares = []
    for x, y in zip(logits.split(sizes), labels.split(sizes)):
        shares.append(metric(x, y).item())  # forward: this batch's accuracy, and accumulated
        assert shares[-1] == pytest.approx(percent_accuracy(x, y).item())
    overall = 100 * int((logits.argmax(1) == labels).sum()) / 70
    assert metric.compute().item() == pytest.approx(overall, rel=1e-6)
    assert sum(shares) / 3 != pytest.approx(overall, rel=1e-3)
    metric.reset()
    metric.update(logits[:10], labels[:10])
    assert metric.compute().item() == pytest.approx(percent_accuracy(logits[:10], labels[:10]).item())
    top3 = PercentAccuracy(num_classes=7, top_k=3)
    top3.update(logits, labels)
    assert top3.compute().item() == pytest.approx(percent_accuracy(logits, labels, top_k=3).item())


def test_evaluate_gives_percent_top1_and_mean_cross_entropy_over_uneven_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Dropout(0.5)).train()
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(41, 3, 2, 2, generator=g), torch.randint(0, 5, (41,), generator=g)
    batches = list(zip(images.split([16, 16, 9]), labels.split([16, 16, 9])))
    top1, loss = evaluate(model, iter(batches))  # a generator is enough: one pass
    assert not model.training  # evaluated without dropout
    with torch.no_grad():
        logits = model(images)
    assert top1 == pytest.approx(100 * int((logits.argmax(1) == labels).sum()) / 41, rel=1e-6)
    assert loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate(model, [])
