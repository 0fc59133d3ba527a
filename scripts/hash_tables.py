"""Hash every table a report folder holds, to check that a change left the main job's numbers alone.

    layerscope run --quick --no-progress --out /tmp/before   # on the old commit
    python scripts/hash_tables.py /tmp/before > before.json
    layerscope run --quick --no-progress --out /tmp/after    # on the new one
    python scripts/hash_tables.py /tmp/after > after.json
    python scripts/hash_tables.py --compare before.json after.json

A table is every ``*.parquet`` file under the folder, keyed by its path relative to it; its hash covers the column
names, dtypes and values (row order included). Image arrays (``*.npz``) are hashed too, array by array.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def table_hash(df: pd.DataFrame) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([[str(c), str(t)] for c, t in df.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(df.reset_index(drop=True), index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def npz_hash(path: Path) -> str:
    h = hashlib.sha256()
    with np.load(path) as z:
        for k in sorted(z.files):
            a = z[k]
            h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def hashes(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*.parquet")):
        out[str(p.relative_to(folder))] = table_hash(pd.read_parquet(p))
    for p in sorted(folder.rglob("*.npz")):
        out[str(p.relative_to(folder))] = npz_hash(p)
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compare"] and len(argv) == 3:
        a, b = (json.loads(Path(x).read_text()) for x in argv[1:])
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        for k in diff:
            print(f"{k}: {a.get(k, 'missing')} -> {b.get(k, 'missing')}")
        print(
            f"{len(set(a) & set(b)) - len([k for k in diff if k in a and k in b])} of {len(set(a) | set(b))} "
            f"files identical; {len(diff)} differ or are missing"
        )
        return 1 if diff else 0
    if len(argv) != 1:
        print(__doc__)
        return 2
    print(json.dumps(hashes(Path(argv[0])), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
