"""The Ray executor builds the same pool and recipes as the in-process loop (local Ray, 2 workers)."""

import pytest
import torch
from typer.testing import CliRunner

from perpcs.cli import app as cli
from perpcs.executors import make_executor
from perpcs.pipeline import Run
from perpcs.recipe import Recipe


def pool_by_user(run: Run) -> dict:
    """{(user id, position): (A, B, key)}: pools compared through user ids (pseudonyms are salted at random)."""
    pool = run.open_pool()
    out = {}
    for sel in run.select():
        sid = pool.pseudonym(sel.user_id)
        for pos in pool.positions:
            ids, keys = pool.keys(pos)
            out[sel.user_id, pos] = (*pool.piece(sid, pos), keys[ids.index(sid)])
    return out


def recipe_by_user(run: Run, recipes: dict) -> dict:
    pool = run.open_pool()
    user_of = {pool.pseudonym(s.user_id): s.user_id for s in run.select()}
    return {u: {pos: {user_of[sid]: w for sid, w in chosen} for pos, chosen in r.pieces.items()}
            for u, r in recipes.items()}


def test_ray_executor_gives_the_local_pool_and_recipes(tmp_path, tiny_run_config, one_thread):
    """`perpcs pipeline --executor ray` (on a local Ray of 2 workers) == the in-process pipeline."""
    import ray

    config = tiny_run_config(n_targets=3)
    local = Run.create(tmp_path / "local", config)
    local_recipes = local.pipeline()
    (tmp_path / "config.json").write_text(config.model_dump_json())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert make_executor("ray").workers == 2  # the CLI joins this Ray
        result = CliRunner().invoke(cli, ["pipeline", "--data", config.data, "--run", str(tmp_path / "ray"),
                                          "--config", str(tmp_path / "config.json"), "--executor", "ray"])
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    ray_run = Run(tmp_path / "ray")
    ray_recipes = {u: Recipe.load(ray_run.recipe_path(u)) for u in local_recipes}
    a, b = pool_by_user(local), pool_by_user(ray_run)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        for x, y in zip(a[k], b[k]):
            assert torch.equal(x, y), k
    assert recipe_by_user(local, local_recipes) == recipe_by_user(ray_run, ray_recipes)
    assert local.open_pool().pool_id != ray_run.open_pool().pool_id  # the salt is random: pseudonyms differ
    assert len(ray_recipes) == 3 and all((ray_run.sharer_dir(s.user_id) / "pieces.safetensors").exists()
                                         for s in ray_run.select())


def test_local_executor_needs_no_ray():
    assert make_executor("local") is None
    with pytest.raises(ValueError, match="needs --executor ray"):
        make_executor("local", "auto")
    with pytest.raises(ValueError, match="local or ray"):
        make_executor("dask")
