"""Reference timing of one stage-1 generator step (the reference's
GeneralDecoder ViT-B, its LPIPS with a random full-width VGG16, L1 + LPIPS,
backward, AdamW), for a side-by-side with `examples/stage1_step.rs`.

usage: THREADS=2 /work/venv-torch/bin/python scripts/torch_stage1_step.py [BATCH] [REPS] [--rae-src DIR]
"""
import os
import sys
import time
import types

import torch

args = [a for a in sys.argv[1:] if not a.startswith("--")]
src = sys.argv[sys.argv.index("--rae-src") + 1] if "--rae-src" in sys.argv else "/tmp/rae-ref"
if src in args:
    args.remove(src)
B = int(args[0]) if args else 2
REPS = int(args[1]) if len(args) > 1 else 3
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
sys.path.insert(0, src + "/src")
sys.modules.setdefault("requests", types.ModuleType("requests"))
import disc.lpips as L  # noqa: E402
from stage1.decoders.decoder import GeneralDecoder  # noqa: E402
from stage1.decoders.utils import ViTMAEConfig  # noqa: E402
from torchvision.models import vgg16  # noqa: E402

L.models.vgg16 = lambda pretrained=True, **kw: vgg16(weights=None)
L.LPIPS._load_pretrained_weights = lambda self, name="vgg_lpips": None
lpips = L.LPIPS().eval()
cfg = ViTMAEConfig(hidden_size=768, decoder_hidden_size=768, decoder_num_hidden_layers=12,
                   decoder_num_attention_heads=12, decoder_intermediate_size=3072, hidden_act="gelu",
                   layer_norm_eps=1e-12, num_channels=3)
cfg.patch_size, cfg.image_size = 16, 256
dec = GeneralDecoder(cfg, num_patches=256).train()
opt = torch.optim.AdamW(dec.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
z = torch.randn(B, 256, 768)
x = torch.rand(B, 3, 256, 256)
with torch.no_grad():
    t0 = time.time()
    lpips(x * 2 - 1, x * 2 - 0.9)
    print(f"LPIPS forward alone, batch {B}: {time.time() - t0:.2f} s")
for r in range(REPS + 1):
    t0 = time.time()
    zt = z + 0.8 * torch.rand(B, 1, 1) * torch.randn_like(z)
    recon = dec.unpatchify(dec(zt).logits) * std + mean
    loss = (recon - x).abs().mean() + lpips(x * 2 - 1, recon * 2 - 1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    t = time.time() - t0
    print(f"{'(warm-up) ' if r == 0 else ''}rep {r}: batch {B}: step {t:.2f} s ({B / t:.2f} img/s)")
