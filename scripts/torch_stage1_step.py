"""Reference timing of one stage-1 generator step (the reference's
GeneralDecoder ViT-B, its LPIPS with a random full-width VGG16, latent noise
tau 0.8, L1 + LPIPS, backward, AdamW), for a side-by-side with
`rae-cache bench decoder-train` (scripts/cpu_compare.py row
`decoder-train-b`) or `examples/stage1_step.rs`.

The reference's code is imported from a checkout of bytetriper/RAE
(`--rae-src`, default /tmp/rae-ref), e.g.
  mkdir -p /tmp/rae-ref && git --git-dir=<mirror of bytetriper/RAE> archive HEAD src | tar -x -C /tmp/rae-ref

usage: THREADS=2 python scripts/torch_stage1_step.py [BATCH] [REPS] [--rae-src DIR]
       python scripts/torch_stage1_step.py --batch 8 --iters 3 --warmup 1 --threads 2 --json
With --json the last stdout line is one JSON object (min_seconds_per_iter,
seconds_per_iter, peak_rss_bytes, ...) in the format of torch_ref_bench.py.
"""
import argparse
import json
import os
import resource
import sys
import time
import types

import torch

ap = argparse.ArgumentParser()
ap.add_argument("pos", nargs="*", type=int, help="BATCH [REPS] (old form)")
ap.add_argument("--batch", type=int)
ap.add_argument("--iters", type=int)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
ap.add_argument("--rae-src", default="/tmp/rae-ref")
ap.add_argument("--precision", default="f32", choices=["f32"])
ap.add_argument("--device", default="cpu", choices=["cpu"])
ap.add_argument("--json", action="store_true")
a = ap.parse_args()
B = a.batch or (a.pos[0] if a.pos else 2)
REPS = a.iters or (a.pos[1] if len(a.pos) > 1 else 3)
torch.set_num_threads(a.threads)
src = os.path.join(a.rae_src, "src")
if not os.path.isdir(os.path.join(src, "stage1")):
    sys.exit(f"{src}: no reference checkout (bytetriper/RAE src/); see this script's docstring")
sys.path.insert(0, src)
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
if not a.json:
    with torch.no_grad():
        t0 = time.time()
        lpips(x * 2 - 1, x * 2 - 0.9)
        print(f"LPIPS forward alone, batch {B}: {time.time() - t0:.2f} s")
times = []
for r in range(a.warmup + REPS):
    t0 = time.time()
    zt = z + 0.8 * torch.rand(B, 1, 1) * torch.randn_like(z)
    recon = dec.unpatchify(dec(zt).logits) * std + mean
    loss = (recon - x).abs().mean() + lpips(x * 2 - 1, recon * 2 - 1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    t = time.time() - t0
    warm = r < a.warmup
    if not warm:
        times.append(t)
    if not a.json:
        print(f"{'(warm-up) ' if warm else ''}rep {r}: batch {B}: step {t:.2f} s ({B / t:.2f} img/s)")
if a.json:
    print(json.dumps({
        "what": "decoder-train", "impl": "pytorch", "torch": torch.__version__, "device": "cpu",
        "precision": "f32", "batch": B, "warmup": a.warmup, "iters": len(times), "threads": a.threads,
        "seconds_per_iter": sum(times) / len(times), "min_seconds_per_iter": min(times),
        "images_per_s": B / (sum(times) / len(times)),
        "params": sum(p.numel() for p in dec.parameters() if p.requires_grad),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "notes": "reference GeneralDecoder ViT-B + reference LPIPS (random VGG16), tau 0.8, L1 + LPIPS, AdamW",
    }))
