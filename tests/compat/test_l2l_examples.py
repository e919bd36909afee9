"""learn2learn's own example scripts, shortened, with only the import line changed.

``examples/maml_sine.py`` and ``examples/vision/maml_omniglot.py`` of learn2learn, rewritten
here with the same calls in the same order: the only edits are the import
(``import metagrad.compat.learn2learn as l2l``), fewer iterations and tasks, CPU, a temporary
data folder, and (for the sine script, whose data comes from torchmeta) a small stand-in for
torchmeta's ``Sinusoid`` + ``BatchMetaDataLoader`` that yields batches of the same shape.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from mg_l2l_fixtures import SineModel  # maml_sine.py's model, as written there
from torch import nn, optim

import metagrad.compat.learn2learn as l2l  # was: import learn2learn as l2l


# -- examples/maml_sine.py ---------------------------------------------------------------------
def sinusoid_batches(samples: int, tasks: int, batch_size: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """torchmeta's Sinusoid through BatchMetaDataLoader: (inputs, targets), [B, samples, 1]."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(tasks // batch_size):
        amp = torch.empty(batch_size, 1, 1, dtype=torch.float64).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(batch_size, 1, 1, dtype=torch.float64).uniform_(0, math.pi, generator=g)
        x = torch.empty(batch_size, samples, 1, dtype=torch.float64).uniform_(-5, 5, generator=g)
        yield x, amp * torch.sin(x - phase)


def sine_main(
    shots: int = 10,
    tasks_per_batch: int = 16,
    num_tasks: int = 160,
    adapt_lr: float = 0.01,
    meta_lr: float = 0.001,
    adapt_steps: int = 5,
    hidden_dim: int = 32,
) -> list[float]:
    dataloader = sinusoid_batches(2 * shots, num_tasks, tasks_per_batch)
    model = SineModel(dim=hidden_dim)
    maml = l2l.algorithms.MAML(model, lr=adapt_lr, first_order=False, allow_unused=True)
    opt = optim.Adam(maml.parameters(), meta_lr)
    lossfn = nn.MSELoss(reduction="mean")
    history = []
    for _iter, batch in enumerate(dataloader):
        meta_train_loss = 0.0
        effective_batch_size = batch[0].shape[0]
        for i in range(effective_batch_size):
            learner = maml.clone()
            train_inputs, train_targets = batch[0][i].float(), batch[1][i].float()
            x_support, y_support = train_inputs[::2], train_targets[::2]
            x_query, y_query = train_inputs[1::2], train_targets[1::2]
            for _ in range(adapt_steps):
                support_loss = lossfn(learner(x_support), y_support)
                learner.adapt(support_loss)
            meta_train_loss += lossfn(learner(x_query), y_query)
        meta_train_loss = meta_train_loss / effective_batch_size
        history.append(meta_train_loss.item())  # type: ignore[union-attr]
        opt.zero_grad()
        meta_train_loss.backward()  # type: ignore[union-attr]
        opt.step()
    return history


def test_maml_sine_example_runs_and_learns() -> None:
    torch.manual_seed(0)
    history = sine_main(num_tasks=16 * 30, adapt_steps=2)
    assert len(history) == 30 and all(math.isfinite(v) for v in history)
    assert np.mean(history[-10:]) < np.mean(history[:10])


# -- examples/vision/maml_omniglot.py ----------------------------------------------------------
def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    predictions = predictions.argmax(dim=1).view(targets.shape)
    return (predictions == targets).sum().float() / targets.size(0)


def fast_adapt(batch, learner, loss, adaptation_steps, shots, ways, device):  # type: ignore[no-untyped-def]
    data, labels = batch
    data, labels = data.to(device), labels.to(device)
    # Separate data into adaptation/evaluation sets
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    adaptation_data, adaptation_labels = data[adaptation_indices], labels[adaptation_indices]
    evaluation_data, evaluation_labels = data[evaluation_indices], labels[evaluation_indices]
    for _step in range(adaptation_steps):
        train_error = loss(learner(adaptation_data), adaptation_labels)
        learner.adapt(train_error)
    predictions = learner(evaluation_data)
    valid_error = loss(predictions, evaluation_labels)
    valid_accuracy = accuracy(predictions, evaluation_labels)
    return valid_error, valid_accuracy


def omniglot_main(  # type: ignore[no-untyped-def]
    root,
    ways=5,
    shots=1,
    meta_lr=0.003,
    fast_lr=0.5,
    meta_batch_size=4,
    adaptation_steps=1,
    num_iterations=3,
    cuda=False,
    seed=42,
):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cpu")
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "omniglot",
        train_ways=ways,
        train_samples=2 * shots,
        test_ways=ways,
        test_samples=2 * shots,
        num_tasks=20000,
        root=root,
    )
    model = l2l.vision.models.OmniglotFC(28**2, ways)
    model.to(device)
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = optim.Adam(maml.parameters(), meta_lr)
    loss = nn.CrossEntropyLoss(reduction="mean")
    log = []
    for _iteration in range(num_iterations):
        opt.zero_grad()
        meta_train_error = meta_train_accuracy = 0.0
        meta_valid_error = meta_valid_accuracy = 0.0
        for _task in range(meta_batch_size):
            learner = maml.clone()
            batch = tasksets.train.sample()
            evaluation_error, evaluation_accuracy = fast_adapt(
                batch, learner, loss, adaptation_steps, shots, ways, device
            )
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            meta_train_accuracy += evaluation_accuracy.item()
            learner = maml.clone()
            batch = tasksets.validation.sample()
            evaluation_error, evaluation_accuracy = fast_adapt(
                batch, learner, loss, adaptation_steps, shots, ways, device
            )
            meta_valid_error += evaluation_error.item()
            meta_valid_accuracy += evaluation_accuracy.item()
        log.append((meta_train_error / meta_batch_size, meta_valid_accuracy / meta_batch_size))
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()
    meta_test_error = meta_test_accuracy = 0.0
    for _task in range(meta_batch_size):
        learner = maml.clone()
        batch = tasksets.test.sample()
        evaluation_error, evaluation_accuracy = fast_adapt(
            batch, learner, loss, adaptation_steps, shots, ways, device
        )
        meta_test_error += evaluation_error.item()
        meta_test_accuracy += evaluation_accuracy.item()
    return log, meta_test_error / meta_batch_size, meta_test_accuracy / meta_batch_size


def test_maml_omniglot_example_runs(omniglot_root: Path) -> None:
    log, test_error, test_accuracy = omniglot_main(str(omniglot_root))
    assert len(log) == 3
    assert all(math.isfinite(e) and 0.0 <= a <= 1.0 for e, a in log)
    assert math.isfinite(test_error) and 0.0 <= test_accuracy <= 1.0


def test_maml_omniglot_example_is_reproducible(omniglot_root: Path) -> None:
    # Same seed, same tasks and the same numbers: the script's random.seed drives the sampling.
    a = omniglot_main(str(omniglot_root), num_iterations=1, meta_batch_size=2)
    b = omniglot_main(str(omniglot_root), num_iterations=1, meta_batch_size=2)
    assert a == b
