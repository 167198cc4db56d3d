#!/usr/bin/env python3
"""Oracle fixtures for `rae_cache::eval::recon_run` (eval-recon): PSNR, SSIM,
LPIPS and rFID of uint8 (original, reconstruction) pairs, computed by the
reference code where it can run here:

* PSNR and SSIM: bytetriper/RAE `src/eval/ref_iqa.py` (`calculate_psnr`,
  `calculate_ssim`: torchmetrics' SSIM), imported from a fetched copy at run
  time (`--rae-src`), float32 on CPU as the reference runs; also in f64 (an
  f64 numpy transcription of the PSNR formula, torchmetrics' SSIM on float64
  tensors).
* LPIPS: the same file's `calculate_lpips` with the reference `LPIPS` class
  of `src/eval/utils.py`, its VGG16 and linear heads swapped for the small
  stage-1 fixtures (`tests/fixtures/rae-ref/stage1-gen/vgg16-small.pth`,
  `lpips-lin-small.pth`; the reference builds the lin layers at the full
  VGG widths, so a subclass builds them at the small ones and the
  reference loader fills them).
* rFID: RAE calls torch-fidelity (not installable here); the oracle is the
  same protocol from independent parts: pytorch-fid's FID Inception with the
  formula weights of `features/inception-weights.json`, the numpy TF1
  bilinear resize to 299 and (x - 128) / 128 of make_feature_fixtures.py,
  and ADM's scipy `sqrtm` Frechet distance of make_eval_fixtures.py (FD of
  reconstructions vs originals).

Writes tests/fixtures/eval/recon.safetensors (`original`, `recon` uint8
[N, H, W, 3], per-image `psnr`, `ssim`, `lpips`) and recon.json (the means).
Run: /work/venv-torch/bin/python scripts/make_recon_fixtures.py --rae-src /tmp/rae-ref
(`git --git-dir=/work/.mirror/bytetriper+RAE/repo archive HEAD src | tar -x -C /tmp/rae-ref`).
"""

import argparse
import importlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_eval_fixtures as mef  # noqa: E402
import make_feature_fixtures as mff  # noqa: E402

STAGE1 = ROOT / "tests/fixtures/rae-ref/stage1-gen"
OUT = ROOT / "tests/fixtures/eval"
N, SIDE = 6, 40


def load_reference(rae_src: Path):
    """`src/eval` as a package without running its __init__ (which imports
    torch-fidelity): ref_iqa and utils only."""
    sys.path.insert(0, str(rae_src / "src"))
    sys.modules.setdefault("requests", types.ModuleType("requests"))
    pkg = types.ModuleType("rae_eval")
    pkg.__path__ = [str(rae_src / "src/eval")]
    sys.modules["rae_eval"] = pkg
    return importlib.import_module("rae_eval.ref_iqa"), importlib.import_module("rae_eval.utils")


def small_lpips_class(utils):
    vgg_state = torch.load(STAGE1 / "vgg16-small.pth")
    lin_state = torch.load(STAGE1 / "lpips-lin-small.pth")
    chns = [lin_state[f"lin{k}.model.1.weight"].shape[1] for k in range(5)]
    cfg = []
    # torchvision layout: features.N.weight for the 13 convs, "M" between stages
    idx = sorted(int(k.split(".")[1]) for k in vgg_state if k.endswith(".weight"))
    from torchvision.models.vgg import VGG, make_layers
    widths = [vgg_state[f"features.{i}.weight"].shape[0] for i in idx]
    stages = [2, 2, 3, 3, 3]
    w = iter(widths)
    for s in stages:
        cfg += [next(w) for _ in range(s)] + ["M"]

    def vgg16(**_):
        net = VGG(make_layers(cfg, batch_norm=False), init_weights=False)
        net.load_state_dict(vgg_state, strict=False)
        return net

    utils.models.vgg16 = vgg16
    utils.get_ckpt_path = lambda _name: str(STAGE1 / "lpips-lin-small.pth")

    class SmallLPIPS(utils.LPIPS):
        def __init__(self, use_dropout=True):
            nn.Module.__init__(self)
            self.scaling_layer = utils.ScalingLayer()
            self.chns = chns
            self.net = utils.VGG16(requires_grad=False)
            for k, c in enumerate(chns):
                setattr(self, f"lin{k}", utils.NetLinLayer(c, use_dropout=use_dropout))
            self.load_from_pretrained()
            for k in range(5):
                assert torch.equal(getattr(self, f"lin{k}").model[1].weight, lin_state[f"lin{k}.model.1.weight"])

    return SmallLPIPS


