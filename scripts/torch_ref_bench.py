#!/usr/bin/env python3
"""PyTorch timings beside `rae-cache bench`, with random weights:

  encoder  DINOv2-B with registers forward (transformers' Dinov2WithRegistersModel from a config when
           transformers imports, else an equivalent ViT-B/14 with 4 registers written here), fed like
           `rae-cache build`: 256x256 crops -> bicubic 224 -> normalise -> ViT -> LayerNorm without affine.
  train    DiT-DH training step (a compact re-statement of the reference `DiTwDDTHead`: LightningDiT
           backbone, wide DDT head, SwiGLU, RMSNorm, 2D rope, adaLN), bf16 autocast, MSE on the
           flow-matching target, backward, grad clip 1.0, AdamW (0.9, 0.95), EMA.
  decoder  RAE ViT decoder (ViTMAE-style: decoder_embed, cls + sincos position, pre-LN blocks, decoder_pred).
  sample   Euler sampling of the same DiT-DH with classifier-free guidance (doubled batch), no autograd.

Prints one JSON line per workload with the same keys as `rae-cache bench`.
  python3 scripts/torch_ref_bench.py --what encoder,train,decoder --device cuda --batch-encoder 256 ...
  python3 scripts/torch_ref_bench.py --tiny --device cpu          # smoke test, seconds
"""

import argparse
import json
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------- shapes

# Our presets (src/models/config.rs): DiT-DH-XL = backbone 1152/28/16, head 2048/2/16, 16x16x768, 1000 classes.
DITDH = {
    "xl": dict(hidden=(1152, 2048), depth=(28, 2), heads=(16, 16)),
    "l": dict(hidden=(1024, 2048), depth=(24, 2), heads=(16, 16)),
    "b": dict(hidden=(768, 2048), depth=(12, 2), heads=(12, 16)),
    "s": dict(hidden=(384, 2048), depth=(12, 2), heads=(6, 16)),
}
# DecoderConfig::preset: ViT-XL = 1152 wide, 28 layers, 16 heads, MLP 4096, patch 16, 256 tokens x 768.
DECODER = {
    "vit-xl": dict(hidden=1152, layers=28, heads=16, mlp=4096),
    "vit-l": dict(hidden=1024, layers=24, heads=16, mlp=4096),
    "vit-b": dict(hidden=768, layers=12, heads=12, mlp=3072),
}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_iters(dev, warmup, iters, fn):
    for _ in range(warmup):
        fn()
    sync(dev)
    secs = []
    for _ in range(max(iters, 1)):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        secs.append(time.perf_counter() - t0)
    return secs


def report(what, model, dev, precision, batch, warmup, secs, params, notes):
    mean = sum(secs) / len(secs)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return {
        "what": what,
        "impl": "pytorch",
        "torch": torch.__version__,
        "model": model,
        "device": dev.type,
        "precision": precision,
        "batch": batch,
        "warmup": warmup,
        "iters": len(secs),
        "seconds_per_iter": mean,
        "min_seconds_per_iter": min(secs),
        "images_per_s": batch / max(mean, 1e-12),
        "params": params,
        "peak_device_bytes": peak,
        # the process's peak resident memory (Linux reports KiB): one workload per process to read it alone
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "notes": notes,
    }


def n_params(m, trainable_only=True):
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


