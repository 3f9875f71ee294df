#!/usr/bin/env python3
"""Pretrain the tiny model `dreambooth demo` teaches a new subject (assets/demo-model/).

Run by hand, never in CI (CI has no diffusers; the demo only reads the committed files),
from the repository root, with the shared torch venv plus diffusers 0.42.1:

    ./dev demo --dir /tmp/demo          # writes /tmp/demo/model: our random CLIP and its tokenizer
    OMP_NUM_THREADS=1 $(scripts/torch-venv.sh)/bin/python scripts/pretrain_demo_model.py /tmp/demo/model

It rewrites assets/demo-model/{unet,vae,scheduler}/, which src/demo/pretrained.rs builds into
the binary (rebuild after it), and draws a contact sheet of samples to --sheet for eyes.

What it makes: the UNet of the demo's layout (src/demo/mod.rs `demo_configs`: [32, 64], one
layer a block, head dim 8, cross-attention 64) trained as Stable Diffusion 2 is (v-prediction,
SD's scaled-linear DDPM schedule, 10 % of captions dropped so guidance works) on drawn 64x64
captioned pictures: "a <colour> <circle|square|triangle> on a <colour> background", six
colours, sizes and places near the middle varied. Never a cross: the demo's subject.
The text encoder is the demo's deterministic random CLIP, frozen, exactly as Rust writes it
from its seed (the demo rebuilds it; its CRC-32 is stored in the UNet file's metadata and
checked by tests/demo.rs). The VAE is tests/fixtures/models/trained-vae (made by
tests/fixtures/make_trained_vae.py for reconstruction of drawn pictures), copied.
Both are written in float16 (the loader upcasts them to float32 for training).

The committed files come from one run with the defaults (1,600 steps of 8 pictures, AdamW at
2e-3 with warm-up and a cosine decay, EMA 0.99 of the weights): 679 s on one thread of a
2-core VM that other builds kept busy (about 0.25 s a step when the machine was quiet, some 7
minutes in all). The loss (v-prediction MSE) went from 1.29 to 0.074. Its samples draw the
asked-for colours as round blobs (squares and triangles come out rounded) and fail on white
and black, which the VAE reconstructs poorly; "a yellow sks on a blue background" is a yellow
blob on blue, what the demo starts from.
"""

import argparse
import json
import math
import os
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

import diffusers  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "assets" / "demo-model"
TRAINED_VAE = ROOT / "tests" / "fixtures" / "models" / "trained-vae"
SIZE = 64

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (30, 60, 200),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ["circle", "square", "triangle"]

# The demo folder's scheduler config (SD 1.x's) with v-prediction: an epsilon model this
# small and this briefly trained predicts the noise too roughly at high noise levels,
# where x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies its error by up to 14, and
# draws coloured noise; a v model's x0 there is its own prediction and comes out whole.
SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

DATA_SEED = 20261201
INIT_SEED = 20261202
NOISE_SEED = 20261203

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


def log(*a):
    print(*a, flush=True)


def shape_mask(shape, cx, cy, r, angle=0.0):
    """A 0/1 mask (H, W) of a shape centred at (cx, cy) whose size is about r."""
    if shape == "circle":
        return (_XX - cx) ** 2 + (_YY - cy) ** 2 < r * r
    if shape == "square":
        u = (_XX - cx) * math.cos(angle) + (_YY - cy) * math.sin(angle)
        v = -(_XX - cx) * math.sin(angle) + (_YY - cy) * math.cos(angle)
        return (np.abs(u) < r * 0.85) & (np.abs(v) < r * 0.85)
    if shape == "triangle":  # pointing up, turned by angle
        inside = np.ones_like(_XX, dtype=bool)
        pts = [(cx + 1.15 * r * math.sin(angle + k * 2 * math.pi / 3), cy - 1.15 * r * math.cos(angle + k * 2 * math.pi / 3)) for k in range(3)]
        for i in range(3):
            (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % 3]
            inside &= (x1 - x0) * (_YY - y0) - (y1 - y0) * (_XX - x0) >= 0
        return inside
    raise ValueError(shape)


def draw(rng):
    """One captioned picture: (H, W, 3) uint8 and its caption."""
    fg, bg = rng.choice(list(COLOURS), size=2, replace=False)
    shape = SHAPES[rng.integers(0, len(SHAPES))]
    r = rng.uniform(14.0, 22.0)
    cx, cy = rng.uniform(26.0, SIZE - 26.0, size=2)  # near the middle: an easier set to learn in minutes
    angle = rng.uniform(-0.3, 0.3)
    m = shape_mask(shape, cx, cy, r, angle)[..., None]
    img = np.where(m, COLOURS[fg], COLOURS[bg]).astype(np.float64)
    img += rng.normal(0.0, 3.0, size=img.shape)  # a little grain, as photos have
    return np.clip(np.round(img), 0, 255).astype(np.uint8), f"a {fg} {shape} on a {bg} background"