def pairs():
    """Smooth structured originals, reconstructions with per-image noise and
    a blur, one pair identical (the PSNR clamp)."""
    rng = np.random.default_rng(7)
    yy, xx = np.meshgrid(np.linspace(0, 1, SIDE), np.linspace(0, 1, SIDE), indexing="ij")
    orig = np.zeros((N, SIDE, SIDE, 3), np.float64)
    for i in range(N):
        for c in range(3):
            f = 2 + i + c
            orig[i, :, :, c] = 128 + 100 * np.sin(f * xx + (c + 1) * yy + i) * np.cos(3 * yy - i * xx)
    orig = np.clip(np.round(orig + rng.normal(0, 6, orig.shape)), 0, 255).astype(np.uint8)
    recon = orig.astype(np.float64)
    for i in range(N - 1):
        blurred = (np.roll(recon[i], 1, 0) + np.roll(recon[i], -1, 1) + 2 * recon[i]) / 4
        recon[i] = blurred + rng.normal(0, 3 + 6 * i, recon[i].shape)
    recon = np.clip(np.floor(recon), 0, 255).astype(np.uint8)
    recon[N - 1] = orig[N - 1]
    return orig, recon


def inception_pool(images_u8):
    import torchvision
    import pytorch_fid.inception as pfi

    template = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                               init_weights=False).state_dict()
    sd = {}
    for s in mff.inception_spec(template):
        sd[s["name"]] = torch.from_numpy(mff.formula(s["name"], s["shape"], s["offset"], s["scale"], mff.SEED))
    for name, t in template.items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.zeros_like(t)
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    model = pfi.InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True).eval()
    x = images_u8.transpose(0, 3, 1, 2).astype(np.float32)
    x = mff.tf1_resize_bilinear(x, 299, 299)
    x = (x - np.float32(128)) / np.float32(128)
    with torch.no_grad():
        return model(torch.from_numpy(x))[0].reshape(len(x), 2048).numpy().astype(np.float64)


def psnr_f64(a, b):
    x, y = a.astype(np.float64) / 255, b.astype(np.float64) / 255
    mse = np.maximum(((x - y) ** 2).mean(axis=(1, 2, 3)), 1e-10)
    return 20 * np.log10(1 / np.sqrt(mse))


def ssim_f64(a, b):
    from torchmetrics.functional.image.ssim import structural_similarity_index_measure

    t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255  # noqa: E731
    return float(structural_similarity_index_measure(target=t(a), preds=t(b), data_range=1.0,
                                                      reduction="none").mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rae-src", default="/tmp/rae-ref")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    ref_iqa, utils = load_reference(Path(args.rae_src))
    ref_iqa.LPIPS = small_lpips_class(utils)
    orig, recon = pairs()
    # per image: batch size 1 gives each image's value as the mean of one
    per = {
        "psnr": [ref_iqa.calculate_psnr(orig[i:i + 1], recon[i:i + 1], 1, "cpu") for i in range(N)],
        "ssim": [ref_iqa.calculate_ssim(orig[i:i + 1], recon[i:i + 1], 1, "cpu") for i in range(N)],
        "lpips": [ref_iqa.calculate_lpips(orig[i:i + 1], recon[i:i + 1], 1, "cpu") for i in range(N)],
    }
    means = {
        "psnr": ref_iqa.calculate_psnr(orig, recon, 4, "cpu"),
        "psnr_f64": float(psnr_f64(orig, recon).mean()),
        "ssim": ref_iqa.calculate_ssim(orig, recon, 4, "cpu"),
        # the same torchmetrics call in float64: the f32 reference carries
        # ~1e-5 of cancellation error (E[x^2] - E[x]^2)
        "ssim_f64": ssim_f64(orig, recon),
        "lpips": ref_iqa.calculate_lpips(orig, recon, 4, "cpu"),
    }
    fo, fr = inception_pool(orig), inception_pool(recon)
    mo, so = mef.stats(fo)
    mr, sr = mef.stats(fr)
    means["rfid"] = mef.frechet_adm(mr, sr, mo, so)
    print(json.dumps(means, indent=1))
    OUT.mkdir(parents=True, exist_ok=True)
    mff.save_st(str(OUT / "recon.safetensors"), {
        "original": orig,
        "recon": recon,
        "psnr": np.array(per["psnr"], np.float64),
        "ssim": np.array(per["ssim"], np.float64),
        "lpips": np.array(per["lpips"], np.float64),
        "pool_original": fo.astype(np.float32),
        "pool_recon": fr.astype(np.float32),
    })
    with open(OUT / "recon.json", "w") as f:
        json.dump({
            "means": means,
            "lpips": {"vgg": "stage1-gen/vgg16-small.pth", "lin": "stage1-gen/lpips-lin-small.pth"},
            "inception": "features/inception-weights.json",
            "source": "scripts/make_recon_fixtures.py (bytetriper/RAE src/eval/ref_iqa.py, src/eval/utils.py; "
                      "pytorch-fid InceptionV3; ADM frechet)",
        }, f, indent=1)


if __name__ == "__main__":
    main()
