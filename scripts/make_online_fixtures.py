#!/usr/bin/env python3
"""Fixture of `train-decoder --online-encoder`'s data recipe, made with the
reference's own libraries (torchvision, transformers).

For a few images of tests/fixtures/rae-ref/images: torchvision
`Resize(384, BICUBIC)` (PIL, as `train_stage1.py`'s transform), then
`RandomCrop(256)` with offsets drawn by torchvision's own `get_params` under
`torch.manual_seed(0)`, `ToTensor`; then the reference RAE encode of that
crop: `interpolate(224, bicubic, align_corners=False)` (no antialias),
ImageNet mean/std, `Dinov2WithRegistersModel` of the tiny fixture encoder
with the final LayerNorm's affine removed, the first 5 tokens dropped.

Writes tests/fixtures/rae-ref/online-crops.safetensors (`crops` u8
[n, 256, 256, 3], `offsets` i64 [n, 2] as (top, left), `latents` f32
[n, T, C]) and online-crops.json (the image keys, in that order, and the
resize/crop sizes).

Run: /work/venv-torch/bin/python scripts/make_online_fixtures.py
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms
from transformers import Dinov2WithRegistersModel

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "rae-ref"
KEYS = [
    "n02102040/motorcycle_left.png",
    "n03000684/hubble_deep_field.jpg",
    "n01440764/astronaut.png",
]
SHORT, CROP, INPUT = 384, 256, 224


def main():
    torch.manual_seed(0)
    enc_dir = ROOT / "encoder-dinov2reg"
    model = Dinov2WithRegistersModel.from_pretrained(str(enc_dir)).eval()
    model.layernorm.elementwise_affine = False
    model.layernorm.weight = None
    model.layernorm.bias = None
    pre = json.loads((enc_dir / "preprocessor_config.json").read_text())
    mean = torch.tensor(pre["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["image_std"]).view(1, 3, 1, 1)
    resize = transforms.Resize(SHORT, interpolation=transforms.InterpolationMode.BICUBIC)
    crops, offsets, sizes = [], [], []
    for key in KEYS:
        img = resize(Image.open(ROOT / "images" / key).convert("RGB"))
        top, left, h, w = transforms.RandomCrop.get_params(img, (CROP, CROP))
        crop = img.crop((left, top, left + w, top + h))
        crops.append(np.asarray(crop, dtype=np.uint8))
        offsets.append([top, left])
        sizes.append(list(img.size))
    u8 = torch.from_numpy(np.stack(crops))
    x = u8.permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        x = F.interpolate(x, size=(INPUT, INPUT), mode="bicubic", align_corners=False)
        z = model((x - mean) / std).last_hidden_state[:, 5:].contiguous()
    save_file(
        {
            "crops": u8.contiguous(),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "latents": z.float(),
        },
        str(ROOT / "online-crops.safetensors"),
    )
    meta = {"images": KEYS, "resize_short": SHORT, "crop": CROP, "resized_sizes_wh": sizes}
    (ROOT / "online-crops.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(meta, offsets, tuple(z.shape))


if __name__ == "__main__":
    main()
