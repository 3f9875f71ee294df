"""diffusers' DreamBooth training step, timed and measured: the reference our
`dreambooth bench` is compared with.

The step is the one in diffusers' examples/dreambooth/train_dreambooth.py
(SD 1.x/2.x) and train_dreambooth_lora_sdxl.py / train_text_to_image_sdxl.py
(SDXL, detected by the folder's text_encoder_2): the VAE encodes the images (or
latents cached once, VAE then off the device), × scaling factor; noise; random
timesteps; scheduler.add_noise; the text encoders' hidden states; the UNet's
prediction; MSE against the noise (or the velocity for v-prediction); backward;
clipping (--max-grad-norm, accelerator.clip_grad_norm_ in the scripts);
optimizer step; zero_grad(set_to_none=True).

SDXL as its scripts' encode_prompt: both encoders' penultimate hidden states
joined on the last axis, the pooled (projected) output of text_encoder_2 and the
time ids (original size, crop top-left, target size: the image's own size, 0, 0,
the resolution) as added_cond_kwargs. Its VAE stays float32 (SDXL's overflows in
fp16), as the scripts keep it.

Trained weights are float32; under mixed precision the frozen networks (VAE for
SD, text encoders, a LoRA run's UNet) are stored in the half dtype and the step
runs under torch.autocast, as accelerate does. fp16 uses a GradScaler. LoRA
(peft): adapters on the UNet's attention projections (--lora-layers transformer
adds feed-forward and proj_in/out, as our `training.lora_layers`), and with
--train-text-encoder on each text encoder's q/k/v/out projections (as the
scripts' --train_text_encoder with LoRA) instead of its weights.

--config RUN.yaml takes the settings from one of our run configs (its `preset:`
read from presets/), so both programs run the same settings; flags given on the
command line override it.

--fused-backward is not diffusers': each parameter gets its own optimizer, run
by a post-accumulate-grad hook during backward, which then frees the gradient
(PyTorch's "fuse the optimizer step into the backward pass" recipe, what kohya's
fused backward pass does), the reference for our `training.fused_backward`.

adamw_8bit needs bitsandbytes; where it is not installed the step uses
torch.optim.AdamW and the JSON line says so ("optimizer" is what ran,
"optimizer_asked" what was asked, "note" why).

Prints one JSON line: {"steps_per_s", "peak_mem_bytes", "peak_kind", ...}.
peak_mem_bytes is torch.cuda.max_memory_allocated on CUDA (the caching
allocator's peak, the figure the VRAM estimator predicts) and the process's peak
RSS on the CPU (ru_maxrss; it includes the Python runtime and the weights).

    python benches/diffusers_train_step.py --model DIR [--config RUN.yaml] [--resolution 512] [--batch 1]
        [--precision no|fp16|bf16] [--device cpu|cuda] [--steps 5] [--warmup 2]
        [--attention default|sdpa] [--gradient-checkpointing] [--optimizer adamw|adamw_8bit]
        [--lora-rank N] [--lora-alpha A] [--lora-layers attention|transformer]
        [--train-text-encoder] [--no-cache-latents] [--threads N] [--max-grad-norm X]
        [--pre-compute-text-embeddings] [--fused-backward]
"""
import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = os.path.join(HERE, "..", "presets")

