"""Reference fixtures for stage-1 (decoder) training: LPIPS and the generator step.

usage: /work/venv-torch/bin/python scripts/make_stage1_fixtures.py [--rae-src DIR] [--out DIR]

Imports the reference implementation (bytetriper/RAE, `src/`) from a fetched
copy at run time, e.g.
    git --git-dir=<mirror of bytetriper/RAE> archive HEAD src configs | tar -x -C /tmp/rae-ref
and writes small safetensors/json files to tests/fixtures/rae-ref/stage1-gen/ (see the
README written there). Nothing of the reference code is copied: every number
comes from running it.

Size: VGG16 at full width is 14.7 M parameters (59 MB in f32), too big to
commit. The fixtures use a VGG16 of the same topology (13 3x3 convs in the
2-2-3-3-3 layout, ReLU, 4 max-pools, taps relu1_2..relu5_3) with every width
divided by 8 (8/16/32/64/64 channels), built with torchvision's own
`vgg.make_layers` and handed to the reference LPIPS class in place of
`models.vgg16(pretrained=True)`; its `lin` layers are rebuilt at those widths
and loaded through the reference's own `_load_pretrained_weights`
(`lin{k}.model.1.weight` keys, strict=False as the reference). Every line of
the reference's forward (scaling layer, unit normalisation, squared
difference, 1x1 lin, spatial mean, sum, batch mean) runs unchanged.
"""
import argparse
import ast
import json
import os
import sys
import types
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
ap = argparse.ArgumentParser()
ap.add_argument("--rae-src", default="/tmp/rae-ref", help="a copy of bytetriper/RAE (holding src/ and configs/)")
ap.add_argument("--out", default=str(ROOT / "tests/fixtures/rae-ref/stage1-gen"))
args = ap.parse_args()
RAE_SRC = Path(args.rae_src)
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(RAE_SRC / "src"))
# disc/lpips_utils imports requests for its download helper, which is never called here.
sys.modules.setdefault("requests", types.ModuleType("requests"))

torch.manual_seed(0)
torch.set_num_threads(2)
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

import disc.lpips as ref_lpips  # noqa: E402
import yaml  # noqa: E402
from stage1.decoders.decoder import GeneralDecoder  # noqa: E402
from stage1.decoders.utils import ViTMAEConfig  # noqa: E402
from stage1.rae import RAE  # noqa: E402
from torchvision.models.vgg import VGG, make_layers  # noqa: E402
from utils.optim_utils import build_optimizer, build_scheduler  # noqa: E402
from utils.train_utils import update_ema  # noqa: E402


def reference_function(path, name):
    """One top-level function of a reference file, without importing the file
    (train_stage1.py imports wandb, omegaconf and the eval suite)."""
    tree = ast.parse(Path(path).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)
    return ns[name]


calculate_adaptive_weight = reference_function(RAE_SRC / "src/train_stage1.py", "calculate_adaptive_weight")

