"""Writes a diffusers folder with SDXL base 1.0's configs and random weights.

Speed and memory do not depend on the weights' values, so GPU measurements use
this instead of the real checkpoint (which cannot be downloaded there). The
configs are stabilityai/stable-diffusion-xl-base-1.0's (unet, vae, text_encoder,
text_encoder_2, scheduler, model_index.json); the tokenizer folders are copied
from the tiny SDXL fixture (the same CLIP vocabulary; tokenizer_2 pads with "!"
as SDXL's does).

--width W writes a smaller model of the same layout for the CPU: the UNet's
first level has W channels instead of 320 (a multiple of 64; heads stay 64 wide,
so the levels have W/64, 2W/64 and 4W/64 heads), every other width (VAE, both
text encoders, cross-attention, pooled embedding) is scaled by W/320; depths
(2 resnets a level, transformer depths 1, 2, 10, 12 and 32 text-encoder layers)
stay SDXL's. --width 64: a 0.1 B-parameter UNet.

One value differs from the hub's files by default: SDXL base's unet/config.json
says "upcast_attention": null, which diffusers reads as false; false is written
(--hub-config writes the null).

The modules are built on the meta device (nothing allocated or initialised),
then materialised in the target dtype on --device (CUDA when present: the full
size's 3.5 B random numbers take seconds there) and filled: weights
N(0, 1/(3 fan_in)) (the spread of PyTorch's default init), biases 0, norms 1,
embeddings N(0, 0.02²). fp16 on disk by default (as the hub's fp16 files).
Full size: about 7 GB written. Never commit what it writes.

    python benches/make_sdxl_shapes.py --out /tmp/sdxl-shapes [--width 320] [--dtype fp16|fp32] [--device cuda]
"""
import argparse
import json
import math
import os
import shutil
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "models", "tiny-sdxl")

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    use_linear_projection=True, cross_attention_dim=2048, norm_num_groups=32, norm_eps=1e-5,
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    upcast_attention=None,  # the hub's literal null; diffusers reads it as false (see --hub-config)
)
# vae/config.json
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=[128, 256, 512, 512], norm_num_groups=32, act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.13025, force_upcast=True,
)
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP bigG/14)
_TEXT = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, initializer_factor=1.0,
             initializer_range=0.02, attention_dropout=0.0, dropout=0.0, bos_token_id=0, eos_token_id=2,
             pad_token_id=1)
SDXL_TEXT = dict(_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_2 = dict(_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)
# scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
    "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def scaled_configs(width):
    """SDXL's configs with the UNet's first level `width` channels wide (320: SDXL itself)."""
    if width == 320:
        return SDXL_UNET, SDXL_VAE, SDXL_TEXT, SDXL_TEXT_2
    if width % 64 or width <= 0:
        raise SystemExit("--width must be a positive multiple of 64 (heads are 64 wide)")
    f = width / 320

    def mult(x, m):
        return max(m, int(round(x * f / m)) * m)

    channels = [width, 2 * width, 4 * width]
    te1, te2 = mult(768, 64), mult(1280, 64)
    unet = dict(SDXL_UNET, block_out_channels=channels, attention_head_dim=[c // 64 for c in channels],
                cross_attention_dim=te1 + te2,
                projection_class_embeddings_input_dim=te2 + 6 * SDXL_UNET["addition_time_embed_dim"])
    vae = dict(SDXL_VAE, block_out_channels=[mult(c, 32) for c in SDXL_VAE["block_out_channels"]])
    text = dict(SDXL_TEXT, hidden_size=te1, intermediate_size=4 * te1, num_attention_heads=te1 // 64, projection_dim=te1)
    text2 = dict(SDXL_TEXT_2, hidden_size=te2, intermediate_size=4 * te2, num_attention_heads=te2 // 64,
                 projection_dim=te2)
    return unet, vae, text, text2


@torch.no_grad()
def fill(module, dtype, device):
    """Materialises a meta-device module on `device` in `dtype`, random as a fresh init."""
    module.to(dtype)  # still on the meta device: the dtype costs nothing yet
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)  # norms' scales
        elif "embedding" in name and p.dim() == 2 and "linear" not in name:
            p.normal_(0.0, 0.02)  # token and position embeddings
        else:
            fan_in = math.prod(p.shape[1:])
            p.normal_(0.0, 1.0 / math.sqrt(3 * fan_in))
    for name, b in module.named_buffers():
        if name.endswith("position_ids"):
            b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
    return module


def build(out, width=320, dtype=torch.float16, device="cpu", hub_config=False):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg, vae_cfg, text_cfg, text2_cfg = scaled_configs(width)
    if not hub_config:
        unet_cfg = dict(unet_cfg, upcast_attention=False)
    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    counts = {}
    for sub, make in [
        ("unet", lambda: UNet2DConditionModel(**unet_cfg)),
        ("vae", lambda: AutoencoderKL(**vae_cfg)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**text_cfg))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text2_cfg))),
    ]:
        with torch.device("meta"):
            m = make()
        fill(m, dtype, device).to("cpu")  # written from host memory
        counts[sub] = sum(p.numel() for p in m.parameters())
        m.save_pretrained(os.path.join(out, sub), safe_serialization=True, max_shard_size="20GB")
        del m
        if device != "cpu":
            torch.cuda.empty_cache()
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SDXL_SCHEDULER, f, indent=2)
    for tok in ("tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(FIXTURE, tok), os.path.join(out, tok), dirs_exist_ok=True)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f, indent=2)
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=320, help="the UNet's first-level channels (320: SDXL; 64: CPU-sized)")
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the random numbers are drawn")
    ap.add_argument("--hub-config", action="store_true",
                    help="write unet/config.json's upcast_attention as the hub's null (default: false, its meaning)")
    a = ap.parse_args()
    start = time.perf_counter()
    counts = build(a.out, a.width, torch.float16 if a.dtype == "fp16" else torch.float32, a.device, a.hub_config)
    print(json.dumps({"out": a.out, "width": a.width, "dtype": a.dtype, "params": counts,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
