"""The bench harness and `perpcs bench`, end to end on a tiny random Llama (numbers mean nothing; the
accounting does)."""

import json
import statistics

import pytest

from perpcs.bench import Bench, bench
from perpcs.data import load_dataset
from perpcs.evaluation import read_lamp_outputs, score
from perpcs.methods import rows
from perpcs.pipeline import Run
from perpcs.recipe import Recipe
from perpcs.rules import GRID
from perpcs.runfolder import safe_name
from perpcs.settings import BenchSettings
from perpcs.tables import results_table
from perpcs.utils import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def benched(tmp_path_factory, tiny_data, tiny_run_config):
    out = tmp_path_factory.mktemp("bench")
    bench(tiny_data, out, tiny_run_config(), BenchSettings(variants=VARIANTS))
    return out, Run(out / "run")


VARIANTS = {"act": {"key": "activation", "assembly": {"mix": "cat"}}}
ROWS = [*rows(), "act", "act+rag"]


def files_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_results_schema(benched, tiny_data):
    out, run = benched
    r = read_json(out / "results.json")
    assert {"dataset", "task", "kind", "base_model", "base_fingerprint", "seed", "n_targets", "n_sharers",
            "primary_metric", "methods", "one_time"} <= set(r)
    assert (r["dataset"], r["task"], r["kind"], r["seed"]) == (str(tiny_data), run.data.task.name, "classification", 0)
    assert (r["n_targets"], r["n_sharers"], r["base_fingerprint"]) == (2, 3, run.merged_fingerprint)
    assert r["primary_metric"] == {"name": "accuracy", "higher_is_better": True}
    assert list(r["methods"]) == ROWS
    assert r["variants"]["act"]["settings"] == VARIANTS["act"] and r["variants"]["act"]["pool_bytes"] > 0
    for m in r["methods"].values():
        assert {"metrics", "personalize_seconds_per_user", "bytes_per_user"} <= set(m)
    stats = run.stats()
    assert r["one_time"]["task_adapt_seconds"] == stats["task_adapt"]["seconds"]
    for key in ("sharer_lora_seconds", "gate_seconds", "pool_bytes"):
        assert r["one_time"][key] == stats["build_pool"][key] > 0
    index = sum(p.stat().st_size for p in run.pool_path.glob("keys-*.safetensors"))  # assembly's key index, made later
    report = sum(p.stat().st_size for p in run.pool_path.glob("calibration.json"))  # calibration's, if it ran
    assert r["one_time"]["pool_bytes"] == files_bytes(run.pool_path) - index - report and index > 0


def test_preds_are_lamp_files_of_the_targets_queries_and_metrics_recompute(benched):
    out, run = benched
    r = read_json(out / "results.json")
    task = load_dataset(run.config.data).task
    targets = run.users(run.split["targets"])
    golds = {q.id: q.output for u in targets for q in u.queries}
    assert len(golds) == 4
    assert read_lamp_outputs(out / "golds.json") == (task.name, golds)
    for method in ROWS:
        name, preds = read_lamp_outputs(out / "preds" / f"{method}.json")
        assert name == task.name and sorted(preds) == sorted(golds)
        assert r["methods"][method]["metrics"] == pytest.approx(score(task, golds, preds))
        assert r["methods"][method]["metrics"]["n"] == 4


