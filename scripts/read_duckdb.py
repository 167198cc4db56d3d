#!/usr/bin/env python3
"""Query rae-cache shards with DuckDB.

    python3 scripts/read_duckdb.py CACHE_DIR_OR_SHARD

Counts rows per label and flip, reads the footer metadata, and (for dtypes
DuckDB reads, see schemas/shard.md) the first latent.
"""
import os
import sys

import duckdb


def main():
    path = sys.argv[1]
    glob = os.path.join(path, "*.parquet") if os.path.isdir(path) else path
    con = duckdb.connect()
    print(con.execute(
        "SELECT label, flip, count(*) AS n FROM read_parquet(?) GROUP BY ALL ORDER BY ALL LIMIT 20", [glob]
    ).fetchall())
    print(con.execute(
        "SELECT decode(key), decode(value) FROM parquet_kv_metadata(?) WHERE decode(key) LIKE 'rae_cache.%'", [glob]
    ).fetchall())
    try:
        print(con.execute("DESCRIBE SELECT latent FROM read_parquet(?)", [glob]).fetchall())
        row = con.execute("SELECT key, latent[1:4] FROM read_parquet(?) LIMIT 1", [glob]).fetchone()
        print(f"{row[0]}: first values {row[1]}")
    except duckdb.Error as e:
        print(f"DuckDB cannot read this latent encoding: {e}")


if __name__ == "__main__":
    main()
