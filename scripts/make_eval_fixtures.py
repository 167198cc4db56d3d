#!/usr/bin/env python3
"""Oracle fixtures for `rae_cache::eval` (FD, Inception Score, precision/recall).

A numpy/scipy transcription of the formulas of the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`), written from reading it:

* FD: `np.cov(rowvar=False)` (ddof 1), `scipy.linalg.sqrtm(s1 @ s2)`, the
  1e-6 eps retry when the result is not finite, the real part, the trace.
  The means are taken in f64 (ADM's are f32 `np.mean`; the Rust side is f64).
* IS: softmax over the logits in float32, contiguous splits of `split_size`
  rows in file order, exp(mean_rows(sum_classes p (log p - log mean p))),
  arithmetic mean of the split scores (float32 arithmetic as numpy does
  with ADM's float32 predictions; an f64 value is stored too).
* Precision/recall (ManifoldEstimator, k=3): squared distances
  max(|u|^2 - 2 u.v + |v|^2, 0) with the features cast to float16, the norm
  and dot accumulations done in float32 then rounded to float16, the final
  subtraction/addition in float16 arithmetic; a (row block x column block)
  tile with any non-finite value is recomputed in float32. Radius = 4th
  smallest distance within the own set (self included); a point is covered
  when some distance <= the other point's radius.

Writes tests/fixtures/eval/{eval.safetensors, expected.json}.
Run: /work/venv-torch/bin/python scripts/make_eval_fixtures.py
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file
from scipy import linalg

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "eval")


def frechet_adm(mu1, sigma1, mu2, sigma2, eps=1e-6):
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("imaginary component")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def stats(x):
    x = x.astype(np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def softmax_f32(logits):
    z = logits.astype(np.float32)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def inception_score(preds, split_size):
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def dist_f16(u, v):
    u16 = u.astype(np.float16)
    v16 = v.astype(np.float16)
    uf, vf = u16.astype(np.float32), v16.astype(np.float32)
    nu = (uf * uf).sum(1, dtype=np.float32).astype(np.float16)
    nv = (vf * vf).sum(1, dtype=np.float32).astype(np.float16)
    dot = (uf @ vf.T).astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        d = (nu[:, None] - np.float16(2) * dot) + nv[None, :]
        d = np.maximum(d, np.float16(0))
    return d


def dist_f32(u, v):
    u = u.astype(np.float32)
    v = v.astype(np.float32)
    nu = (u * u).sum(1, dtype=np.float32)
    nv = (v * v).sum(1, dtype=np.float32)
    return np.maximum(nu[:, None] - np.float32(2) * (u @ v.T) + nv[None, :], np.float32(0))


def distances(u, v, mode):
    if mode == "f32":
        return dist_f32(u, v), False
    d = dist_f16(u, v)
    if np.isfinite(d).all():
        return d.astype(np.float32), False
    return dist_f32(u, v), True


def radii(feats, k, block, mode):
    n = len(feats)
    out = np.zeros([n], dtype=np.float32)
    fallbacks = 0
    for b1 in range(0, n, block):
        e1 = min(b1 + block, n)
        row = np.zeros([e1 - b1, n], dtype=np.float32)
        for b2 in range(0, n, block):
            e2 = min(b2 + block, n)
            row[:, b2:e2], fb = distances(feats[b1:e1], feats[b2:e2], mode)
            fallbacks += fb
        out[b1:e1] = np.partition(row, np.arange(k + 1), axis=1)[:, k]
    return out, fallbacks


def precision_recall(real, fake, k, block, mode):
    r_real, fb1 = radii(real, k, block, mode)
    r_fake, fb2 = radii(fake, k, block, mode)
    real_in = np.zeros([len(real)], dtype=bool)
    fake_in = np.zeros([len(fake)], dtype=bool)
    fb3 = 0
    for b1 in range(0, len(real), block):
        for b2 in range(0, len(fake), block):
            d, fb = distances(real[b1 : b1 + block], fake[b2 : b2 + block], mode)
            fb3 += fb
            real_in[b1 : b1 + block] |= (d <= r_fake[None, b2 : b2 + block]).any(1)
            fake_in[b2 : b2 + block] |= (d <= r_real[b1 : b1 + block, None]).any(0)
    return {
        "precision": float(fake_in.mean()),
        "recall": float(real_in.mean()),
        "radii_real": r_real,
        "radii_fake": r_fake,
        "fallback_tiles": int(fb1 + fb2 + fb3),
    }


def main():
    rng = np.random.default_rng(20261203)
    os.makedirs(OUT, exist_ok=True)
    tensors = {}
    expected = {"source": "scripts/make_eval_fixtures.py (numpy/scipy transcription of ADM evaluator.py)"}

    # --- Frechet distance: correlated Gaussian features, well conditioned.
    d = 64
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = (rng.normal(size=(400, d)) @ (np.eye(d) + 0.5 * mix)).astype(np.float32)
    mix2 = rng.normal(size=(d, d)) / np.sqrt(d)
    b = (rng.normal(size=(300, d)) @ (0.8 * np.eye(d) + 0.4 * mix2) + 0.3).astype(np.float32)
    small = (rng.normal(size=(40, d)) + 0.1).astype(np.float32)  # n < d: singular covariance
    tensors["fd.a"], tensors["fd.b"], tensors["fd.small"] = a, b, small
    (mu_a, s_a), (mu_b, s_b), (mu_c, s_c) = stats(a), stats(b), stats(small)
    tensors["fd.mu_a"], tensors["fd.sigma_a"] = mu_a, s_a
    expected["fd"] = {
        "a_b": frechet_adm(mu_a, s_a, mu_b, s_b),
        "b_a": frechet_adm(mu_b, s_b, mu_a, s_a),
        "a_a": frechet_adm(mu_a, s_a, mu_a, s_a),
        "a_small": frechet_adm(mu_a, s_a, mu_c, s_c),
    }

    # --- Inception Score: 1008-way logits, uneven last split.
    n_is, split = 300, 128
    centers = rng.normal(size=(40, 1008)) * 3.0
    logits = (centers[rng.integers(0, 40, n_is)] + rng.normal(size=(n_is, 1008))).astype(np.float32)
    tensors["is.logits"] = logits
    preds = softmax_f32(logits)
    z = logits.astype(np.float64)
    z -= z.max(1, keepdims=True)
    p64 = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    expected["is"] = {
        "split_size": split,
        "adm_f32": inception_score(preds, split),
        "f64": inception_score(p64, split),
        "splits_f64": [inception_score(p64[i : i + split], split) for i in range(0, n_is, split)],
    }

    # --- Precision/recall, k=3. Quantised features (multiples of 1/4): every
    # product and sum is exact in f32, so the f16 roundings are the only
    # inexact step and are the same in any summation order; ties at the
    # radius are frequent, which exercises `<=`.
    k, block = 3, 128
    dim = 32
    real_q = np.round(rng.normal(size=(300, dim)) * 6 * 4) / 4
    fake_q = np.round((rng.normal(size=(350, dim)) * 6.6 + 0.9) * 4) / 4
    real_q, fake_q = real_q.astype(np.float32), fake_q.astype(np.float32)
    tensors["pr.real"], tensors["pr.fake"] = real_q, fake_q
    # Large rows overflow f16 (|u|^2 > 65504): their tiles fall back to f32.
    real_big, fake_big = real_q.copy(), fake_q.copy()
    real_big[:5] *= 12.0
    fake_big[200:203] *= 12.0
    tensors["pr.real_big"], tensors["pr.fake_big"] = real_big, fake_big
    # Continuous features: f16 rounding of f32 sums (order-dependent in rare cases).
    real_c = rng.normal(size=(260, 48)).astype(np.float32) * 10
    fake_c = (rng.normal(size=(270, 48)) * 11 + 0.7).astype(np.float32)
    tensors["pr.real_cont"], tensors["pr.fake_cont"] = real_c, fake_c
    expected["pr"] = {"k": k, "block": block}
    for name, (r, f) in {
        "quant": (real_q, fake_q),
        "big": (real_big, fake_big),
        "cont": (real_c, fake_c),
    }.items():
        for mode in ["f16", "f32"]:
            res = precision_recall(r, f, k, block, mode)
            key = f"{name}_{mode}"
            tensors[f"pr.{key}.radii_real"] = res["radii_real"]
            tensors[f"pr.{key}.radii_fake"] = res["radii_fake"]
            expected["pr"][key] = {
                "precision": res["precision"],
                "recall": res["recall"],
                "fallback_tiles": res["fallback_tiles"],
            }
    for name in ["quant", "big", "cont"]:
        a16, a32 = tensors[f"pr.{name}_f16.radii_real"], tensors[f"pr.{name}_f32.radii_real"]
        expected["pr"][f"{name}_f16"]["radii_real_differ_from_f32"] = int((a16 != a32).sum())
    # ADM's block size (10000) on the quantised set: one tile per pair of sets.
    res = precision_recall(real_q, fake_q, k, 10000, "f16")
    expected["pr"]["quant_f16_block10000"] = {"precision": res["precision"], "recall": res["recall"]}

    # --- PSNR / SSIM oracle (numpy): RAE averages per-image PSNR on [0,1]
    # (MSE clamped at 1e-10) and uses torchmetrics SSIM (Gaussian 11, sigma
    # 1.5, k1 0.01, k2 0.03, data range 1, variances clamped at 0). Since
    # torchmetrics 1.5 (PR #2721) the mean is over the whole reflect-padded
    # image ("full"); before, and in skimage, over the valid region only.
    x = rng.uniform(size=(3, 3, 24, 20)).astype(np.float32)
    y = np.clip(x + rng.normal(scale=0.08, size=x.shape), 0, 1).astype(np.float32)
    y[2] = x[2]  # an exact reconstruction: PSNR from the 1e-10 clamp (100 dB)
    tensors["rec.x"], tensors["rec.y"] = x, y
    expected["rec"] = {
        "psnr": psnr(x, y),
        "ssim": ssim(x, y),
        "ssim_per_image": [ssim(x[i : i + 1], y[i : i + 1]) for i in range(3)],
        "ssim_valid_per_image": [ssim(x[i : i + 1], y[i : i + 1], border="valid") for i in range(3)],
    }

    for kname in list(tensors):
        t = tensors[kname]
        tensors[kname] = np.ascontiguousarray(t)
    save_file(tensors, os.path.join(OUT, "eval.safetensors"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print(json.dumps({k: v for k, v in expected.items() if k != "source"}, indent=1)[:3000])


def psnr(x, y):
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(1)
    return float(np.mean(20 * np.log10(1.0 / np.sqrt(np.maximum(mse, 1e-10)))))


def gauss(size=11, sigma=1.5):
    d = np.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    g = np.exp(-((d / sigma) ** 2) / 2)
    return g / g.sum()


def filt_valid(img, g):
    # separable valid correlation over the last two axes
    k = len(g)
    h, w = img.shape[-2:]
    rows = sum(g[i] * img[..., i : h - k + 1 + i, :] for i in range(k))
    return sum(g[j] * rows[..., :, j : w - k + 1 + j] for j in range(k))


def ssim(x, y, data_range=1.0, border="full"):
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    if border == "full":
        # torchmetrics >= 1.5 (PR #2721): reflect-pad by 5, mean over the whole image
        pad = [(0, 0), (0, 0), (5, 5), (5, 5)]
        x, y = np.pad(x, pad, mode="reflect"), np.pad(y, pad, mode="reflect")
    g = gauss()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt_valid(x, g), filt_valid(y, g)
    sxx = np.maximum(filt_valid(x * x, g) - mx * mx, 0)
    syy = np.maximum(filt_valid(y * y, g) - my * my, 0)
    sxy = filt_valid(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.reshape(len(x), -1).mean(1).mean())


if __name__ == "__main__":
    main()