def to_pixels(imgs):
    return torch.from_numpy((np.stack(imgs).astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy())


def unet_config():
    """The demo UNet's config (src/demo.rs `demo_configs`), as the Rust writer states it."""
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[32, 64],
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=64,
        norm_num_groups=32,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo_model", type=Path, help="the folder `dreambooth demo` writes (DIR/model): the random CLIP to train against")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--pictures", type=int, default=3000, help="the drawn set, encoded once")
    ap.add_argument("--drop-caption", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--sheet", type=Path, default=Path("/tmp/demo-model-samples.png"), help="a contact sheet of samples, for eyes")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {args.threads} threads")
    started = time.time()

    te_file = args.demo_model / "text_encoder" / "model.safetensors"
    te_crc = zlib.crc32(te_file.read_bytes())
    tokenizer = CLIPTokenizer.from_pretrained(args.demo_model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.demo_model / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(TRAINED_VAE).eval()
    scaling = vae.config.scaling_factor
    log(f"text encoder {te_file} crc32 {te_crc:08x}; VAE scaling_factor {scaling}")

    def encode_text(prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return text_encoder(ids)[0]

    # The drawn set: pictures encoded once (posterior mean and std), captions embedded once.
    rng = np.random.default_rng(DATA_SEED)
    drawn = [draw(rng) for _ in range(args.pictures)]
    captions = sorted({c for _, c in drawn})
    caption_index = {c: i for i, c in enumerate(captions)}
    embeddings = encode_text(captions + [""])
    empty = len(captions)
    labels = torch.tensor([caption_index[c] for _, c in drawn])
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(drawn), 100):
            dist = vae.encode(to_pixels([p for p, _ in drawn[i : i + 100]])).latent_dist
            means.append(dist.mean * scaling)
            stds.append(dist.std * scaling)
    means, stds = torch.cat(means), torch.cat(stds)
    log(f"{len(drawn)} pictures, {len(captions)} captions, encoded in {time.time() - started:.0f} s; scaled latents std {means.std().item():.3f}")

    torch.manual_seed(INIT_SEED)
    unet = UNet2DConditionModel(**unet_config())
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    log(f"UNet: {sum(p.numel() for p in unet.parameters())} parameters")
    ddpm = DDPMScheduler.from_config(SCHEDULER)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(NOISE_SEED)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    unet.train()
    running = None
    train_started = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, len(drawn), (args.batch,), generator=gen)
        latents = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        which = labels[idx].clone()
        which[torch.rand(args.batch, generator=gen) < args.drop_caption] = empty
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        pred = unet(ddpm.add_noise(latents, noise, t), t, embeddings[which]).sample
        loss = (pred - ddpm.get_velocity(latents, noise, t)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (step + 1) / (step + 10))
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            log(f"step {step:5d}  loss {running:.4f}  lr {lr_at(step):.2e}  {time.time() - train_started:6.1f} s")
    unet.load_state_dict(ema)
    unet.eval()

    # Written as the Rust loader reads a diffusers folder: config.json + fp16 safetensors.
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model, extra in [("unet", unet, {"text_encoder_crc32": f"{te_crc:08x}"}), ("vae", vae, {})]:
        d = args.out / name
        d.mkdir(exist_ok=True)
        config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
        config = {"_class_name": type(model).__name__, "_diffusers_version": diffusers.__version__, **config}
        (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        save_file(state, d / "diffusion_pytorch_model.safetensors", metadata={"format": "pt", **extra})
        log(f"wrote {d} ({(d / 'diffusion_pytorch_model.safetensors').stat().st_size} bytes)")

    (args.out / "scheduler").mkdir(exist_ok=True)
    (args.out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2, sort_keys=True) + "\n")

    # For eyes: what the float16 model draws (DDIM, 12 steps, guidance 3, as the demo samples).
    unet16 = UNet2DConditionModel.from_pretrained(args.out / "unet", torch_dtype=torch.float32)
    vae16 = AutoencoderKL.from_pretrained(args.out / "vae", torch_dtype=torch.float32)
    ddim = DDIMScheduler.from_config(SCHEDULER)
    prompts = ["a yellow circle on a blue background", "a red square on a green background", "a white triangle on a black background",
               "a black circle on a white background", "a yellow sks on a blue background", "a yellow cross on a blue background"]
    rows = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((len(prompts), 4, 16, 16), generator=g)
        cond, uncond = encode_text(prompts), encode_text([""] * len(prompts))
        ddim.set_timesteps(12)
        with torch.no_grad():
            for t in ddim.timesteps:
                e = unet16(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
                eu, ec = e.chunk(2)
                x = ddim.step(eu + 3.0 * (ec - eu), t, x).prev_sample
            img = vae16.decode(x / scaling).sample
        rows.append(torch.cat(list(img), dim=2))
    grid = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    from PIL import Image

    Image.fromarray(grid).save(args.sheet)
    log(f"samples of {prompts} (columns), seeds 0-2 (rows): {args.sheet}")
    log(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
