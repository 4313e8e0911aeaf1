"""The small helpers both training tracks share: run length / progress, the head loss's class weights, the plain
kwargs check, what configure_optimizers returns."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from wsi_ncmi.data.plain import check_plain_kwargs
from wsi_ncmi.errors import UserError
from wsi_ncmi.training.head_loss import balanced_weights, build_head_loss, check_class_weights
from wsi_ncmi.training.optim import build_scheduler, per_step
from wsi_ncmi.training.progress import run_length, training_progress


class Oops(UserError):
    pass


def _trainer(max_epochs, steps=12, batches=4.0):
    return types.SimpleNamespace(max_epochs=max_epochs, estimated_stepping_batches=steps,
                                 num_training_batches=batches)


def test_run_length_and_progress() -> None:
    assert run_length(None) == (1, 1)
    assert run_length(_trainer(3)) == (12, 3)
    assert run_length(_trainer(-1)) == (12, 1) and run_length(_trainer(None)) == (12, 1)
    assert training_progress(_trainer(3), current_epoch=1, global_step=0, batch_idx=2) == pytest.approx(1.5 / 3)
    assert training_progress(_trainer(-1), current_epoch=0, global_step=6, batch_idx=0) == 0.5  # by steps
    assert training_progress(_trainer(2), current_epoch=5, global_step=0, batch_idx=0) == 1.0  # clamped


def test_balanced_weights_and_their_refusals() -> None:
    w, counts = balanced_weights(np.array([0, 0, 0, 1]), 2, Oops)
    assert counts.tolist() == [3, 1] and torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))
    with pytest.raises(Oops, match=r"no bag of class\(es\) \[2\]"):
        balanced_weights(np.array([0, 1]), 3, Oops)
    with pytest.raises(Oops, match="class_weights has 1 entries for num_classes=2"):
        check_class_weights([1.0], 2, "head", Oops)
    with pytest.raises(Oops, match="only supported with objective='head'"):
        check_class_weights("balanced", 2, "ncmi", Oops)
    loss = build_head_loss("ce", None, [1.0, 3.0], 2, Oops)
    assert loss.weight.tolist() == [1.0, 3.0]
    with pytest.raises(Oops, match="works on embeddings"):
        build_head_loss("supcon", None, None, 2, Oops)


def test_check_plain_kwargs_raises_the_callers_error_naming_the_option() -> None:
    check_plain_kwargs({"a": {"x": 1}, "b": None}, "M: ", Oops)
    with pytest.raises(Oops, match="M: b.class_path"):
        check_plain_kwargs({"a": None, "b": {"class_path": "os.system"}}, "M: ", Oops)


def test_per_step_returns_the_optimizer_alone_without_a_scheduler() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert per_step(opt, None) is opt
    sched = build_scheduler("cosine", opt, 10)
    assert per_step(opt, sched) == {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
