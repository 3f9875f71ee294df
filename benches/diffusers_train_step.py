"""diffusers' DreamBooth training step, timed and measured: the reference our
`dreambooth bench` is compared with.

The step is the one in diffusers' examples/dreambooth/train_dreambooth.py: the
VAE encodes the images (or latents cached once, VAE then off the device), ×
scaling factor; noise; random timesteps; scheduler.add_noise; the text
encoder's hidden states; the UNet's prediction; MSE against the noise (or the
velocity for v-prediction); backward; torch.optim.AdamW step;
zero_grad(set_to_none=True). Trained weights are float32; under mixed precision
the frozen VAE and text encoder are stored in the half dtype and the step runs
under torch.autocast, as accelerate does. fp16 uses a GradScaler.

Prints one JSON line: {"steps_per_s", "peak_mem_bytes", "peak_kind", ...}.
peak_mem_bytes is torch.cuda.max_memory_allocated on CUDA (the caching
allocator's peak, the figure the VRAM estimator predicts) and the process's peak
RSS on the CPU (ru_maxrss; it includes the Python runtime and the weights).

    python benches/diffusers_train_step.py --model DIR [--resolution 512] [--batch 1]
        [--precision no|fp16|bf16] [--device cpu|cuda] [--steps 5] [--warmup 2]
        [--attention default|sdpa] [--gradient-checkpointing] [--optimizer adamw|adamw_8bit]
        [--lora-rank N] [--train-text-encoder] [--no-cache-latents] [--threads N]
        [--pre-compute-text-embeddings]
"""
import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a diffusers model folder")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", choices=["no", "fp16", "bf16"], default="no")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--attention", choices=["default", "sdpa"], default="sdpa",
                    help="default: explicit softmax (AttnProcessor); sdpa: AttnProcessor2_0")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--optimizer", choices=["adamw", "adamw_8bit"], default="adamw")
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters (peft) instead of the UNet")
    ap.add_argument("--train-text-encoder", action="store_true")
    ap.add_argument("--no-cache-latents", action="store_true", help="encode with the VAE every step")
    ap.add_argument("--pre-compute-text-embeddings", action="store_true",
                    help="encode the prompt once before training, as train_dreambooth.py's flag of that name "
                         "(our trainer does this whenever the text encoder is frozen)")
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main():
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.precision]
    torch.manual_seed(a.seed)

    tokenizer = CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
    unet.set_attn_processor(AttnProcessor() if a.attention == "default" else AttnProcessor2_0())
    vae.requires_grad_(False)
    if not a.train_text_encoder:
        text_encoder.requires_grad_(False)

    if a.lora_rank:
        from peft import LoraConfig
        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=a.lora_rank, lora_alpha=a.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.to(device)
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if a.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    text_encoder.to(device, dtype=torch.float32 if a.train_text_encoder else weight_dtype)
    vae.to(device, dtype=weight_dtype)

    params = [p for p in unet.parameters() if p.requires_grad]
    if a.train_text_encoder:
        params += [p for p in text_encoder.parameters() if p.requires_grad]
    if a.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # only where it is installed
        optimizer = bnb.optim.AdamW8bit(params, lr=a.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    else:
        optimizer = torch.optim.AdamW(params, lr=a.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler(device.type) if a.precision == "fp16" else None

    gen = torch.Generator("cpu").manual_seed(a.seed)
    pixels = (torch.rand(a.batch, 3, a.resolution, a.resolution, generator=gen) * 2 - 1).to(device, weight_dtype)
    ids = tokenizer(["a photo of sks dog"] * a.batch, padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    scaling = vae.config.scaling_factor
    cached = None
    if not a.no_cache_latents:
        with torch.no_grad():
            cached = vae.encode(pixels).latent_dist.sample() * scaling
        vae.to("cpu")  # as cache_latents does: the VAE leaves the device
        if cuda:
            torch.cuda.empty_cache()

    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=a.precision != "no")
    precomputed = None
    if a.pre_compute_text_embeddings:
        if a.train_text_encoder:
            raise SystemExit("--pre-compute-text-embeddings needs a frozen text encoder")
        with torch.no_grad():
            precomputed = text_encoder(ids, return_dict=False)[0]

    def step():
        with autocast:
            if cached is None:
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample() * scaling
            else:
                latents = cached
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            states = precomputed if precomputed is not None else text_encoder(ids, return_dict=False)[0]
            pred = unet(noisy, timesteps, states, return_dict=False)[0]
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    unet.train()
    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = None
    for _ in range(a.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
    print(json.dumps({
        "steps_per_s": a.steps / elapsed,
        "peak_mem_bytes": peak,
        "peak_kind": kind,
        "loss": float(loss.detach()) if loss is not None else None,
        "trained_params": sum(p.numel() for p in params),
        "model": a.model, "resolution": a.resolution, "batch": a.batch, "precision": a.precision,
        "device": str(device), "attention": a.attention, "gradient_checkpointing": a.gradient_checkpointing,
        "optimizer": a.optimizer, "lora_rank": a.lora_rank, "train_text_encoder": a.train_text_encoder,
        "cache_latents": not a.no_cache_latents, "pre_compute_text_embeddings": a.pre_compute_text_embeddings,
        "steps": a.steps, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
