#!/usr/bin/env python3
"""Fixtures for the evaluation feature networks (src/features/).

Run with the reference venv:  /work/venv-torch/bin/python scripts/make_feature_fixtures.py

Writes tests/fixtures/rae-ref/features/:

* inception-weights.json     how to rebuild the random Inception weights
                             (the network is fixed-size, ~95 MB in f32, so the
                             weights are not committed: every tensor is
                             `offset + scale * (2u - 1)` with u a 24-bit
                             splitmix64 hash of (fnv1a64(name) ^ seed, index),
                             exact in f32 on both sides; the Rust test
                             rebuilds them and writes a temporary safetensors)
* inception-io.safetensors   input images (uint8 values, non-299 size) and
                             pytorch-fid's outputs: pool_3 (2048), the sFID
                             spatial tensor (Mixed_6d.branch1x1 after ReLU,
                             NHWC, first 7 channels, flattened h,w,c) and the
                             unbiased logits pool @ fc.weight^T
* tf1-resize.safetensors     TF1 `resize_bilinear` (align_corners=False,
                             half_pixel_centers=False) numpy transcription
                             on small up/down cases
* pth-zip.pth / pth-legacy.pth  a few formula tensors saved with
                             torch.save in the zip and the legacy format
* dinov2-small/              HF-layout Dinov2Model (small random config,
                             same architecture as ViT-L/14) + fd-dinov2-io
                             .safetensors: images and the hub model's
                             CLS-after-final-LayerNorm at 224 (dgm-eval path:
                             PIL bicubic resize, ToTensor, ImageNet
                             normalisation, hub position-table resize)

The Inception forward is pytorch-fid's own FID Inception (FIDInceptionA/C/
E_1/E_2 blocks) with `resize_input=False, normalize_input=False`, fed the
numpy TF1 resize and (x - 128) / 128, as the TF graph the ADM evaluator
uses does. The DINOv2 reference is facebookresearch/dinov2's own
DinoVisionTransformer (imported from a fetched copy at run time, see
--dinov2-src), which is what torch.hub (dgm-eval, EDM2) runs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "rae-ref", "features")
SEED = 20251203
MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------- formula weights
def fnv1a64(s: str) -> int:
    h = 0xCBF29CE484222325
    for b in s.encode():
        h ^= b
        h = (h * 0x100000001B3) & MASK64
    return h


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def formula(name: str, shape, offset: float, scale: float, seed: int) -> np.ndarray:
    n = int(np.prod(shape)) if len(shape) else 1
    base = np.uint64(fnv1a64(name) ^ seed)
    with np.errstate(over="ignore"):
        idx = np.arange(n, dtype=np.uint64) + base
    u = (splitmix64(idx) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    v = np.float32(offset) + np.float32(scale) * (np.float32(2.0) * u - np.float32(1.0))
    return v.astype(np.float32).reshape(shape)


def inception_spec(template):
    """(name, shape, offset, scale) for every float tensor of the state dict."""
    spec = []
    for name, t in template.items():
        if name.endswith("num_batches_tracked"):
            continue
        shape = list(t.shape)
        if name.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            off, sc = 0.0, float(np.sqrt(6.0 / fan_in))
        elif name.endswith("bn.weight"):
            off, sc = 1.0, 0.5
        elif name.endswith("bn.bias") or name.endswith("bn.running_mean"):
            off, sc = 0.0, 0.2
        elif name.endswith("bn.running_var"):
            off, sc = 1.0, 0.5
        elif name == "fc.weight":
            off, sc = 0.0, float(np.sqrt(3.0 / shape[1]))
        elif name == "fc.bias":
            off, sc = 0.0, 0.1
        else:
            raise SystemExit(f"unexpected tensor {name}")
        spec.append({"name": name, "shape": shape, "offset": off, "scale": sc})
    return spec


# ---------------------------------------------------------------- TF1 bilinear
def tf1_resize_bilinear(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """TF1 `ResizeBilinear` (align_corners=False, half_pixel_centers=False),
    transcribed from tensorflow/core/kernels/image/resize_bilinear_op.cc:
    scale = in/out in f32, src = dst * scale, lo = floor(src),
    hi = min(ceil(src), in - 1), lerp = src - lo, then
    top = tl + (tr - tl) * xl, bottom = bl + (br - bl) * xl,
    out = top + (bottom - top) * yl, all f32. x: [N, C, H, W] f32."""
    x = x.astype(np.float32)
    ih, iw = x.shape[2], x.shape[3]

    def weights(insz, outsz):
        scale = np.float32(insz) / np.float32(outsz)
        src = np.arange(outsz, dtype=np.float32) * scale
        lo = np.floor(src)
        hi = np.minimum(np.ceil(src), np.float32(insz - 1))
        lerp = (src - lo).astype(np.float32)
        return lo.astype(np.int64), hi.astype(np.int64), lerp

    ylo, yhi, yl = weights(ih, oh)
    xlo, xhi, xl = weights(iw, ow)
    tl = x[:, :, ylo][:, :, :, xlo]
    tr = x[:, :, ylo][:, :, :, xhi]
    bl = x[:, :, yhi][:, :, :, xlo]
    br = x[:, :, yhi][:, :, :, xhi]
    xl = xl[None, None, None, :]
    yl = yl[None, None, :, None]
    top = tl + (tr - tl) * xl
    bottom = bl + (br - bl) * xl
    return (top + (bottom - top) * yl).astype(np.float32)


def save_st(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


# ---------------------------------------------------------------- Inception
def make_inception(out, full_pth=None):
    import torchvision
    import pytorch_fid.inception as pfi

    template = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, weights=None, init_weights=False
    ).state_dict()
    spec = inception_spec(template)
    sd = {}
    for s in spec:
        sd[s["name"]] = torch.from_numpy(formula(s["name"], s["shape"], s["offset"], s["scale"], SEED))
    for name, t in template.items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.zeros_like(t)
    n_params = sum(int(np.prod(s["shape"])) for s in spec)
    if full_pth:
        import collections
        os.makedirs(full_pth, exist_ok=True)
        full = collections.OrderedDict(sd)
        torch.save(full, os.path.join(full_pth, "inception-zip.pth"))
        torch.save(full, os.path.join(full_pth, "inception-legacy.pth"), _use_new_zipfile_serialization=False)

    # pytorch-fid's own FID Inception, with our weights instead of the download.
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    model = pfi.InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True)
    model.eval()
    mixed_6d = model.blocks[2][6]
    assert type(mixed_6d).__name__ == "FIDInceptionC" and mixed_6d.branch7x7_1.conv.out_channels == 160
    taps = {}
    mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("spatial", o))

    rng = np.random.default_rng(SEED)
    # Non-square, non-299: exercises both resize axes (an upsample).
    images = rng.integers(0, 256, size=(2, 3, 83, 61)).astype(np.float32)
    # Smooth content too, so the features are not only noise responses.
    yy, xx = np.meshgrid(np.linspace(0, 1, 83), np.linspace(0, 1, 61), indexing="ij")
    images[1, 0] = np.round(255 * (0.5 + 0.5 * np.sin(6 * xx + 3 * yy)))
    x = tf1_resize_bilinear(images, 299, 299)
    x = (x - np.float32(128)) / np.float32(128)
    with torch.no_grad():
        pool = model(torch.from_numpy(x))[0].reshape(2, 2048)
        spatial = taps["spatial"]
        assert tuple(spatial.shape) == (2, 192, 17, 17)
        spatial = spatial.permute(0, 2, 3, 1)[..., :7].reshape(2, -1)
        logits = pool @ sd["fc.weight"].T
    print("inception: params", n_params, "pool mean/max", float(pool.mean()), float(pool.max()),
          "spatial max", float(spatial.max()), "logits std", float(logits.std()))
    assert float(pool.std()) > 1e-3, "degenerate features: adjust the weight scales"
    save_st(os.path.join(out, "inception-io.safetensors"), {
        "images": images,
        "pool": pool.numpy(),
        "spatial": spatial.numpy(),
        "logits": logits.numpy(),
    })
    with open(os.path.join(out, "inception-weights.json"), "w") as f:
        json.dump({
            "formula": "offset + scale * (2u - 1), u = (splitmix64(fnv1a64(name) ^ seed + i) >> 40) / 2^24, f32",
            "seed": SEED,
            "bn_eps": 0.001,
            "tensors": spec,
        }, f, indent=1)

    # The pickle readers: a few of the same tensors in both torch formats.
    small = {k: sd[k] for k in ["Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "fc.bias"]}
    small["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(7)
    # A non-contiguous view (stride != row-major), as a transposed weight.
    small["transposed"] = sd["Conv2d_2a_3x3.conv.weight"][:4, :3, 0, 0].t()
    small["half"] = sd["fc.bias"][:10].half()
    # A view at an offset into a storage shared with another entry.
    small["offset_view"] = sd["fc.bias"][3:9]
    # Saved like a module's state_dict(): an OrderedDict with `_metadata`.
    import collections
    expected = dict(small)
    small = collections.OrderedDict(small)
    small._metadata = collections.OrderedDict({"": {"version": 1}, "Conv2d_1a_3x3.bn": {"version": 2}})
    torch.save(small, os.path.join(out, "pth-zip.pth"))
    torch.save(small, os.path.join(out, "pth-legacy.pth"), _use_new_zipfile_serialization=False)
    save_st(os.path.join(out, "pth-expected.safetensors"),
            {k: v.contiguous().numpy() for k, v in expected.items() if k != "Conv2d_1a_3x3.bn.num_batches_tracked"})


def make_tf1_resize(out):
    rng = np.random.default_rng(SEED + 1)
    cases = {}
    for i, (ih, iw, oh, ow) in enumerate([(5, 7, 13, 11), (17, 9, 6, 4), (8, 8, 8, 8), (64, 48, 71, 83)]):
        x = rng.integers(0, 256, size=(1, 2, ih, iw)).astype(np.float32)
        cases[f"case{i}.input"] = x
        cases[f"case{i}.output"] = tf1_resize_bilinear(x, oh, ow)
    save_st(os.path.join(out, "tf1-resize.safetensors"), cases)


# ---------------------------------------------------------------- DINOv2
def hub_to_hf(sd, depth, dim):
    """facebookresearch/dinov2 key names -> transformers Dinov2Model names."""
    m = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(depth):
        h, b = f"blocks.{i}.", f"encoder.layer.{i}."
        qw = sd[h + "attn.qkv.weight"]
        qb = sd[h + "attn.qkv.bias"]
        for j, n in enumerate(["query", "key", "value"]):
            m[b + f"attention.attention.{n}.weight"] = qw[j * dim:(j + 1) * dim]
            m[b + f"attention.attention.{n}.bias"] = qb[j * dim:(j + 1) * dim]
        pairs = [("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.output.dense"),
                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
        for src, dst in pairs:
            m[b + dst + ".weight"] = sd[h + src + ".weight"]
            m[b + dst + ".bias"] = sd[h + src + ".bias"]
        m[b + "layer_scale1.lambda1"] = sd[h + "ls1.gamma"]
        m[b + "layer_scale2.lambda1"] = sd[h + "ls2.gamma"]
    return {k: v.contiguous() for k, v in m.items()}


def make_dinov2(out, src):
    from PIL import Image
    import torchvision.transforms as TF
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    sys.path.insert(0, src)
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(SEED)
    dim, depth, heads = 32, 2, 2
    # vit_large's arguments (hub/backbones.py), at a small width and depth.
    hub = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads,
                                mlp_ratio=4, init_values=1.0, ffn_layer="mlp", block_chunks=0,
                                num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
    with torch.no_grad():
        for n, p in hub.named_parameters():
            if "norm" in n and n.endswith("weight") or n.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    hub.eval()

    hf_sd = hub_to_hf(hub.state_dict(), depth, dim)
    cfg = Dinov2Config(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=4,
                       image_size=518, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu",
                       qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False)
    # Saved with the key names of the published checkpoints (what our
    # loader reads); transformers maps them onto its modules at load.
    ddir = os.path.join(out, "dinov2-small")
    os.makedirs(ddir, exist_ok=True)
    save_file(hf_sd, os.path.join(ddir, "model.safetensors"))
    cfg_d = cfg.to_dict()
    cfg_d["architectures"] = ["Dinov2Model"]
    with open(os.path.join(ddir, "config.json"), "w") as f:
        json.dump(cfg_d, f, indent=1)
    with open(os.path.join(ddir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                   "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}, f, indent=1)
    hf, info = Dinov2Model.from_pretrained(ddir, output_loading_info=True)
    hf.eval()
    missing = [k for k in info["missing_keys"] if "pooler" not in k]
    assert not missing and not info["unexpected_keys"], info
    # The key mapping is right: at the native 518 grid (no position resize)
    # HF and hub agree.
    with torch.no_grad():
        probe = torch.randn(1, 3, 518, 518)
        d = (hf(pixel_values=probe).pooler_output - hub(probe)).abs().max()
    print("dinov2: HF vs hub at 518:", float(d))
    assert d < 1e-4

    # dgm-eval's DINOv2Encoder.transform on PIL images, then model(x).
    rng = np.random.default_rng(SEED + 2)
    images = rng.integers(0, 256, size=(2, 150, 200, 3), dtype=np.uint8)
    yy, xx = np.meshgrid(np.linspace(0, 1, 150), np.linspace(0, 1, 200), indexing="ij")
    images[1, :, :, 1] = np.round(255 * (0.5 + 0.5 * np.cos(9 * xx - 4 * yy))).astype(np.uint8)
    tf = TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor()])
    norm = TF.Normalize(np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
    resized = torch.stack([tf(Image.fromarray(im).convert("RGB")) for im in images])
    x = torch.stack([norm(r) for r in resized])
    with torch.no_grad():
        feats = hub(x)
        # What the hub does to the position table at 224 (for diagnosis).
        pos = hub.interpolate_pos_encoding(torch.zeros(1, 257, dim), 224, 224)[0, 1:]
        # HF's size= interpolation instead, to show that the choice matters.
        hf_feats = hf(pixel_values=x).pooler_output
    print("dinov2: CLS std", float(feats.std()), "hub vs HF position resize, max |d|:",
          float((feats - hf_feats).abs().max()))
    save_st(os.path.join(out, "fd-dinov2-io.safetensors"), {
        "images": images.transpose(0, 3, 1, 2).copy(),
        "resized": np.round(resized.numpy() * 255).astype(np.uint8),
        "pos_224": pos.numpy(),
        "features": feats.numpy(),
        "features_hf_pos": hf_feats.numpy(),
    })


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--dinov2-src", default=None,
                    help="a checkout holding dinov2/ (default: git archive of the fetched mirror)")
    ap.add_argument("--dinov2-git", default="/work/.mirror/facebookresearch+dinov2/repo")
    ap.add_argument("--full-pth", default=None,
                    help="also write the whole random Inception as DIR/inception-{zip,legacy}.pth (95 MB each, "
                         "not committed) for the ignored test features::inception_from_pth")
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    src = args.dinov2_src
    if src is None:
        src = tempfile.mkdtemp(prefix="dinov2-ref-")
        subprocess.run(f"git --git-dir={args.dinov2_git} archive HEAD dinov2 | tar -x -C {src}",
                       shell=True, check=True)
    make_tf1_resize(args.out)
    make_inception(args.out, args.full_pth)
    make_dinov2(args.out, src)
    print("wrote", os.path.abspath(args.out))


if __name__ == "__main__":
    main()
