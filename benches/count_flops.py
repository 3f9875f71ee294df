"""FLOPs of one DreamBooth training step's UNet forward + backward (the bulk of
the step), counted by torch's FlopCounterMode, for model FLOP utilisation:
MFU = flops × steps_per_s / the card's peak (dense bf16).

    python benches/count_flops.py --model DIR [--resolution 512] [--batch 8]
"""
import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    from diffusers import UNet2DConditionModel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet").to(device)
    side = a.resolution // 8
    x = torch.randn(a.batch, 4, side, side, device=device)
    t = torch.randint(0, 1000, (a.batch,), device=device)
    ctx = torch.randn(a.batch, 77, unet.config.cross_attention_dim, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with FlopCounterMode(display=False) as counter:
            unet(x, t, ctx).sample.float().square().mean().backward()
    print(json.dumps({"unet_fwd_bwd_flops": counter.get_total_flops(), "batch": a.batch, "resolution": a.resolution}))


if __name__ == "__main__":
    main()
