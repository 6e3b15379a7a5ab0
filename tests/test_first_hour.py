"""Issue 29, what a new user trips over: silent random weights, and other surprises."""

from __future__ import annotations

import pytest

from evagraph.io import load_model


def test_a_timm_name_without_checkpoint_warns_that_weights_are_random():
    pytest.importorskip("timm")
    with pytest.warns(UserWarning, match="resnet18 has no --checkpoint .*random initialisation"):
        model, kind = load_model("resnet18")
    assert kind == "timm"
