"""Reference side of the generate benchmark: diffusers' StableDiffusionPipeline
on the CPU with the same model, prompt, sampler, steps, size and seed as
`dreambooth generate`. Run with a Python that has torch 2.11 and diffusers.

    python benches/diffusers_generate.py MODEL_DIR SAMPLER STEPS SIZE OUT.png
"""
import sys

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline)

SAMPLERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
}


def main():
    model, sampler, steps, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.5,
                 height=size, width=size, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    image.save(out)


if __name__ == "__main__":
    main()
