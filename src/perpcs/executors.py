"""Where the one-time heavy work runs: sharer LoRAs + keys (steps 2-3) and bulk assembly (step 5).

`Run.build_pool` and `Run.assemble` take an executor with `workers` and `map(fn, items, desc)`
(results in the order of `items`). Without one they loop in-process; `RayExecutor` runs each item
as a Ray task, on a local Ray started here or on a cluster (`address`). Workers read and write the
run folder themselves, so on a cluster it must sit on storage every node mounts at the same path
(docs/scale.md). The driver still inserts pieces into the pool in sharer order, so the pool's
tensors, and the recipes, do not depend on the executor.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm


class RayExecutor:
    """Each item a Ray task of one CPU. Ray is imported (and a local Ray started) only here."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        import ray

        self.ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn: Callable, items: Sequence, desc: str = "tasks") -> Iterator:
        """fn(item) for each item as parallel tasks; yields results in item order as they are ready."""
        task = self.ray.remote(num_cpus=1)(_apply)
        refs = [task.remote(fn, item) for item in items]
        for ref in tqdm(refs, desc=f"{desc} (ray, {self.workers} workers)"):
            yield self.ray.get(ref)

    def shutdown(self) -> None:
        self.ray.shutdown()


def _apply(fn: Callable, item):
    """The Ray task: Ray wraps plain functions only, and `fn` may be a partial."""
    return fn(item)


def make_executor(name: str, address: str | None = None, num_cpus: int | None = None) -> RayExecutor | None:
    """`local` (None: the run loops in-process, no Ray needed) or `ray`."""
    if name == "local":
        if address:
            raise ValueError("--ray-address needs --executor ray")
        return None
    if name == "ray":
        return RayExecutor(address, num_cpus)
    raise ValueError(f"--executor must be local or ray, got {name!r}")
