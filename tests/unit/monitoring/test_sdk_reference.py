"""kiln.sdk.save_model(reference=...): the artifact carries profile.json, verified like the
model, built from the reference inputs and the model's own outputs on them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

import numpy as np
import torch
from torch import nn

from kiln.artifact import read_metadata, sha256_file, verify_artifact
from kiln.monitoring.monitor import DriftMonitor
from kiln.monitoring.profile import PROFILE_FILE, build_profile, load_profile

pytestmark = pytest.mark.torch


class TwoInputs(nn.Module):
    """features (FP32, 3 per row) and a per-row INT64 offset -> class logits and a score."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x) + offset.to(torch.float32).unsqueeze(1)
        return y, y.sum(dim=1)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return TwoInputs().eval()


def test_reference_inputs_give_a_verified_profile_of_features_and_predictions(tmp_path: Path, model) -> None:
    from kiln import sdk

    x, offset = torch.randn(5000, 3), torch.randint(0, 3, (5000,))
    path = sdk.save_model(
        model,
        (x[:2], offset[:2]),
        tmp_path / "art",
        input_names=["features", "offset"],
        output_names=["logits", "score"],
        reference=(x, offset),
    )
    meta = verify_artifact(path)
    assert meta.files[PROFILE_FILE] == sha256_file(path / PROFILE_FILE)
    profile = load_profile(path)
    assert profile is not None and profile.rows == 5000
    assert [(i.name, i.shape) for i in profile.inputs] == [("features", [3]), ("offset", [])]
    assert [f.name for f in profile.features] == ["features[0]", "features[1]", "features[2]", "offset[0]"]
    assert profile.features[3].values == [0.0, 1.0, 2.0]
    with torch.no_grad():
        classes = model(x, offset)[0].argmax(1).numpy()
    p = profile.prediction
    assert p is not None and (p.output, p.transform, p.type) == ("logits", "argmax", "categorical")
    assert p.counts == np.bincount(classes, minlength=4)[np.bincount(classes, minlength=4) > 0].tolist()
    # what kiln-serve will do with it: the served batch's tensors fit the profile
    m = DriftMonitor(profile, model="m", version="1")
    m.observe({"features": x[:200].numpy(), "offset": offset[:200].numpy()}, {"logits": np.zeros((200, 4))})
    assert m.snapshot()["skippedBatches"] == 0 and m.compute().window_rows == 200


def test_a_profile_object_is_stored_as_given_and_checked_against_the_signature(tmp_path: Path, model) -> None:
    from kiln import sdk

    x, offset = torch.randn(100, 3), torch.randint(0, 3, (100,))
    with torch.no_grad():
        logits, score = model(x, offset)
    profile = sdk.build_profile(
        {"features": x, "offset": offset},
        {"logits": logits, "score": score},
        feature_names={"features": ["a", "b", "c"], "offset": ["shift"]},
        categorical=["shift"],
        prediction_output="score",
    )
    names = {"input_names": ["features", "offset"], "output_names": ["logits", "score"]}
    path = sdk.save_model(model, (x[:2], offset[:2]), tmp_path / "ok", reference=profile, **names)
    assert load_profile(path) == profile and PROFILE_FILE in read_metadata(path).files

    wrong = build_profile({"features": np.zeros((4, 5))})  # 5 numbers per row, the model takes 3
    with pytest.raises(ValueError, match="does not fit the signature"):
        sdk.save_model(model, (x[:2], offset[:2]), tmp_path / "bad", reference=wrong, **names)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-*"))


def test_without_a_reference_there_is_no_profile(tmp_path: Path, model) -> None:
    from kiln import sdk

    x, offset = torch.randn(4, 3), torch.randint(0, 3, (4,))
    path = sdk.save_model(model, (x, offset), tmp_path / "art")
    assert load_profile(path) is None and PROFILE_FILE not in read_metadata(path).files
