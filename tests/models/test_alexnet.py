"""fsosr.models.alexnet: DDAS's sigmoid(AlexNet conv5) feature, from a local torchvision weight file."""
import pytest
import torch
from torch import nn
from torchvision.models import alexnet

from fsosr.models.alexnet import ALEXNET_FEATURE_DIM, ALEXNET_WEIGHTS_FILE, build_alexnet_features
from fsosr.models.checkpoint import CheckpointMismatchError


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A random-init torchvision AlexNet and its full state dict saved under torchvision's published file name."""
    torch.manual_seed(0)
    reference = alexnet(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / ALEXNET_WEIGHTS_FILE
    torch.save(reference.state_dict(), path)
    return reference, path


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_feature_equals_torchvision_slice_plus_sigmoid(published, images):
    reference, path = published
    extractor = build_alexnet_features(path)
    with torch.no_grad():
        features = extractor(images)
        expected = torch.sigmoid(reference.features[:-2](images)).flatten(1)
    assert features.shape == (2, ALEXNET_FEATURE_DIM) == (2, 43_264)
    assert torch.equal(features, expected)
    # DDAS's slice ends at conv5 before its ReLU, so the sigmoid also sees negative values
    assert features.min() < 0.5 < features.max() and features.min() > 0 and features.max() < 1


def test_frozen_and_always_in_eval(published, images):
    extractor = build_alexnet_features(published[1])
    assert not any(p.requires_grad for p in extractor.parameters())
    parent = nn.ModuleDict({"ddas": extractor, "head": nn.Linear(2, 2)}).train()
    assert parent["head"].training
    assert not any(m.training for m in extractor.modules())
    features = extractor(images[:1].requires_grad_(False))
    assert not features.requires_grad


def test_file_without_classifier_loads(tmp_path, published, images):
    reference, _ = published
    path = tmp_path / "alexnet_features.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if k.startswith("features.")}, path)
    with torch.no_grad():
        assert torch.equal(build_alexnet_features(path)(images[:1]),
                           torch.sigmoid(reference.features[:-2](images[:1])).flatten(1))


def test_missing_file_names_path_and_model(tmp_path):
    missing = tmp_path / ALEXNET_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError) as info:
        build_alexnet_features(missing)
    assert str(missing) in str(info.value) and "AlexNet" in str(info.value)


def test_wrong_architecture_is_a_mismatch_naming_the_file(tmp_path):
    path = tmp_path / "vgg_like.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64)}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        build_alexnet_features(path)
    message = str(info.value)
    assert str(path) in message and "AlexNet" in message and "features.0.weight" in message
    assert "missing" in message  # conv2..conv5 are not in the file
