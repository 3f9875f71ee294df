"""Keys and shapes of full-size SD 1.5 and SD 2.1 checkpoints in the LDM layout (and the
diffusers keys they map to), for the architecture-inference tests. Models are built on the
meta device, so nothing is allocated; the LDM conversion is the fixture script's."""
import sys, json, gzip, torch
sys.path.insert(0, "tests/fixtures")  # run from the repository root: needs make_fixtures.py
import make_fixtures as mf
from diffusers import UNet2DConditionModel, AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel

def shapes(sd): return {k: list(v.shape) for k, v in sd.items()}

out = {}
with torch.device("meta"):
    for name, ucfg, tcfg, openclip in [
        ("sd15", dict(cross_attention_dim=768), dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"), False),
        ("sd21", dict(cross_attention_dim=1024, attention_head_dim=[5,10,20,20], use_linear_projection=True, upcast_attention=True, sample_size=96), dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"), True),
    ]:
        unet = UNet2DConditionModel(**ucfg)
        vae = AutoencoderKL(block_out_channels=[128,256,512,512], down_block_types=["DownEncoderBlock2D"]*4, up_block_types=["UpDecoderBlock2D"]*4, layers_per_block=2)
        te = CLIPTextModel(CLIPTextConfig(**tcfg))
        ldm = {}
        ldm.update(mf.unet_to_ldm(unet.state_dict(), dict(unet.config)))
        ldm.update(mf.vae_to_ldm(vae.state_dict(), dict(vae.config)))
        tsd = te.state_dict()
        if openclip:
            ldm.update(mf.clip_to_openclip(tsd, 23, 1024, 4096, 0, torch.float16))
        else:
            ldm.update(mf.clip_to_ldm(tsd))
        out[name] = shapes(ldm)
        out[name + "_diffusers"] = {
            "unet": sorted(unet.state_dict()),
            "vae": sorted(vae.state_dict()),
            "text_encoder": sorted(k[len("text_model."):] if k.startswith("text_model.") else k for k in tsd if not k.endswith("position_ids")),
        }
        print(name, len(ldm))
data = json.dumps(out, sort_keys=True, separators=(",", ":")).encode()
open("src/checkpoint/testdata/ldm_shapes.json.gz", "wb").write(gzip.compress(data, 9, mtime=0))
print(len(data))