def test_cost_accounting(benched):
    out, run = benched
    m = read_json(out / "results.json")["methods"]
    targets = run.split["targets"]
    for free in ("non_personalized", "rag"):
        assert m[free]["personalize_seconds_per_user"] == 0 and m[free]["bytes_per_user"] == 0
    recipe_bytes = statistics.mean(run.recipe_path(u).stat().st_size for u in targets)
    assembly_seconds = statistics.mean(run.stats()["assemble"]["seconds_per_user"][u] for u in targets)
    for method in ("perpcs", "perpcs+rag"):
        assert m[method]["bytes_per_user"] == recipe_bytes
        assert m[method]["personalize_seconds_per_user"] == pytest.approx(assembly_seconds)
    oppu = [run.folder / "oppu" / safe_name(u) for u in targets]
    assert m["oppu"]["bytes_per_user"] == statistics.mean(files_bytes(f / "adapter") for f in oppu)
    assert m["oppu"]["personalize_seconds_per_user"] == pytest.approx(
        statistics.mean(read_json(f / "stats.json")["seconds"] for f in oppu))
    assert m["oppu"]["bytes_per_user"] > 10 * recipe_bytes > 0  # a whole adapter vs a few (sharer, weight) pairs
    assert m["peft_retrieval"]["bytes_per_user"] > 0 and m["peft_retrieval"]["personalize_seconds_per_user"] > 0
    # retrieval in the prompt costs nothing more to personalise: OPPU is reloaded, not trained twice
    assert m["oppu+rag"]["personalize_seconds_per_user"] == m["oppu"]["personalize_seconds_per_user"]
    assert m["oppu+rag"]["bytes_per_user"] == m["oppu"]["bytes_per_user"]
    assert m["peft_retrieval+rag"]["bytes_per_user"] == m["peft_retrieval"]["bytes_per_user"]


def test_results_md_has_a_row_per_method(benched):
    out, _ = benched
    md = (out / "results.md").read_text()
    first_table = md.split("\n\n")[2]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in first_table.splitlines() if line.startswith("| ")]
    assert rows == ["method", *ROWS]
    assert 'Variant act: {"key": "activation", "assembly": {"mix": "cat"}}' in md
    assert "One-time costs" in md


def test_variant_reuses_the_sharers_and_costs_its_own_assembly(benched):
    out, run = benched
    m = read_json(out / "results.json")["methods"]
    vrun = Run(out / "variants" / "act" / "run")
    assert vrun.open_pool().key == "activation" and vrun.config.assembly.mix == "cat"
    for s in run.select():  # the variant's sharer LoRAs are the run's own, linked
        assert (vrun.sharer_dir(s.user_id) / "adapter").resolve() == (run.sharer_dir(s.user_id) / "adapter").resolve()
    targets = run.split["targets"]
    assert m["act"]["personalize_seconds_per_user"] == pytest.approx(
        statistics.mean(vrun.stats()["assemble"]["seconds_per_user"][u] for u in targets))
    assert m["act"]["bytes_per_user"] == statistics.mean(vrun.recipe_path(u).stat().st_size for u in targets)


def test_personalization_leaves_the_merged_model_clean(benched, tmp_path):
    """Methods run one after another on one model: a second pass (OPPU reloaded, not retrained) gives the
    same answers."""
    out, run = benched
    again = Bench(run, BenchSettings(methods=["oppu", "perpcs", "non_personalized"]), tmp_path).evaluate()
    first = read_json(out / "results.json")["methods"]
    for method in again:
        assert read_lamp_outputs(tmp_path / "preds" / f"{method}.json") == \
               read_lamp_outputs(out / "preds" / f"{method}.json"), method
    assert again["oppu"]["personalize_seconds_per_user"] == pytest.approx(first["oppu"]["personalize_seconds_per_user"])


def test_variant_names_refused_when_they_clash():
    for bad in ("oppu", "a+rag", "a b", ""):
        with pytest.raises(ValueError, match="variant name"):
            BenchSettings(variants={bad: {}})


def test_unknown_or_no_methods_refused():
    with pytest.raises(ValueError, match=r"unknown methods \['nope'\]; known: non_personalized"):
        BenchSettings(methods=["rag", "nope"])
    with pytest.raises(ValueError, match="no methods to run"):
        BenchSettings(methods=[])


