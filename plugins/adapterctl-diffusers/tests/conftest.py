"""Shared fixtures: a tiny random Stable Diffusion UNet saved by diffusers."""

from __future__ import annotations

from pathlib import Path

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
