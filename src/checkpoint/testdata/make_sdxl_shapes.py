"""Keys and shapes of a full-size SDXL base 1.0 checkpoint in Stability-AI's (sgm) single-file
layout (and the diffusers keys they map to), for the architecture-inference tests. Models are
built on the meta device from SDXL base's configs, so nothing is allocated; the sgm conversion
is the SDXL fixture script's (make_sdxl_fixtures.py), which diffusers' from_single_file verified.
Run from the repository root with the shared torch venv (diffusers, transformers, peft)."""
import gzip
import json
import sys

import torch

sys.path.insert(0, "tests/fixtures")
import make_fixtures as mf  # noqa: E402
import make_sdxl_fixtures as xl  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402


def shapes(sd):
    return {k: list(v.shape) for k, v in sd.items()}


def text_config(hidden, layers, heads, intermediate, act, projection_dim):
    return CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=intermediate, hidden_act=act, projection_dim=projection_dim,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)


with torch.device("meta"):
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, vae/config.json, text_encoder*/config.json
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10],
        attention_head_dim=[5, 10, 20],
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=1024,
                        scaling_factor=0.13025)
    te1 = CLIPTextModel(text_config(768, 12, 12, 3072, "quick_gelu", 768))
    te2 = CLIPTextModelWithProjection(text_config(1280, 32, 20, 5120, "gelu", 1280))
    sgm = {}
    sgm.update(xl.unet_to_sgm(unet.state_dict(), dict(unet.config)))
    sgm.update(mf.vae_to_ldm(vae.state_dict(), dict(vae.config)))
    sgm.update(xl.te1_to_sgm(te1.state_dict()))
    sgm.update(xl.te2_to_openclip(te2.state_dict(), 32))


def text_keys(sd):
    return sorted(k[len("text_model."):] if k.startswith("text_model.") else k for k in sd if not k.endswith("position_ids"))


out = {
    "sdxl": shapes(sgm),
    "sdxl_diffusers": {
        "unet": sorted(unet.state_dict()),
        "vae": sorted(vae.state_dict()),
        "text_encoder": text_keys(te1.state_dict()),
        "text_encoder_2": text_keys(te2.state_dict()),
    },
}
print("sdxl", len(sgm))
data = json.dumps(out, sort_keys=True, separators=(",", ":")).encode()
open("src/checkpoint/testdata/sdxl_shapes.json.gz", "wb").write(gzip.compress(data, 9, mtime=0))
print(len(data))
