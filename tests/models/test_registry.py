"""fsosr.models.create_model dispatches by name to the right builder; unknown names fail clearly."""
import pytest
import torch

from fsosr.models import (AdapterViT, AlexNetFeatures, ClipBackbone, ResNet12, create_model, list_models)
from fsosr.models.checkpoint import load_state_dict_file
from fsosr.models.vit import TINY_VIT_KWARGS


def test_create_model_dispatch():
    assert isinstance(create_model("fsosr-tiny"), ClipBackbone)
    assert isinstance(create_model("vit_base_patch16_224", **TINY_VIT_KWARGS), AdapterViT)
    assert isinstance(create_model("resnet12"), ResNet12)
    assert isinstance(create_model("alexnet"), AlexNetFeatures)
    names = list_models()
    assert {"fsosr-tiny", "ViT-B-16", "resnet12", "alexnet"} <= set(names)


def test_unknown_name_and_bad_options():
    with pytest.raises(ValueError, match="unknown CLIP model 'resnet50x'"):
        create_model("resnet50x")
    with pytest.raises(TypeError, match="alexnet takes no options"):
        create_model("alexnet", precision="bf16")


def test_dnpg_phase2_layout_is_unwrapped(tmp_path):
    state = {"conv.weight": torch.ones(2, 2)}
    torch.save({"feature_params": state, "RPL_params": {"w": torch.zeros(1)}}, tmp_path / "phase2.pth")
    assert torch.equal(load_state_dict_file(tmp_path / "phase2.pth")["conv.weight"], state["conv.weight"])


def test_saved_weights_get_the_usual_permissions(tmp_path):
    import os
    from fsosr.models.checkpoint import save_state_dict
    umask = os.umask(0o022)
    try:
        path = save_state_dict({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
