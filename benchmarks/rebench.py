"""Re-run a finished `perpcs bench` with other step 3-5 settings on the very same sharers.

`Run.derive` links SRC's task model, split, selection and sharer LoRAs, and its OPPU adapters are
linked too (their measured seconds come along), so only the piece keys, the pool, assembly and
generation run again. That isolates the effect of, e.g., the piece key or the mix:

    python benchmarks/rebench.py SRC_OUT DST_OUT --set key=activation --set assembly.mix=cat

SRC_OUT and DST_OUT are bench output folders (SRC_OUT/run is the run folder). To compare variants
inside one bench instead, use `perpcs bench --variant NAME:KEY=VALUE,...`.
"""

import argparse
from pathlib import Path

from perpcs.bench import BenchSettings, bench
from perpcs.cli import parse_overrides
from perpcs.pipeline import Run


def main(src: Path, dst: Path, overrides: list[str]) -> None:
    if dst.exists():
        raise SystemExit(f"{dst}: exists; give a new output folder")
    old = Run(src / "run")
    cfg = old.config.updated(parse_overrides(overrides))
    new = old.derive(dst / "run", cfg)
    (new.folder / "oppu").symlink_to((old.folder / "oppu").resolve())
    bench(cfg.data, dst, cfg, BenchSettings())
    print((dst / "results.md").read_text())
    print(f"results: {dst / 'results.json'}, {dst / 'results.md'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE, as in perpcs --set")
    a = ap.parse_args()
    main(a.src, a.dst, a.overrides)