def test_results_table_ratios_to_oppu():
    """Hand-computed: OPPU 10 s / 1000 B, Per-Pcs 2 s / 10 B; accuracy 0.5 base, 0.7 OPPU, 0.6 Per-Pcs -> 50%
    of the gain."""
    def method(acc, s, b):
        return {"metrics": {"accuracy": acc, "f1": acc, "n": 4}, "personalize_seconds_per_user": s, "bytes_per_user": b}
    r = {"task": "t", "kind": "classification", "n_targets": 2, "n_queries": 4, "n_sharers": 3, "seed": 0,
         "primary_metric": {"name": "accuracy", "higher_is_better": True}, "base_model": "tiny",
         "machine": {"device": "cpu"}, "date": "today",
         "methods": {"non_personalized": method(0.5, 0, 0), "oppu": method(0.7, 10, 1000),
                     "perpcs": method(0.6, 2, 10)},
         "one_time": {"task_adapt_seconds": 1, "sharer_lora_seconds": 2, "gate_seconds": 3, "pool_bytes": 2048,
                      "model_load_seconds": 4}}
    lines = results_table(r).splitlines()
    assert "| method | accuracy | f1 | personalize s/user | bytes/user | time vs OPPU | storage vs OPPU | " \
           "share of OPPU's gain |" in lines
    assert "| perpcs | 0.6000 | 0.6000 | 2.00 | 10 B | 5.0x less | 100x less | 50% |" in lines
    assert "| non_personalized | 0.5000 | 0.5000 | 0.00 | 0 B | - | - | 0% |" in lines
    assert "| oppu | 0.7000 | 0.7000 | 10.00 | 1000 B | - | - | 100% |" in lines
    assert any("pool 2.0 KB" in line for line in lines)
    # with retrieval rows, those are measured between rag (0.6) and oppu+rag (0.8): perpcs+rag 0.7 -> 50%
    r["methods"].update({"rag": method(0.6, 0, 0), "oppu+rag": method(0.8, 10, 1000), "perpcs+rag": method(0.7, 2, 10)})
    lines = results_table(r).splitlines()
    assert "| perpcs+rag | 0.7000 | 0.7000 | 2.00 | 10 B | 5.0x less | 100x less | 50% |" in lines
    assert "| oppu+rag | 0.8000 | 0.8000 | 10.00 | 1000 B | - | - | 100% |" in lines
    assert "| rag | 0.6000 | 0.6000 | 0.00 | 0 B | - | - | 0% |" in lines
    assert "| perpcs | 0.6000 | 0.6000 | 2.00 | 10 B | 5.0x less | 100x less | 50% |" in lines


# --- the command ---


def test_cli_bench_quick(tiny_base, tiny_data, tmp_path, cli):
    code, out = cli("bench", "--quick", "--base", tiny_base, "--data", tiny_data, "--out", tmp_path,
                    "--variant", "act:key=activation,assembly.mix=cat")
    assert code == 0, out
    r = read_json(tmp_path / "results.json")
    assert list(r["methods"]) == ROWS and r["variants"]["act"]["settings"] == VARIANTS["act"]
    assert r["config"]["task_train"]["steps"] == 4 and r["config"]["n_sharers"] == 3  # --quick budgets
    assert "| perpcs |" in out
    cal = r["calibration"]  # no rule setting given: the pool calibrated itself; the variant fixed its rule
    assert list(cal["candidates"]) == list(GRID) and cal["validation"]["queries"] > 0 and "predictions" not in cal
    assert r["config"]["calibration"]["enabled"] and "Calibration on" in (tmp_path / "results.md").read_text()
    assert set(r["mixing"]) == {"perpcs", "act"}
    assert not read_json(tmp_path / "variants" / "act" / "run" / "run.json")["calibration"]["enabled"]
    rule = Run(tmp_path / "run").rule  # the calibrated row is kept under the rule calibration chose
    assert rule != Run(tmp_path / "run").config, cal["chosen"]
    assert read_json(tmp_path / "rows" / "perpcs.json")["key"]["run"] == rule.model_dump(mode="json")


