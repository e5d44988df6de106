"""Shared fixtures: a tiny random Stable Diffusion UNet saved by diffusers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD-shaped UNet saved by diffusers (config.json +
    diffusion_pytorch_model.safetensors): 32/64 channels, one cross-attention block each way,
    cross-attention width 32."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("sd") / "unet"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def diffusers_fuse() -> Callable[[Path, Path], Any]:
    """``fuse(unet_folder, lora_file, before=None)``: the UNet diffusers loads from the folder
    with the file applied by its pipeline LoRA loading (``load_lora_weights``), then fused
    into its weights (``fuse_lora``) and unloaded. ``before(model)`` runs with the LoRA layers
    still in place."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class Loader(StableDiffusionLoraLoaderMixin):  # a pipeline's LoRA loading, UNet only
        hf_device_map = None

        def __init__(self, model: object) -> None:
            self.unet, self.text_encoder = model, None

        @property
        def components(self) -> dict[str, object]:
            return {"unet": self.unet}

    def fuse(folder: Path, lora: Path, before: Callable[[Any], None] | None = None) -> Any:
        model = diffusers.UNet2DConditionModel.from_pretrained(folder)
        loader = Loader(model)
        loader.load_lora_weights(str(lora))
        if before is not None:
            before(model)  # e.g. run the model with the LoRA layers still in place
        loader.fuse_lora()
        loader.unload_lora_weights()
        return model

    return fuse
