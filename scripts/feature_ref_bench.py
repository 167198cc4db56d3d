#!/usr/bin/env python3
"""PyTorch timings beside `cargo bench --bench features` (random weights):

  inception   pytorch-fid's InceptionV3 (FID blocks, pool_3 only as pytorch-fid
              returns it, plus a hook on Mixed_6d.branch1x1 and the fc matmul as
              rae-cache computes them), 256x256 uint8-valued input resized inside
              (pytorch-fid's own half-pixel bilinear), f32, batch 50.
  fd-dinov2   facebookresearch/dinov2-style ViT-L/14 via transformers' Dinov2Model
              (random weights, same shapes) on 224x224 inputs, CLS after the final
              LayerNorm, f32, batch 50 (the PIL resize is not timed).

  /work/venv-torch/bin/python scripts/feature_ref_bench.py --threads 2 --batch 50
Prints one JSON line per workload: images/s and images per CPU-second (medians of --iters
timed runs; on a shared machine the CPU-second figure is the steadier one).
"""

import argparse
import json
import time

import torch


def median_time(fn, warmup, iters):
    """Median wall and CPU (process, all threads) seconds."""
    for _ in range(warmup):
        fn()
    t, c = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        t.append(time.perf_counter() - t0)
        c.append(time.process_time() - c0)
    t.sort()
    c.sort()
    return t[len(t) // 2], c[len(c) // 2]


def bench_inception(batch, warmup, iters):
    import torchvision
    import pytorch_fid.inception as pfi

    template = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                               init_weights=False).state_dict()
    sd = {k: (torch.randn_like(v) * 0.05 if v.is_floating_point() else v) for k, v in template.items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 1
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    model = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    taps = {}
    model.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("s", o))
    fc = sd["fc.weight"]
    x = torch.randint(0, 256, (batch, 3, 256, 256)).float() / 255

    def run():
        with torch.no_grad():
            pool = model(x)[0].flatten(1)
            _ = taps["s"].permute(0, 2, 3, 1)[..., :7].reshape(batch, -1)
            _ = pool @ fc.T

    return median_time(run, warmup, iters)


def bench_dinov2(batch, warmup, iters):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                       image_size=518, patch_size=14, layer_norm_eps=1e-6)
    model = Dinov2Model(cfg).eval()
    x = torch.randn(batch, 3, 224, 224)

    def run():
        with torch.no_grad():
            _ = model(pixel_values=x).pooler_output

    return median_time(run, warmup, iters)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="inception")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for what in args.what.split(","):
        fn = {"inception": bench_inception, "fd-dinov2": bench_dinov2}[what]
        secs, cpu = fn(args.batch, args.warmup, args.iters)
        print(json.dumps({"workload": what, "impl": f"torch {torch.__version__}", "threads": args.threads,
                          "batch": args.batch, "seconds": round(secs, 3),
                          "images_per_s": round(args.batch / secs, 2), "cpu_seconds": round(cpu, 2),
                          "images_per_cpu_s": round(args.batch / cpu, 3)}))


if __name__ == "__main__":
    main()
