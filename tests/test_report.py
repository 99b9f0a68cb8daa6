"""Several seeds read together, and the history curve, end to end on the tiny model."""

import pytest

from perpcs.utils import read_json

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_seeds_pool_queries_by_seed_and_id(tiny_base, tiny_data, tmp_path, cli):
    code, out = cli("bench", "--quick", "--base", tiny_base, "--data", tiny_data, "--out", tmp_path,
                    "--methods", "non_personalized", "--methods", "perpcs", "--methods", "oppu",
                    "--seeds", "0,1", "--oppu-targets", "1")
    assert code == 0, out
    r = read_json(tmp_path / "report.json")
    runs = [read_json(tmp_path / f"seed-{s}" / "results.json") for s in (0, 1)]
    assert r["seeds"] == [0, 1] and [x["seed"] for x in runs] == [0, 1]
    st = r["statistics"]["methods"]
    assert st["perpcs"]["n"] == r["n_queries"] == 8 and st["oppu"]["n"] == 4  # OPPU on 1 of 2 targets per seed
    assert st["perpcs"]["vs"]["oppu"]["n"] == 4 and st["perpcs"]["vs"]["non_personalized"]["n"] == 8
    # the pooled mean is the mean of the per-seed metrics here (same number of queries per seed)
    for m in ("perpcs", "non_personalized"):
        assert st[m]["mean"] == pytest.approx(sum(x["methods"][m]["metrics"]["accuracy"] for x in runs) / 2)
        assert r["methods"][m]["per_seed"] == [x["methods"][m]["metrics"]["accuracy"] for x in runs]
    assert r["same_group_weight"]["perpcs"] == [x["diagnostics"]["same_group_weight"] for x in runs]
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG
    assert "| perpcs | oppu | 4 |" in (tmp_path / "report.md").read_text()
    # the same through `perpcs report`, and refusals
    code, out = cli("report", tmp_path / "seed-0", tmp_path / "seed-1", "--out", tmp_path / "again")
    assert code == 0, out
    assert read_json(tmp_path / "again" / "report.json")["statistics"] == r["statistics"]
    code, out = cli("report", tmp_path / "seed-0", tmp_path / "seed-0", "--out", tmp_path / "bad")
    assert code == 2 and "count their queries twice" in out
    code, out = cli("report", tmp_path / "nope", "--out", tmp_path / "bad")
    assert code == 2 and "no results.json" in out
    code, out = cli("bench", "--quick", "--data", tiny_data, "--out", tmp_path / "bad", "--seeds", "0,x")
    assert code == 2 and "--seeds '0,x'" in out


def test_curve_truncates_every_targets_history(tiny_base, tiny_data, tmp_path, cli):
    code, out = cli("curve", "--quick", "--base", tiny_base, "--data", tiny_data, "--out", tmp_path,
                    "--points", "1,2", "--points", "all")
    assert code == 0, out
    r = read_json(tmp_path / "curve.json")
    assert r["points"] == ["1", "2", "all"]
    assert set(r["methods"]["perpcs"]) == set(r["methods"]["oppu"]) == {"1", "2", "all"}
    assert list(r["methods"]["non_personalized"]) == ["all"]
    for by_point in r["methods"].values():
        for v in by_point.values():
            assert v["n"] == 4 and v["ci"][0] <= v["mean"] <= v["ci"][1]
    from perpcs.pipeline import Run
    from perpcs.recipe import Recipe
    from perpcs.runfolder import safe_name

    k1 = Run(tmp_path / "k-1" / "run")
    assert k1.config.assembly.recent_k == 1
    for uid in k1.split["targets"]:  # Per-Pcs assembled from, and OPPU trained on, the newest item only
        assert Recipe.load(k1.recipe_path(uid)).settings["recent_k"] == 1
        assert (k1.folder / "oppu-newest1" / safe_name(uid) / "stats.json").exists()
    assert not (k1.folder / "oppu").exists()
    # the point reuses the run's pool (keys and all): nothing but assembly and OPPU was redone
    assert k1.own_pool().pool_id == Run(tmp_path / "run").own_pool().pool_id
    assert k1.stats()["build_pool"] == Run(tmp_path / "run").stats()["build_pool"]
    assert (tmp_path / "curve.png").read_bytes()[:8] == PNG and "k = 1" in (tmp_path / "curve.md").read_text()
    code, out = cli("curve", "--quick", "--data", tiny_data, "--out", tmp_path / "bad", "--points", "0")
    assert code == 2 and "--points '0'" in out
