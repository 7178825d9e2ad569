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


def test_list_models_holds_only_buildable_clip_configs():
    """Every open_clip config left out of list_models is one create_model refuses (timm/ResNet towers, Hugging Face
    towers or tokenizers, CoCa); no listed CLIP name is routed to the timm ViT builder."""
    import open_clip

    names = set(list_models())
    assert {"ViT-B-16", "ViT-B-16-quickgelu", "ViT-L-14", "ViT-bigG-14"} <= names
    left_out = [n for n in open_clip.list_models() if n not in names]
    assert {"RN50", "ViT-B-16-SigLIP", "coca_ViT-B-32", "ViT-L-14-CLIPA", "ViT-H-14-worldwide", "EVA02-B-16",
            "convnext_base", "vit_medium_patch16_gap_256", "vit_relpos_medium_patch16_cls_224"} <= set(left_out)
    assert not [n for n in names if n.startswith("vit_")]
    for name in left_out:
        with pytest.raises(ValueError, match=r"fsosr supports|names both a timm ViT and an open_clip"):
            create_model(name)


@pytest.mark.parametrize("name", ["vit_medium_patch16_gap_256", "vit_relpos_medium_patch16_cls_224"])
def test_vit_name_that_is_also_a_clip_config_is_not_silently_a_timm_classifier(name):
    with pytest.raises(ValueError, match=rf"'{name}' names both a timm ViT and an open_clip CLIP config"):
        create_model(name)


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