def dtype_of(name):
    return {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------- encoder


class VitBlock(nn.Module):
    """DINOv2 layer: LN -> attention -> layer scale -> LN -> GELU MLP -> layer scale."""

    def __init__(self, c, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(c, eps=1e-6)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.ls1 = nn.Parameter(torch.full((c,), 0.1))
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.ls2 = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.ls1 * self.proj(a)
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Dinov2Reg(nn.Module):
    """ViT/14 with cls + register tokens and a 37x37 position table interpolated to the input grid."""

    def __init__(self, c=768, layers=12, heads=12, registers=4, patch=14, table=518):
        super().__init__()
        self.grid0 = table // patch
        self.patch = nn.Conv2d(3, c, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, c))  # unused in forward, counted like HF's
        self.reg = nn.Parameter(torch.randn(1, registers, c) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid0**2, c) * 0.02)
        self.blocks = nn.ModuleList(VitBlock(c, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
        x = self.patch(x)
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos_cls, pos = self.pos[:, :1], self.pos[:, 1:]
        pos = pos.reshape(1, self.grid0, self.grid0, c).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(x.dtype)
        pos = pos.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(b, -1, -1) + pos_cls, x + pos], 1)
        x = torch.cat([x[:, :1], self.reg.expand(b, -1, -1), x[:, 1:]], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def build_encoder(tiny):
    shape = dict(c=48, layers=2, heads=4) if tiny else dict(c=768, layers=12, heads=12)
    try:
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        cfg = Dinov2WithRegistersConfig(
            hidden_size=shape["c"], num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
            num_register_tokens=4, patch_size=14, image_size=518, mlp_ratio=4, layer_norm_eps=1e-6,
        )
        try:
            model = Dinov2WithRegistersModel(cfg, add_pooling_layer=False)
        except TypeError:
            model = Dinov2WithRegistersModel(cfg)
        try:
            model.set_attn_implementation("sdpa")
        except Exception:  # older transformers: pass it via the config instead
            cfg._attn_implementation = "sdpa"
        c = shape["c"]
        # RAE takes the last hidden state through a LayerNorm without affine.
        model.layernorm = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        return model, "transformers Dinov2WithRegistersModel (sdpa)", lambda m, x: m(pixel_values=x).last_hidden_state
    except ImportError:
        model = Dinov2Reg(**shape)
        model.norm = nn.LayerNorm(shape["c"], eps=1e-6, elementwise_affine=False)
        return model, "self-written ViT-B/14 + 4 registers (sdpa)", lambda m, x: m(x)


def bench_encoder(a, dev):
    model, impl, fwd = build_encoder(a.tiny)
    dt = dtype_of(a.precision)
    model = model.to(dev, dt).eval()
    params = n_params(model, trainable_only=False)
    b = a.batch_encoder
    crops = torch.rand(b, 3, 256, 256, device=dev)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)

    @torch.inference_mode()
    def step():
        x = F.interpolate(crops, size=(224, 224), mode="bicubic", align_corners=False)
        x = ((x - mean) / std).to(dt)
        z = fwd(model, x)
        return z[:, 5:]  # drop cls + 4 registers: 256 tokens

    secs = time_iters(dev, a.warmup, a.iters, step)
    return report("encoder", "dinov2-reg-" + ("tiny" if a.tiny else "b"), dev, a.precision, b, a.warmup,
                  secs, params, impl + "; 256 crops -> bicubic 224 -> normalise -> ViT")


