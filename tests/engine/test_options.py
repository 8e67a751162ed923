"""DiceOptions: a frozen dataclass that round-trips through JSON values."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import dicekern as dk


@pytest.mark.parametrize("options", [
    pytest.param(dk.DiceOptions(), id="defaults"),
    pytest.param(dk.DiceOptions(q=torch.tensor([0.2, 0.3, 0.5]), curvature="ggn", order=2, backend="torch"), id="q-ggn-order2"),
    pytest.param(dk.DiceOptions(curvature="none", curvature_at="receiver", direct="paper", backend="closed_form"), id="paper"),
])
def test_options_round_trip_through_json(options: dk.DiceOptions) -> None:
    restored = dk.DiceOptions.from_dict(json.loads(json.dumps(options.to_dict())))
    assert restored.to_dict() == options.to_dict()
    assert (restored.q is None) == (options.q is None)
    if options.q is not None:
        assert torch.equal(restored.q, options.q.double())


def test_options_from_a_dict_are_checked_like_any_options() -> None:
    with pytest.raises(TypeError, match="unknown option\\(s\\) \\['curvatur'\\]"):
        dk.DiceOptions.from_dict({"curvatur": "ggn"})
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        dk.DiceOptions.from_dict({"order": 3})
    with pytest.raises(ValueError, match="q must sum to 1"):
        dk.DiceOptions.from_dict({"q": [0.5, 0.6]})
    with pytest.raises(TypeError, match="options must be a mapping"):
        dk.DiceOptions.from_dict([("order", 2)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        dk.DiceOptions().order = 2