# ---------------------------------------------------------------- LPIPS ----
WIDTH_DIV = 8
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
small_cfg = [c if c == "M" else c // WIDTH_DIV for c in VGG_CFG]
chns = [c // WIDTH_DIV for c in [64, 128, 256, 512, 512]]


def small_vgg16(pretrained=False, **_):
    net = VGG(make_layers(small_cfg, batch_norm=False), init_weights=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.features:
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                # non-zero biases (torchvision zero-inits them)
                m.bias.copy_(0.05 + 0.1 * torch.randn(m.bias.shape, generator=g))
                # Channel 0 of every conv is a constant 3 (zero weights): with
                # so few channels a position whose features are all zero after
                # the ReLU is likely, and there LPIPS's sqrt has no derivative
                # (NaN gradients, in the reference as in any faithful copy).
                m.weight[0].zero_()
                m.bias[0] = 3.0
    return net


vgg_state = {k: v.contiguous() for k, v in small_vgg16().state_dict().items() if k.startswith("features.")}
torch.save(vgg_state, OUT / "vgg16-small.pth")
g = torch.Generator().manual_seed(2)
lin_state = {f"lin{k}.model.1.weight": (torch.rand(1, c, 1, 1, generator=g) * 2.0 / c).contiguous()
             for k, c in enumerate(chns)}
torch.save(lin_state, OUT / "lpips-lin-small.pth")

ref_lpips.models.vgg16 = lambda pretrained=True, **kw: _loaded_vgg()


def _loaded_vgg():
    net = small_vgg16()
    net.load_state_dict(vgg_state, strict=False)
    return net


class SmallLPIPS(ref_lpips.LPIPS):
    """The reference LPIPS with its lin layers at the reduced widths; weights
    through the reference loader (get_ckpt_path pointed at our file)."""

    def _load_pretrained_weights(self, name="vgg_lpips"):
        self.chns = chns
        for k, c in enumerate(chns):
            setattr(self, f"lin{k}", ref_lpips.NetLinLayer(c, use_dropout=True))
        ref_lpips.get_ckpt_path = lambda _name: str(OUT / "lpips-lin-small.pth")
        super()._load_pretrained_weights(name)


lpips = SmallLPIPS().eval()
for k, c in enumerate(chns):
    assert torch.equal(getattr(lpips, f"lin{k}").model[1].weight, lin_state[f"lin{k}.model.1.weight"])

# LPIPS alone at 36 px: 36 -> 18 -> 9 -> 4 -> 2 exercises the floor of an odd max-pool.
g = torch.Generator().manual_seed(3)
lp_x = (torch.rand(2, 3, 36, 36, generator=g) * 2 - 1)
lp_y = (lp_x + 0.3 * torch.randn(2, 3, 36, 36, generator=g)).clamp(-1.2, 1.2)
lp_y.requires_grad_(True)
per_sample = lpips(lp_x, lp_y, reduction="none")
lp_mean = per_sample.mean()
(lp_grad_y,) = torch.autograd.grad(lp_mean, lp_y)
feats = lpips.net(lpips.scaling_layer(lp_x))
assert torch.isfinite(lp_grad_y).all()
save_file({
    "x": lp_x.contiguous(), "y": lp_y.detach().contiguous(),
    "per_sample": per_sample.detach().reshape(-1).contiguous(), "mean": lp_mean.detach().reshape(1),
    "grad_y": lp_grad_y.contiguous(),
    **{f"x_{n}": f.detach().contiguous() for n, f in zip(["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"], feats)},
}, OUT / "lpips-io.safetensors")

# ------------------------------------------------------- generator step ----
B, GRID, LATENT, PATCH = 3, 4, 16, 10
IMG = GRID * PATCH
dec_cfg = dict(latent_dim=LATENT, decoder_hidden_size=32, decoder_num_hidden_layers=2,
               decoder_num_attention_heads=4, decoder_intermediate_size=64, patch_size=PATCH,
               num_patches=GRID * GRID, layer_norm_eps=1e-12, hidden_act="gelu",
               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
hf_cfg = ViTMAEConfig(hidden_size=LATENT, decoder_hidden_size=32, decoder_num_hidden_layers=2,
                      decoder_num_attention_heads=4, decoder_intermediate_size=64, hidden_act="gelu",
                      layer_norm_eps=1e-12, num_channels=3)
hf_cfg.patch_size = PATCH
hf_cfg.image_size = IMG
decoder = GeneralDecoder(hf_cfg, num_patches=GRID * GRID)
g = torch.Generator().manual_seed(4)
with torch.no_grad():
    for name, p in decoder.named_parameters():
        if name == "decoder_pos_embed":
            continue  # the fixed sin-cos table the reference builds
        if name.endswith("layernorm_before.weight") or name.endswith("layernorm_after.weight") or name == "decoder_norm.weight":
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1 or name == "trainable_cls_token":
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        else:
            p.add_(0.02 * torch.randn(p.shape, generator=g))
# train_stage1.py: rae.decoder.requires_grad_(True) (the sin-cos table too)
decoder.requires_grad_(True).train()
theta0 = {k: v.detach().clone().contiguous() for k, v in decoder.state_dict().items()}

files = sorted(p for p in (ROOT / "tests/fixtures/rae-ref/images").rglob("*") if p.suffix in (".png", ".jpg"))[:B]


def small_image(path):
    im = Image.open(path).convert("RGB")
    s = min(im.size)
    left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((IMG, IMG), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0


images = torch.stack([small_image(f) for f in files])
g = torch.Generator().manual_seed(5)
z = torch.randn(B, GRID * GRID, LATENT, generator=g)
u = torch.rand(B, 1, 1, generator=g)
eps = torch.randn(B, GRID * GRID, LATENT, generator=g)
NOISE_TAU = 0.8


def run_rae(x):
    """RAE.forward in train mode with the encoder replaced by the fixed
    latents z and the noise draws by (u, eps): the reference's own encode
    (noising, reshape) and decode (unpatchify, de-normalise) run."""
    rae = types.SimpleNamespace(
        encoder_input_size=IMG, encoder_mean=torch.tensor(dec_cfg["image_mean"]).view(1, 3, 1, 1),
        encoder_std=torch.tensor(dec_cfg["image_std"]).view(1, 3, 1, 1), encoder=lambda _x: z.clone(),
        training=True, noise_tau=NOISE_TAU, reshape_to_2d=True, do_normalization=False, decoder=decoder)
    rae.noising = lambda t: RAE.noising(rae, t)
    real_rand, real_randn_like = torch.rand, torch.randn_like
    torch.rand = lambda *a, **k: u.clone()
    torch.randn_like = lambda t, **k: eps.clone()
    try:
        zt = RAE.encode(rae, x)
    finally:
        torch.rand, torch.randn_like = real_rand, real_randn_like
    return RAE.decode(rae, zt), zt


# train_stage1.py:375-399 with perceptual_weight 1.0 (the generator half of one step)
cfg_yaml = yaml.safe_load((RAE_SRC / "configs/stage1/training/DINOv2-B_decXL.yaml").read_text())
perceptual_weight = float(cfg_yaml["gan"]["loss"]["perceptual_weight"])
disc_weight = float(cfg_yaml["gan"]["loss"]["disc_weight"])
max_d_weight = float(cfg_yaml["gan"]["loss"]["max_d_weight"])


def gen_losses(x):
    recon, zt = run_rae(x)
    real_normed = x * 2.0 - 1.0
    recon_normed = recon * 2.0 - 1.0
    rec_loss = (recon - x).abs().mean()
    lpips_loss = lpips(real_normed, recon_normed)
    return recon, zt, recon_normed, rec_loss, lpips_loss, rec_loss + perceptual_weight * lpips_loss


# (a) before the adversarial start: total = L1 + LPIPS, one AdamW step, EMA
recon, zt, _, rec_loss, lpips_loss, total = gen_losses(images)
decoder.zero_grad(set_to_none=True)
total.backward()
grads = {k: p.grad.detach().clone().contiguous() for k, p in decoder.named_parameters()}
assert all(torch.isfinite(v).all() for v in grads.values())
for f in lpips.net(lpips.scaling_layer(recon.detach() * 2 - 1)):
    assert (f.pow(2).sum(1) > 0).all(), "a zero feature vector: LPIPS gradients would be NaN"

SPE = 4  # steps per epoch of the fixture's schedule
training_cfg = dict(cfg_yaml["training"])
optimizer, _ = build_optimizer(decoder.parameters(), training_cfg)
scheduler, _ = build_scheduler(optimizer, SPE, training_cfg)
lr0 = optimizer.param_groups[0]["lr"]
ema_model = deepcopy(decoder).eval()
ema_model.requires_grad_(False)
optimizer.step()
scheduler.step()
update_ema(ema_model, decoder, float(training_cfg["ema_decay"]))
theta1 = {k: v.detach().clone().contiguous() for k, v in decoder.state_dict().items()}
ema1 = {k: v.detach().clone().contiguous() for k, v in ema_model.state_dict().items()}
lr_sched = [training_cfg["scheduler"]["base_lr"] * scheduler.lr_lambdas[0](s) for s in range(16 * SPE + 4)]

# (b) with an adversarial term, on theta0 again: a stand-in discriminator
# (a fixed linear map of the [-1,1] reconstruction) gives -mean(D(G)) so the
# seam and the reference's adaptive weight on decoder_pred.weight are checked.
decoder.load_state_dict(theta0)
decoder.zero_grad(set_to_none=True)
g = torch.Generator().manual_seed(6)
d_proj = torch.randn(3, IMG, IMG, generator=g) / IMG
recon_b, _, recon_normed, rec_b, lpips_b, recon_total = gen_losses(images)
logits_fake = (recon_normed * d_proj).sum(dim=(1, 2, 3)).view(B, 1)
gan_loss = -torch.mean(logits_fake)  # disc.gan_loss.vanilla_g_loss
adaptive_weight = calculate_adaptive_weight(recon_total, gan_loss, decoder.decoder_pred.weight, max_d_weight)
total_gan = recon_total + disc_weight * adaptive_weight * gan_loss
total_gan.backward()
grads_gan = {k: p.grad.detach().clone().contiguous() for k, p in decoder.named_parameters()}

save_file(theta0, OUT / "gen-theta0.safetensors")
save_file(theta1, OUT / "gen-theta1.safetensors")
save_file(ema1, OUT / "gen-ema1.safetensors")
save_file(grads, OUT / "gen-grads.safetensors")
save_file(grads_gan, OUT / "gen-grads-gan.safetensors")
scalar = lambda t: t.detach().reshape(1).float().contiguous()
save_file({
    "images": images.contiguous(), "z": z.contiguous(), "u": u.reshape(B).contiguous(), "eps": eps.contiguous(),
    "z_noisy": zt.detach().contiguous(), "recon": recon.detach().contiguous(),
    "l1": scalar(rec_loss), "lpips": scalar(lpips_loss), "total": scalar(total),
    "d_proj": d_proj.contiguous(), "gan_loss": scalar(gan_loss), "adaptive_weight": scalar(adaptive_weight),
    "total_gan": scalar(total_gan), "lr_schedule": torch.tensor(lr_sched, dtype=torch.float64),
}, OUT / "gen-io.safetensors")

spec = {
    "reference": "bytetriper/RAE src/train_stage1.py (generator half of one step), src/stage1/rae.py, src/disc/lpips.py",
    "decoder": dec_cfg,
    "images": [str(f.relative_to(ROOT / "tests/fixtures/rae-ref")) for f in files],
    "image_size": IMG,
    "image_prep": "center square crop, PIL bicubic to image_size, uint8 / 255",
    "noise_tau": NOISE_TAU,
    "noise": "z_noisy = z + noise_tau * u[b] * eps (u ~ U[0,1) per sample, eps ~ N(0,1)); z is (B, tokens, C)",
    "perceptual_weight": perceptual_weight,
    "disc_weight": disc_weight,
    "max_d_weight": max_d_weight,
    "adaptive_weight": "clamp(|dR/dW| / (|dG/dW| + 1e-6), 0, max_d_weight), W = decoder_pred.weight, R = l1 + perceptual_weight * lpips",
    "stand_in_discriminator": "logits[b] = sum(recon_pm1[b] * d_proj); gan_loss = -mean(logits)",
    "optimizer": {k: training_cfg["optimizer"][k] for k in ("lr", "betas", "weight_decay")} | {"eps": 1e-8},
    "schedule": training_cfg["scheduler"] | {"steps_per_epoch": SPE},
    "lr_step0": lr0,
    "ema_decay": float(training_cfg["ema_decay"]),
    "trainable": "every decoder tensor, decoder_pos_embed included (the reference's requires_grad_(True))",
    "lpips": {"vgg": "vgg16-small.pth", "lin": "lpips-lin-small.pth", "widths": chns, "io": "lpips-io.safetensors"},
}
(OUT / "stage1.json").write_text(json.dumps(spec, indent=2) + "\n")
print(json.dumps({"l1": rec_loss.item(), "lpips": lpips_loss.item(), "total": total.item(), "lambda": adaptive_weight.item(),
                  "gan": gan_loss.item(), "lpips_io": per_sample.reshape(-1).tolist(), "lr0": lr0}))