# ---------------------------------------------------------------------------------------------- DiT-DH


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, grid):
    """VisionRotaryEmbeddingFast layout: [rows half | columns half], dh/4 frequencies each, pairs repeated."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.arange(grid).float()
    f = torch.einsum("i,j->ij", pos, freqs).repeat_interleave(2, dim=-1)  # [grid, dim]
    f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], -1)
    f = f.reshape(grid * grid, head_dim)
    return f.cos(), f.sin()


def apply_rope(x, cos, sin):
    x2 = x.unflatten(-1, (-1, 2))
    rot = torch.stack([-x2[..., 1], x2[..., 0]], -1).flatten(-2)
    return x * cos + rot * sin


class DitBlock(nn.Module):
    def __init__(self, d, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        h = int(2 / 3 * int(d * mlp_ratio))  # SwiGLU hidden as the reference
        self.w12 = nn.Linear(d, 2 * h)
        self.w3 = nn.Linear(h, d)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c, cos, sin):
        # c: [B,1,D] (backbone) or [B,N,D] (head, per token)
        sm, cm, gm, sf, cf, gf = self.ada(c).chunk(6, -1)
        b, n, d = x.shape
        h = self.norm1(x) * (1 + cm) + sm
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gm * self.proj(a)
        h = self.norm2(x) * (1 + cf) + sf
        x1, x2 = self.w12(h).chunk(2, -1)
        return x + gf * self.w3(F.silu(x1) * x2)


def sincos_2d(d, grid):
    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)

    gh, gw = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one(d // 2, gw), one(d // 2, gh)], 1).float()[None]


class DitDh(nn.Module):
    """DiT-DH: backbone on x_t conditioned on t+y, then a wide head re-embedding x_t, modulated per token."""

    def __init__(self, hidden, depth, heads, in_ch=768, grid=16, classes=1000):
        super().__init__()
        de, dd = hidden
        self.in_ch, self.grid = in_ch, grid
        self.s_embedder = nn.Linear(in_ch, de)  # patch 1: a 1x1 conv == a linear map
        self.x_embedder = nn.Linear(in_ch, dd)
        self.s_projector = nn.Linear(de, dd) if de != dd else nn.Identity()
        self.register_buffer("t_W", torch.randn(256))  # Gaussian-Fourier frequencies, frozen
        self.t_mlp = nn.Sequential(nn.Linear(512, de), nn.SiLU(), nn.Linear(de, de))
        self.y_embedder = nn.Embedding(classes + 1, de)
        self.register_buffer("pos_embed", sincos_2d(de, grid))
        for name, d, h in (("enc", de, heads[0]), ("dec", dd, heads[1])):
            cos, sin = rope_tables(d // h, grid)
            self.register_buffer(name + "_cos", cos)
            self.register_buffer(name + "_sin", sin)
        self.enc = nn.ModuleList(DitBlock(de, heads[0]) for _ in range(depth[0]))
        self.dec = nn.ModuleList(DitBlock(dd, heads[1]) for _ in range(depth[1]))
        self.final_norm = RMSNorm(dd)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dd, 2 * dd))
        self.final_linear = nn.Linear(dd, in_ch)

    def forward(self, x, t, y):
        b = x.shape[0]
        tok = x.flatten(2).transpose(1, 2)  # [B, N, C]
        arg = 2 * math.pi * t[:, None] * self.t_W[None]
        t_emb = self.t_mlp(torch.cat([arg.sin(), arg.cos()], -1))
        c = F.silu(t_emb + self.y_embedder(y))[:, None]
        s = self.s_embedder(tok) + self.pos_embed
        for blk in self.enc:
            s = blk(s, c, self.enc_cos, self.enc_sin)
        s = self.s_projector(F.silu(s + t_emb[:, None]))
        h = self.x_embedder(tok)
        for blk in self.dec:
            h = blk(h, s, self.dec_cos, self.dec_sin)
        shift, scale = self.final_ada(s).chunk(2, -1)
        out = self.final_linear(self.final_norm(h) * (1 + scale) + shift)
        return out.transpose(1, 2).reshape(b, self.in_ch, self.grid, self.grid)


def build_ditdh(a, dev):
    """The DiT-DH of --ditdh (or --tiny), with any explicit shape options; (model, name, in_ch, grid, classes)."""
    torch.manual_seed(0)
    if a.tiny:
        spec, in_ch, grid, classes = dict(hidden=(48, 64), depth=(2, 1), heads=(4, 4)), 24, 4, 10
    else:
        spec, in_ch, grid, classes = dict(DITDH[a.ditdh]), 768, 16, 1000
    # Explicit shape options override the preset (e.g. the issue-10 small model:
    # --hidden 64,96 --depth 2,1 --heads 4,6 --in-channels 64 --grid 16 --classes 4).
    pair = lambda s: tuple(int(v) for v in s.split(","))
    for key, val in (("hidden", a.hidden), ("depth", a.depth), ("heads", a.heads)):
        if val:
            spec[key] = pair(val)
    in_ch, grid, classes = a.in_channels or in_ch, a.grid or grid, a.classes or classes
    model = DitDh(spec["hidden"], spec["depth"], spec["heads"], in_ch, grid, classes).to(dev)
    name = "ditdh-tiny" if a.tiny else "ditdh-" + a.ditdh
    if any((a.hidden, a.depth, a.heads, a.in_channels, a.grid, a.classes)):
        name = (f"ditdh h{spec['hidden']} d{spec['depth']} heads{spec['heads']} "
                f"{grid}x{grid}x{in_ch} {classes} classes")
    return model, name, in_ch, grid, classes


def bench_train(a, dev):
    model, name, in_ch, grid, classes = build_ditdh(a, dev)
    params = n_params(model)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=dev.type == "cuda")
    b = a.batch_train
    x = torch.randn(b, in_ch, grid, grid, device=dev)
    eps = torch.randn_like(x)
    t = torch.rand(b, device=dev)
    y = torch.arange(b, device=dev) % (classes + 1)
    tb = t.view(b, 1, 1, 1)
    x_t, target = (1 - tb) * x + tb * eps, eps - x
    amp = a.precision in ("bf16", "f16")

    def step():
        with torch.autocast(dev.type, dtype=dtype_of(a.precision), enabled=amp):
            v = model(x_t, t, y)
        loss = F.mse_loss(v.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.9995)
        return loss

    secs = time_iters(dev, a.warmup, a.iters, step)
    mode = f"{a.precision} autocast" if amp else "f32"
    return report("train", name, dev, a.precision, b, a.warmup, secs, params,
                  f"fwd+bwd+clip+AdamW+EMA, f32 weights, {mode}, sdpa; fixed inputs (no loader)")


def bench_sample(a, dev):
    """Euler ODE sampling with classifier-free guidance, as `rae-cache bench sample`: --steps grid points
    (steps - 1 model calls on the doubled batch [cond | null]), random weights, no autograd."""
    model, name, in_ch, grid, classes = build_ditdh(a, dev)
    model.eval()
    b = a.batch_sample
    z0 = torch.randn(b, in_ch, grid, grid, device=dev)
    y = torch.arange(b, device=dev) % classes
    y2 = torch.cat([y, torch.full_like(y, classes)])
    ts = torch.linspace(1.0, 0.0, a.steps, device=dev)  # noise (t=1) to data (t=0)
    amp = a.precision in ("bf16", "f16")

    @torch.no_grad()
    def run():
        x = z0
        for i in range(a.steps - 1):
            t = ts[i].expand(2 * b)
            with torch.autocast(dev.type, dtype=dtype_of(a.precision), enabled=amp):
                v = model(torch.cat([x, x]), t, y2).float()
            vc, vu = v.chunk(2)
            x = x + (ts[i + 1] - ts[i]) * (vu + a.cfg_scale * (vc - vu))
        return x

    secs = time_iters(dev, a.warmup, a.iters, run)
    return report("sample", name, dev, a.precision, b, a.warmup, secs, n_params(model),
                  f"Euler, {a.steps} grid points, cfg {a.cfg_scale} (model batch {2 * b}), random weights")


# ---------------------------------------------------------------------------------------------- decoder


class MaeLayer(nn.Module):
    """ViTMAE layer: layernorm_before -> attention -> residual -> layernorm_after -> GELU MLP -> residual."""

    def __init__(self, d, heads, mlp):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d, eps=1e-12)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.ln1(x)
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class RaeDecoder(nn.Module):
    def __init__(self, latent=768, hidden=1152, layers=28, heads=16, mlp=4096, patch=16, tokens=256):
        super().__init__()
        self.patch, self.grid = patch, int(round(tokens**0.5))
        self.embed = nn.Linear(latent, hidden)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        pos = torch.cat([torch.zeros(1, 1, hidden), sincos_2d(hidden, self.grid)], 1)
        self.register_buffer("pos", pos)
        self.layers = nn.ModuleList(MaeLayer(hidden, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.pred = nn.Linear(hidden, patch * patch * 3)

    def forward(self, z):
        b = z.shape[0]
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(z)], 1) + self.pos
        for layer in self.layers:
            h = layer(h)
        out = self.pred(self.norm(h)[:, 1:])
        g, p = self.grid, self.patch
        return out.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)


def bench_decoder(a, dev):
    torch.manual_seed(0)
    if a.tiny:
        model = RaeDecoder(latent=24, hidden=48, layers=2, heads=4, mlp=96, patch=16, tokens=16)
        latent, tokens = 24, 16
    else:
        s = DECODER[a.decoder]
        model = RaeDecoder(hidden=s["hidden"], layers=s["layers"], heads=s["heads"], mlp=s["mlp"])
        latent, tokens = 768, 256
    dt = dtype_of(a.precision)
    model = model.to(dev, dt).eval()
    params = n_params(model)
    b = a.batch_decoder
    z = torch.randn(b, tokens, latent, device=dev, dtype=dt)

    @torch.inference_mode()
    def step():
        return model(z)

    secs = time_iters(dev, a.warmup, a.iters, step)
    return report("decoder", "tiny" if a.tiny else a.decoder, dev, a.precision, b, a.warmup, secs, params,
                  "random weights, sdpa")


# ---------------------------------------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="encoder,train,decoder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="bf16", choices=["f32", "bf16", "f16"])
    p.add_argument("--batch", type=int, help="batch for every workload (overrides the three below)")
    p.add_argument("--batch-encoder", type=int, default=256)
    p.add_argument("--batch-train", type=int, default=64)
    p.add_argument("--batch-decoder", type=int, default=64)
    p.add_argument("--batch-sample", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="sample: grid points (steps - 1 model calls)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="sample: guidance scale")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ditdh", default="xl", choices=sorted(DITDH))
    p.add_argument("--decoder", default="vit-xl", choices=sorted(DECODER))
    p.add_argument("--hidden", help="train: backbone,head widths (overrides --ditdh), e.g. 64,96")
    p.add_argument("--depth", help="train: backbone,head depths, e.g. 2,1")
    p.add_argument("--heads", help="train: backbone,head head counts, e.g. 4,6")
    p.add_argument("--in-channels", type=int, help="train: latent channels (default 768)")
    p.add_argument("--grid", type=int, help="train: latent grid side (default 16)")
    p.add_argument("--classes", type=int, help="train: number of classes (default 1000)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke test")
    p.add_argument("--params-only", action="store_true", help="print parameter counts and exit")
    a = p.parse_args()
    if a.batch:
        a.batch_encoder = a.batch_train = a.batch_decoder = a.batch_sample = a.batch
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if a.params_only:
        with torch.device("meta"):
            spec = DITDH[a.ditdh]
            dit = DitDh(spec["hidden"], spec["depth"], spec["heads"])
            s = DECODER[a.decoder]
            dec = RaeDecoder(hidden=s["hidden"], layers=s["layers"], heads=s["heads"], mlp=s["mlp"])
        print(json.dumps({"what": "params", "impl": "pytorch", "ditdh-" + a.ditdh: n_params(dit),
                          a.decoder: n_params(dec)}), flush=True)
        return 0

    benches = {"encoder": bench_encoder, "train": bench_train, "decoder": bench_decoder, "sample": bench_sample}
    status = 0
    for w in [w.strip() for w in a.what.split(",") if w.strip()]:
        if w not in benches:
            p.error(f"unknown workload {w!r}")
        try:
            print(json.dumps(benches[w](a, dev)), flush=True)
        except Exception as e:  # one failure (e.g. out of memory) must not hide the others
            print(json.dumps({"what": w, "impl": "pytorch", "device": dev.type, "error": f"{type(e).__name__}: {e}"}),
                  flush=True)
            status = 1
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
    return status


if __name__ == "__main__":
    sys.exit(main())
