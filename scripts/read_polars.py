#!/usr/bin/env python3
"""Read rae-cache shards with polars.

    python3 scripts/read_polars.py CACHE_DIR_OR_SHARD

key/label/flip are ordinary columns; `latent` is an Array column (polars
ignores the tensor extension and reads the storage fixed-size list).
"""
import os
import sys

import numpy as np
import polars as pl


def main():
    path = sys.argv[1]
    pattern = os.path.join(path, "*.parquet") if os.path.isdir(path) else path
    index = pl.scan_parquet(pattern).select("key", "label", "flip").collect()
    print(index.head())
    print(index.group_by("flip").len())
    first = pl.scan_parquet(pattern).head(2).collect()
    lat = first["latent"]
    print(f"latent dtype: {lat.dtype}")
    print(f"first latents as numpy: {np.asarray(lat.to_numpy()).shape}")


if __name__ == "__main__":
    main()
