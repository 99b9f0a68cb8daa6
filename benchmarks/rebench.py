"""Re-run a finished `perpcs bench` with other settings of steps 1 and 3-5, reusing what they do not change.

`Run.derive` links SRC's task model, split and sharer LoRAs, and its OPPU adapters are linked too
(their measured seconds come along). With other step 3-5 settings the sharers are the very same and
only the piece keys, the pool, assembly and generation run again; that isolates, e.g., the key or
the mix. With another sharer count (or selection) the sharers are selected again and only those that
SRC did not have are trained:

    python benchmarks/rebench.py SRC_OUT DST_OUT --set key=activation --set assembly.mix=cat
    python benchmarks/rebench.py SRC_OUT DST_OUT --set n_sharers=12 --variant act-cat:key=activation,assembly.mix=cat

SRC_OUT and DST_OUT are bench output folders (SRC_OUT/run is the run folder). To compare variants
inside one bench instead, use `perpcs bench --variant NAME:KEY=VALUE,...`.
"""

import argparse
from pathlib import Path

from perpcs.bench import bench
from perpcs.overrides import parse_overrides, parse_variants
from perpcs.pipeline import Run
from perpcs.settings import BenchSettings


def main(src: Path, dst: Path, overrides: list[str], variants: list[str]) -> None:
    if dst.exists():
        raise SystemExit(f"{dst}: exists; give a new output folder")
    old = Run(src / "run")
    cfg = old.config.updated(parse_overrides(overrides))
    new = old.derive(dst / "run", cfg)
    (new.folder / "oppu").symlink_to((old.folder / "oppu").resolve())
    bench(cfg.data, dst, cfg, BenchSettings(variants=parse_variants(variants)))
    print((dst / "results.md").read_text())
    print(f"results: {dst / 'results.json'}, {dst / 'results.md'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE, as in perpcs --set")
    ap.add_argument("--variant", dest="variants", action="append", default=[],
                    help="NAME:KEY=VALUE,..., as in perpcs bench --variant")
    a = ap.parse_args()
    main(a.src, a.dst, a.overrides, a.variants)
