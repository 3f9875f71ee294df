"""Writes a "medium" diffusers model: Stable Diffusion 1.5's layout (4 levels, 2
resnets per level, cross-attention in the first three, the same VAE and CLIP
structure) with fewer channels, random weights. Big enough for memory and speed
to be dominated by the same layers as the real model, small enough for a
2-core CPU.

    python benches/make_medium_model.py --out /tmp/medium-sd
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sd15_shapes import SD15_TEXT, SD15_UNET, SD15_VAE, build  # noqa: E402

MEDIUM_UNET = dict(SD15_UNET, block_out_channels=[64, 128, 256, 256], cross_attention_dim=256, attention_head_dim=4)
MEDIUM_VAE = dict(SD15_VAE, block_out_channels=[32, 64, 128, 128])
MEDIUM_TEXT = dict(SD15_TEXT, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=4, projection_dim=256)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    build(a.out, MEDIUM_UNET, MEDIUM_VAE, MEDIUM_TEXT)
    print(a.out)


if __name__ == "__main__":
    main()