UNET_LORA = {
    "attention": ["to_k", "to_q", "to_v", "to_out.0"],
    "transformer": ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
}
TEXT_LORA = {
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "transformer": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_defaults(path):
    """argparse defaults from one of our run configs (README's key table gives
    the defaults of the keys it leaves out)."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if cfg.get("preset"):
        with open(os.path.join(PRESETS, f"{cfg['preset']}.yaml")) as f:
            cfg = merge(yaml.safe_load(f) or {}, cfg)
    t = cfg.get("training") or {}
    if int(t.get("gradient_accumulation_steps", 1)) != 1:
        raise SystemExit(f"{path}: gradient_accumulation_steps above 1 is not measured by this script")
    layers = t.get("lora_layers", "attention")
    if t.get("use_lora") and layers not in UNET_LORA:
        raise SystemExit(f"{path}: lora_layers {layers!r} (convolutions) is not supported by this script")
    mp = str(t.get("mixed_precision", "bf16"))
    return {
        "resolution": int(cfg.get("resolution", 512)),
        "batch": int(t.get("batch_size", 1)),
        "precision": "no" if mp in ("no", "False", "false") else mp,
        # ours: `explicit` is diffusers' AttnProcessor; `default` (libtorch's SDPA),
        # `xformers` and `flash_attention` are SDPA kernels (AttnProcessor2_0).
        "attention": "default" if t.get("attention", "default") == "explicit" else "sdpa",
        "gradient_checkpointing": bool(t.get("gradient_checkpointing", False)),
        "optimizer": t.get("optimizer", "adamw"),
        "lora_rank": int(t.get("lora_rank", 4)) if t.get("use_lora") else 0,
        "lora_alpha": float(t.get("lora_alpha", t.get("lora_rank", 4))),
        "lora_layers": layers,
        "train_text_encoder": float(t.get("text_encoder_train_ratio", 0)) > 0,
        "no_cache_latents": not t.get("cache_latents", True),
        "learning_rate": float(t.get("learning_rate", 1e-6)),
        "max_grad_norm": float(t.get("max_grad_norm", 1.0)),
        "fused_backward": bool(t.get("fused_backward", False)),
    }


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a diffusers model folder (SD 1.x/2.x or SDXL)")
    ap.add_argument("--config", help="take the settings from this run config of ours (flags override it)")
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
    ap.add_argument("--lora-alpha", type=float, default=None, help="default: the rank")
    ap.add_argument("--lora-layers", choices=sorted(UNET_LORA), default="attention")
    ap.add_argument("--train-text-encoder", action="store_true",
                    help="train the text encoder(s) too (their LoRA adapters in a LoRA run)")
    ap.add_argument("--no-cache-latents", action="store_true", help="encode with the VAE every step")
    ap.add_argument("--pre-compute-text-embeddings", action="store_true",
                    help="encode the prompt once before training, as train_dreambooth.py's flag of that name "
                         "(train_dreambooth_lora_sdxl.py does it whenever the text encoders are frozen; "
                         "our trainer does this whenever the text encoder is frozen)")
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--max-grad-norm", type=float, default=0.0,
                    help="clip the gradients' global norm (the scripts' default is 1.0); 0: off")
    ap.add_argument("--fused-backward", action="store_true",
                    help="optimizer step per parameter inside backward (not diffusers': PyTorch's recipe)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    first, _ = ap.parse_known_args()
    if first.config:
        ap.set_defaults(**config_defaults(first.config))
    a = ap.parse_args()
    if a.lora_alpha is None:
        a.lora_alpha = float(a.lora_rank)
    return a


def make_optimizer(name, params, lr):
    """(optimizer, what ran, note)."""
    kw = dict(lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            return torch.optim.AdamW(params, **kw), "adamw", "bitsandbytes is not installed: torch AdamW instead of 8-bit"
        return bnb.optim.AdamW8bit(params, **kw), "adamw_8bit", None
    return torch.optim.AdamW(params, **kw), "adamw", None


def main():
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.precision]
    torch.manual_seed(a.seed)
    if a.fused_backward and (a.max_grad_norm > 0 or a.precision == "fp16"):
        raise SystemExit("--fused-backward cannot clip the global norm or scale an fp16 loss")
    sdxl = os.path.isdir(os.path.join(a.model, "text_encoder_2"))

    tokenizers = [CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer")]
    text_encoders = [CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder")]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer_2"))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(a.model, subfolder="text_encoder_2"))
    noise_scheduler = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
    unet.set_attn_processor(AttnProcessor() if a.attention == "default" else AttnProcessor2_0())
    vae.requires_grad_(False)
    lora_te = a.lora_rank and a.train_text_encoder
    for te in text_encoders:
        if not a.train_text_encoder or lora_te:
            te.requires_grad_(False)

    if a.lora_rank:
        from peft import LoraConfig
        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=UNET_LORA[a.lora_layers]))
        if lora_te:
            # peft's own injection (what transformers' add_adapter calls, without
            # its peft version floor): the same adapters.
            from peft import inject_adapter_in_model
            for te in text_encoders:
                te.to(device, dtype=weight_dtype)
                inject_adapter_in_model(LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, init_lora_weights="gaussian",
                                                   target_modules=TEXT_LORA[a.lora_layers]), te)
        for net in [unet] + (text_encoders if lora_te else []):
            for p in net.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # cast_training_params
    else:
        unet.to(device)
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if a.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    for te in text_encoders:
        te.to(device, dtype=torch.float32 if a.train_text_encoder and not lora_te else weight_dtype)
    # SDXL's VAE stays float32 (it overflows in fp16), as the SDXL scripts keep it.
    vae_dtype = torch.float32 if sdxl else weight_dtype
    vae.to(device, dtype=vae_dtype)

    params = [p for p in unet.parameters() if p.requires_grad]
    if a.train_text_encoder:
        for te in text_encoders:
            params += [p for p in te.parameters() if p.requires_grad]
    note = None
    if a.fused_backward:
        per_param = {}
        for p in params:
            per_param[p], optimizer_ran, note = make_optimizer(a.optimizer, [p], a.learning_rate)

        def fused_update(p):
            per_param[p].step()
            per_param[p].zero_grad(set_to_none=True)

        for p in params:
            p.register_post_accumulate_grad_hook(fused_update)
        optimizer = None
    else:
        optimizer, optimizer_ran, note = make_optimizer(a.optimizer, params, a.learning_rate)
    if note:
        print(f"note: {note}", file=sys.stderr)
    scaler = torch.amp.GradScaler(device.type) if a.precision == "fp16" else None

    gen = torch.Generator("cpu").manual_seed(a.seed)
    pixels = (torch.rand(a.batch, 3, a.resolution, a.resolution, generator=gen) * 2 - 1).to(device, vae_dtype)
    prompt = ["a photo of sks dog"] * a.batch
    ids = [tok(prompt, padding="max_length", truncation=True, max_length=tok.model_max_length,
               return_tensors="pt").input_ids.to(device) for tok in tokenizers]
    # compute_time_ids: original size + crop top-left + target size, one row an image.
    time_ids = torch.tensor([[a.resolution, a.resolution, 0, 0, a.resolution, a.resolution]] * a.batch,
                            device=device, dtype=weight_dtype) if sdxl else None
    scaling = vae.config.scaling_factor
    cached = None
    if not a.no_cache_latents:
        with torch.no_grad():
            cached = vae.encode(pixels).latent_dist.sample() * scaling
        vae.to("cpu")  # as cache_latents does: the VAE leaves the device
        if cuda:
            torch.cuda.empty_cache()

    def encode_prompt():
        """(states, pooled): SD: the encoder's last states; SDXL: both encoders'
        penultimate states joined, the second's projected pooled output."""
        if not sdxl:
            return text_encoders[0](ids[0], return_dict=False)[0], None
        states, pooled = [], None
        for te, i in zip(text_encoders, ids):
            out = te(i, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        return torch.cat(states, dim=-1), pooled

    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=a.precision != "no")
    precomputed = None
    if a.pre_compute_text_embeddings:
        if a.train_text_encoder:
            raise SystemExit("--pre-compute-text-embeddings needs frozen text encoders")
        with torch.no_grad(), autocast:
            precomputed = encode_prompt()

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
            states, pooled = precomputed if precomputed is not None else encode_prompt()
            added = {"time_ids": time_ids, "text_embeds": pooled} if sdxl else None
            pred = unet(noisy, timesteps, states, added_cond_kwargs=added, return_dict=False)[0]
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        if optimizer is None:  # fused: every update ran inside backward
            loss.backward()
            return loss
        if scaler is not None:
            scaler.scale(loss).backward()
            if a.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if a.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
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
    line = {
        "steps_per_s": a.steps / elapsed,
        "peak_mem_bytes": peak,
        "peak_kind": kind,
        "loss": float(loss.detach()) if loss is not None else None,
        "trained_params": sum(p.numel() for p in params),
        "model": a.model, "family": "sdxl" if sdxl else "sd", "config": a.config,
        "resolution": a.resolution, "batch": a.batch, "precision": a.precision,
        "device": str(device), "attention": a.attention, "gradient_checkpointing": a.gradient_checkpointing,
        "optimizer": optimizer_ran, "optimizer_asked": a.optimizer,
        "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha if a.lora_rank else None,
        "lora_layers": a.lora_layers if a.lora_rank else None, "train_text_encoder": a.train_text_encoder,
        "cache_latents": not a.no_cache_latents, "pre_compute_text_embeddings": a.pre_compute_text_embeddings,
        "max_grad_norm": a.max_grad_norm, "fused_backward": a.fused_backward,
        "steps": a.steps, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if note:
        line["note"] = note
    print(json.dumps(line))


if __name__ == "__main__":
    main()
