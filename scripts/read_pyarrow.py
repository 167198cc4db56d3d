#!/usr/bin/env python3
"""Read a rae-cache shard (or every shard of a cache directory) with pyarrow.

    python3 scripts/read_pyarrow.py CACHE_DIR_OR_SHARD [--rows N]

Prints the footer metadata and the latent tensor shape, and decodes the
first rows to float32 numpy arrays [rows, tokens, C] (f16 / f32 / bf16 bit
patterns / int8 x per-token scale, see schemas/shard.md).
"""
import argparse
import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def decode(table: pa.Table) -> np.ndarray:
    """Latents of `table` as float32 [rows, tokens, C]."""
    dtype = table.schema.metadata[b"rae_cache.dtype"].decode()
    nd = table.column("latent").combine_chunks().to_numpy_ndarray()
    if dtype == "bf16":
        return (nd.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        scale = table.column("scale").combine_chunks().values.to_numpy(zero_copy_only=False)
        return nd.astype(np.float32) * scale.reshape(nd.shape[0], nd.shape[1], 1)
    return nd.astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--rows", type=int, default=4)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.path, "*.parquet"))) if os.path.isdir(a.path) else [a.path]
    for f in files:
        pf = pq.ParquetFile(f)
        meta = {k.decode(): v.decode() for k, v in pf.metadata.metadata.items() if k != b"ARROW:schema"}
        print(f"{f}: {pf.metadata.num_rows} rows, {pf.metadata.num_row_groups} row groups")
        for k, v in sorted(meta.items()):
            print(f"  {k} = {v}")
        table = pf.read_row_group(0) if pf.metadata.num_row_groups else pf.read()
        table = table.slice(0, a.rows)
        print(f"  latent type: {table.schema.field('latent').type}")
        z = decode(table)
        print(f"  first {len(z)} latents: shape {z.shape}, mean {z.mean():.4f}, std {z.std():.4f}")
        print(f"  keys: {table.column('key').to_pylist()}")


if __name__ == "__main__":
    main()
