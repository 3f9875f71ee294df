"""Writes a diffusers folder with Stable Diffusion 1.5's shapes and random weights.

Memory and speed do not depend on the weights' values, so GPU measurements can
use this instead of the real checkpoint (which cannot be downloaded there).
Configs are those of runwayml/stable-diffusion-v1-5; the tokenizer folder is
copied from the fixture model (same CLIP vocabulary format).

    python benches/make_sd15_shapes.py --out /tmp/sd15-shapes [--dtype fp16]
"""
import argparse
import json
import os
import shutil

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "models", "tiny-sd1", "tokenizer")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
)
SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "prediction_type": "epsilon", "clip_sample": False,
}


def build(out, unet_cfg, vae_cfg, text_cfg, dtype=torch.float32, seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    UNet2DConditionModel(**unet_cfg).to(dtype).save_pretrained(os.path.join(out, "unet"))
    AutoencoderKL(**vae_cfg).to(dtype).save_pretrained(os.path.join(out, "vae"))
    CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype).save_pretrained(os.path.join(out, "text_encoder"))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2)
    shutil.copytree(TOKENIZER, os.path.join(out, "tokenizer"), dirs_exist_ok=True)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump({
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
        }, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    a = ap.parse_args()
    build(a.out, SD15_UNET, SD15_VAE, SD15_TEXT, torch.float16 if a.dtype == "fp16" else torch.float32)
    print(a.out)


if __name__ == "__main__":
    main()