def test_cli_bench_bad_input_exits_2_before_any_work(tiny_base, tiny_data, tmp_path, cli):
    base = ("bench", "--quick", "--base", tiny_base, "--data", tiny_data, "--out", tmp_path / "o")
    for args, message in [(("--methods", "nope"), "unknown methods ['nope']"),
                          (("--set", "assembly.top_k"), "--set 'assembly.top_k': expected KEY=VALUE"),
                          (("--set", "assembly.no_such=1"), "assembly.no_such"),
                          (("--variant", "act"), "--variant 'act': expected NAME:KEY=VALUE"),
                          (("--variant", "oppu:key=activation"), "variant name 'oppu'"),
                          (("--variant", "more:n_sharers=5"), "; not these: n_sharers")]:
        code, out = cli(*base, *args)
        assert code == 2 and message in out, args
    assert not (tmp_path / "o").exists()


def test_statistics_and_pictures_in_the_outputs(benched, tmp_path):
    out, run = benched
    r = read_json(out / "results.json")
    s = r["statistics"]["methods"]
    assert list(s) == ROWS
    for m in ROWS:
        assert s[m]["n"] == 4 and s[m]["mean"] == r["methods"][m]["metrics"]["accuracy"]
        assert s[m]["ci"][0] <= s[m]["mean"] <= s[m]["ci"][1]
        assert set(s[m]["vs"]) == {"non_personalized", "peft_retrieval", "oppu"} - {m}
        for c in s[m]["vs"].values():
            assert c["wins"] + c["losses"] + c["ties"] == c["n"] == 4 and 0 <= c["p"] <= 1
    for png in ("results.png", "selection.png", "selection-act.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # data without known groups (every real set) draws the same grid, unmarked
    from perpcs.report import selection_plot

    assert selection_plot(run, tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "![results: metric with CI against personalization seconds](results.png)" in md
    assert "| perpcs | non_personalized | 4 |" in md


def test_prime_is_a_method_with_its_budget(benched):
    out, run = benched
    m = read_json(out / "results.json")["methods"]["prime"]
    assert m["personalize_seconds_per_user"] > 0 and m["bytes_per_user"] > 0
    for uid in run.split["targets"]:
        p = read_json(out / "prime" / f"{safe_name(uid)}.json")
        assert len(p["losses"]) == 10  # the default budget, all of it
        assert len(p["weights"]) == 3 and sum(p["weights"].values()) == pytest.approx(1, abs=1e-6)


def test_oppu_on_the_first_targets_only(benched, tmp_path):
    out, run = benched
    settings = BenchSettings(methods=["non_personalized", "oppu"], oppu_targets=1)
    r = Bench(run, settings, tmp_path).evaluate()
    first = run.users(run.split["targets"][:1])[0]
    assert r["oppu"]["metrics"]["n"] == 2 and r["non_personalized"]["metrics"]["n"] == 4
    assert sorted(read_lamp_outputs(tmp_path / "preds" / "oppu.json")[1]) == sorted(q.id for q in first.queries)
    with pytest.raises(ValueError):
        BenchSettings(oppu_targets=0)


def test_cold_start_without_history_is_the_task_model(benched, tmp_path):
    """The documented fallback: a target without any history item gets the non-personalized model, free."""
    out, run = benched
    b = Bench(run, BenchSettings(), tmp_path)
    user = run.users(run.split["targets"][:1])[0].model_copy(update={"history": []})
    for method in ("oppu", "perpcs", "peft_retrieval", "prime", "oppu+rag"):
        with b.personalize(method, user) as p:
            assert p.model is b.model and (p.seconds, p.nbytes) == (0.0, 0)
            assert p.rag_k == (1 if "+rag" in method else 0)


def test_results_report_each_users_budget_and_strength(benched):
    out, run = benched
    r = read_json(out / "results.json")["per_user"]
    assert set(r["sharers"]) == {s.user_id for s in run.select()}
    for uid, b in r["sharers"].items():
        assert b == {k: v for k, v in read_json(run.sharer_dir(uid) / "lora.json").items()
                     if k in ("steps", "epochs", "best_epoch", "stopped_early", "val_losses", "seconds")}
        assert b["steps"] == 2  # tiny_run_config's fixed budget
    assert set(r["oppu"]) == set(run.split["targets"]) and all(b["steps"] == 2 for b in r["oppu"].values())
    for uid, strength in r["strength"].items():
        recipe = Recipe.load(run.recipe_path(uid))
        assert strength == recipe.strength == recipe.settings["strength"] == 1.0  # the default rule


def test_alternating_costs_in_results(benched, tmp_path):
    """The alternating timing (perpcs.costs) covers the first cost_targets targets; its OPPU adapter and
    recipe are the same sizes as the bench's own (same training, same assembly)."""
    out, run = benched
    r = read_json(out / "results.json")
    a = r["alternating_costs"]
    targets = run.split["targets"][:BenchSettings().cost_targets]
    assert list(a["users"]) == targets
    for uid, u in a["users"].items():
        assert u["time_ratio"] == pytest.approx(u["oppu_seconds"] / u["assembly_seconds"])
        same = Recipe.load(run.recipe_path(uid)).model_copy(update={"seconds": None})  # only the run's has seconds
        assert u["recipe_bytes"] == same.save(tmp_path / f"{uid}.recipe").stat().st_size
        assert u["oppu_adapter_bytes"] == files_bytes(run.folder / "oppu" / safe_name(uid) / "adapter")
    ratios = sorted(u["time_ratio"] for u in a["users"].values())
    assert a["time_ratio"]["min"] == ratios[0] and a["time_ratio"]["max"] == ratios[-1]
    assert a["history_budget"]["recent_k"] == r["config"]["assembly"]["recent_k"]
    md = (out / "results.md").read_text()
    assert "Timed alternately in one process for 2 targets" in md
    assert f"History budget of assembly: the {a['history_budget']['recent_k']} newest items." in md


def test_an_interrupted_bench_resumes_at_its_rows(benched, tmp_path, monkeypatch):
    """A bench into a folder that holds finished rows generates nothing for them (nor times costs again), and
    its results equal the first bench's; a row runs again when its answers are gone or not those it wrote, or a
    setting it depends on changed; a kept row that is not one is refused by name."""
    import shutil

    import perpcs.bench as bench_module
    from perpcs.errors import InputError

    out, run = benched
    shutil.copytree(out, tmp_path / "b", symlinks=True)
    out = tmp_path / "b"
    first = read_json(out / "results.json")
    generated = []
    real_generate = bench_module.generate

    def counting(model, tok, prompts, *args):
        generated.append(len(prompts))
        return real_generate(model, tok, prompts, *args)

    def no_costs(*args, **kwargs):
        raise AssertionError("costs were kept: nothing to time again")

    monkeypatch.setattr(bench_module, "generate", counting)
    monkeypatch.setattr(bench_module, "alternating_costs", no_costs)
    config = run.config.model_copy(update={"data_sha256": None})
    again = bench(config.data, out, config, BenchSettings(variants=VARIANTS))
    assert generated == []
    assert again["methods"] == first["methods"] and again["alternating_costs"] == first["alternating_costs"]
    assert sorted(p.stem for p in (out / "rows").glob("*.json")) == sorted([*ROWS, "costs"])

    (out / "preds" / "rag.json").unlink()  # its answers are gone
    edited = out / "preds" / "oppu.json"  # answers that are not the ones it wrote
    edited.write_text(edited.read_text().replace('"output": "', '"output": "x', 1))
    b = Bench(Run(out / "run"), BenchSettings(), out)
    r = b.evaluate({m: m for m in ("rag", "oppu", "non_personalized")})
    assert generated == [2, 2, 2, 2]  # rag and oppu ran again (two targets, two queries each); NP was kept
    assert r["non_personalized"] == first["methods"]["non_personalized"]
    for m in ("rag", "oppu"):  # same seed, same answers
        assert r[m]["metrics"] == first["methods"][m]["metrics"]
    generated.clear()
    b = Bench(Run(out / "run"), BenchSettings(gen_batch_size=1), out)
    b.evaluate({"non_personalized": "non_personalized"})
    assert generated == [2, 2]  # a setting that reaches the row changed: it ran again

    row = out / "rows" / "non_personalized.json"
    saved = read_json(row)
    row.write_text(json.dumps(saved | {"result": saved["result"] | {"cut_short": "none"}}))
    with pytest.raises(InputError, match="rows/non_personalized.json: result: field 'cut_short'"):
        b.evaluate({"non_personalized": "non_personalized"})
    row.write_text("[]")
    with pytest.raises(InputError, match="rows/non_personalized.json: not a row this bench kept"):
        b.evaluate({"non_personalized": "non_personalized"})


# --- the method registry ---


@pytest.fixture
def toy_method():
    """A method registered for one test: the task model, with made-up costs (0.5 s, 7 bytes per user)."""
    from perpcs.methods import REGISTRY, Method, Personalized, register

    @register
    class Toy(Method):
        name, rag_row, needs = "toy", "toy+rag", frozenset({"pool"})
        seen = []

        def personalize(self, user):
            self.seen.append((user.user_id, self.ctx.pool.pool_id))  # its need was prepared
            return Personalized(self.ctx.model, seconds=0.5, nbytes=7)
    yield Toy
    REGISTRY.pop("toy")


def test_a_registered_method_runs_through_the_bench(benched, tmp_path, toy_method):
    import shutil

    out, run = benched
    shutil.copytree(out / "run", tmp_path / "run", symlinks=True)  # the bench resumes it: nothing trains again
    config = run.config.model_copy(update={"data_sha256": None})
    r = bench(config.data, tmp_path, config, BenchSettings(methods=["non_personalized", "rag", "toy", "toy+rag"],
                                                           cost_targets=0))
    assert list(r["methods"]) == ["non_personalized", "rag", "toy", "toy+rag"]
    assert "toy" in rows() and rows().index("toy+rag") == rows().index("toy") + 1
    toy = r["methods"]["toy"]
    assert (toy["personalize_seconds_per_user"], toy["bytes_per_user"]) == (0.5, 7)
    # the task model is what it personalises with: its answers are non_personalized's, with retrieval rag's
    preds = {m: read_lamp_outputs(tmp_path / "preds" / f"{m}.json")[1] for m in r["methods"]}
    assert preds["toy"] == preds["non_personalized"] and preds["toy+rag"] == preds["rag"]
    assert toy["metrics"] == r["methods"]["non_personalized"]["metrics"]
    pool_id = run.open_pool().pool_id
    assert toy_method.seen == [(u, pool_id) for u in run.split["targets"]] * 2
    assert "| toy+rag |" in (tmp_path / "results.md").read_text()


def test_registry_refuses_unknown_names_and_clashes(toy_method):
    from perpcs.methods import Method, method_of, register, split_method

    with pytest.raises(ValueError, match=r"unknown method 'nope'; known: non_personalized, rag, .*toy, toy\+rag"):
        method_of("nope")
    assert method_of("toy+rag") == (toy_method, True) and split_method("rag") == ("non_personalized", True)
    with pytest.raises(ValueError, match="already registered"):
        register(type("Again", (Method,), {"name": "toy"}))
    with pytest.raises(ValueError, match="already registered"):
        register(type("RowClash", (Method,), {"name": "other", "rag_row": "rag"}))
    with pytest.raises(ValueError, match="unknown needs"):
        register(type("Greedy", (Method,), {"name": "greedy", "needs": frozenset({"gpu"})}))
