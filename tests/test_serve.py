"""perpcs serve: answers equal offline apply_recipe generation, bad requests get 4xx naming the field."""

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from perpcs.cli import app as cli
from perpcs.generation import generate
from perpcs.models import load_base
from perpcs.pipeline import Run
from perpcs.recipe import Recipe, apply_recipe
from perpcs.serve import Pending, ServeSettings, check_host, create_app


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run_config):
    """A tiny run with a pool and no recipes; sharer LoRAs trained hard enough that recipes change outputs."""
    r = Run.create(tmp_path_factory.mktemp("serve") / "run",
                   tiny_run_config(sharer_train={"steps": 3, "lr": 0.05}, key="activation", assembly={"top_k": 1}))
    r.build_pool()
    return r


@pytest.fixture(scope="module")
def histories(run):
    """Two new users' histories (request bodies): two sharers' own, which their own activation keys match best."""
    users = [run.data.user(s.user_id) for s in run.select()]
    return {name: {"history": [it.model_dump() for it in u.history]} for name, u in zip(("alice", "bob"), users)}


def offline(run, user, texts, n):
    """What `perpcs` generates offline for a user: a fresh merged model with the recipe applied."""
    model, tok = load_base(run.merged_path)
    recipe = Recipe.load(run.recipe_path(user))
    prompts = [run.data.task.format_prompt(t) for t in texts]
    return generate(apply_recipe(model, recipe, run.open_pool()), tok, prompts, n)


def test_assemble_generate_equal_offline_and_differ_between_users(run, histories):
    texts = ["A quiet film about a lighthouse keeper.", "Explosions, car chases and a heist."]
    with TestClient(create_app(run, ServeSettings(batch_window_ms=0))) as client:
        for user, body in histories.items():
            r = client.post(f"/v1/users/{user}/assemble", json=body)
            assert r.status_code == 200, r.text
            assert Recipe.model_validate(r.json()) == Recipe.load(run.recipe_path(user)) and r.json()["user"] == user
        meta = client.get("/v1/users/alice").json()
        assert meta["rank"] == 8 and meta["sharers"] >= 1 and meta["positions"] == 8
        answers = {(u, t): client.post("/v1/generate",
                                       json={"user": u, "input": t, "max_new_tokens": 6}).json()["output"]
                   for u in histories for t in texts}
        service = client.app.state.service
        # one mixed-adapter batch of both users, as the batcher makes it
        rows = [Pending(u, run.data.task.format_prompt(t), 6, None) for u in histories for t in texts]
        batched = service.thread.submit(service.generate, rows).result()
        health = client.get("/health").json()
    with TestClient(create_app(run, ServeSettings(cache_size=1))) as client:  # every switch of user evicts
        again = [client.post("/v1/generate", json={"user": u, "input": texts[0], "max_new_tokens": 6}).json()["output"]
                 for u in ("alice", "bob", "alice")]
        evicting = client.get("/health").json()
    assert again == [answers[u, texts[0]] for u in ("alice", "bob", "alice")]
    assert (evicting["cache_misses"], evicting["adapters_cached"]) == (3, 1)
    recipes = {u: Recipe.load(run.recipe_path(u)).pieces for u in histories}
    assert recipes["alice"] != recipes["bob"]
    for u in histories:
        expected = offline(run, u, texts, 6)
        assert [answers[u, t] for t in texts] == expected
    assert batched == [answers[u, t] for u in histories for t in texts]
    assert [answers["alice", t] for t in texts] != [answers["bob", t] for t in texts]
    assert health["cache_misses"] == 2 and health["cache_hits"] == 2 * len(texts) * 2 - 2


def error_fields(response) -> list:
    return [".".join(map(str, e["loc"])) for e in response.json()["detail"]]


def test_bad_requests_get_4xx_naming_the_field(run, histories):
    settings = ServeSettings(max_history=3, max_new_tokens=8, max_body_bytes=2000)
    long_history = {"history": [{"input": "x", "output": "sci-fi"}] * 4}
    with TestClient(create_app(run, settings)) as client:
        cases = [
            (client.post("/v1/generate", json={"input": "hi"}), 422, "body.user"),
            (client.post("/v1/generate", json={"user": "a", "input": "hi", "max_new_tokens": 9}), 422,
             "body.max_new_tokens"),
            (client.post("/v1/generate", json={"user": "a", "input": "", "max_new_tokens": 2}), 422, "body.input"),
            (client.post("/v1/generate", json={"user": "a", "input": "hi", "temperature": 1}), 422, "body.temperature"),
            (client.post("/v1/users/a/assemble", json={"history": []}), 422, "body.history"),
            (client.post("/v1/users/a/assemble", json=long_history), 422, "body.history"),
            (client.post("/v1/users/a/assemble", json={"history": [{"input": "x"}]}), 422, "body.history.0.output"),
            (client.post("/v1/users/a/assemble", json={"history": [{"input": "x", "output": "no-such-label"}]}), 422,
             "body.history.0.output"),
            (client.post("/v1/users/a/assemble", content=b"{not json", headers={"content-type": "application/json"}),
             422, "body.1"),
            (client.post("/v1/users/a/assemble", json={"history": [{"input": "x" * 3000, "output": "sci-fi"}]}), 413,
             "body"),
        ]
        for response, status, field in cases:
            assert response.status_code == status, (field, response.text)
            assert field in error_fields(response), response.text
        missing = client.post("/v1/generate", json={"user": "nobody", "input": "hi", "max_new_tokens": 2})
        assert missing.status_code == 404 and "nobody" in missing.json()["detail"]
        assert client.get("/v1/users/nobody").status_code == 404
        assert client.delete("/v1/users/nobody").status_code == 404
        assert not run.recipe_path("a").exists()


def test_api_key_required_beyond_loopback(run, monkeypatch):
    check_host("127.0.0.1", None)
    check_host("::1", None)
    check_host("0.0.0.0", "secret")
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(ValueError, match="API key"):
            check_host(host, None)
    monkeypatch.delenv("PERPCS_API_KEY", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--run", str(run.folder), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "API key" in result.output
    with TestClient(create_app(run, ServeSettings(api_key="secret"))) as client:
        assert client.get("/v1/users/x").status_code == 401
        assert client.get("/v1/users/x", headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.get("/v1/users/x", headers={"X-API-Key": "secret"}).status_code == 404
        assert client.get("/health").status_code == 200


def test_real_uvicorn_on_loopback_and_recipes_survive_a_restart(run, histories):
    import uvicorn

    def start():
        server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        for _ in range(600):  # bounded: 60 s
            if server.started:
                break
            time.sleep(0.1)
        assert server.started
        return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    def stop(server, thread):
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()

    server, thread, url = start()
    try:
        r = httpx.post(f"{url}/v1/users/carol/assemble", json=histories["bob"], timeout=60)
        assert r.status_code == 200
        out = httpx.post(f"{url}/v1/generate", json={"user": "carol", "input": "A heist.", "max_new_tokens": 5},
                         timeout=60).json()["output"]
    finally:
        stop(server, thread)
    assert [out] == offline(run, "carol", ["A heist."], 5)
    server, thread, url = start()
    try:
        assert httpx.get(f"{url}/v1/users/carol", timeout=10).json()["user"] == "carol"
        assert httpx.delete(f"{url}/v1/users/carol", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/users/carol", timeout=10).status_code == 404
    finally:
        stop(server, thread)


def test_cli_assembles_a_user_from_a_history_file(run, histories, tmp_path):
    good = tmp_path / "h.jsonl"
    good.write_text("".join(json.dumps(it) + "\n" for it in histories["alice"]["history"]))
    result = CliRunner().invoke(cli, ["assemble", "--run", str(run.folder), "--user", "new/user",
                                      "--history", str(good)])
    assert result.exit_code == 0, result.output
    assert Recipe.load(run.recipe_path("new/user")).user == "new/user"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "output": "sci-fi"}\n{"input": "y"}\n')
    result = CliRunner().invoke(cli, ["assemble", "--run", str(run.folder), "--user", "u", "--history", str(bad)])
    assert result.exit_code == 2 and "line 2" in result.output and "output" in result.output


def test_batches_split_by_max_new_tokens_and_cache_size():
    from perpcs.serve import groups

    rows = [Pending(u, "p", n, None) for u, n in [("a", 4), ("b", 4), ("a", 8), ("c", 4), ("d", 4), ("b", 4)]]
    split = [[(r.user, r.max_new_tokens) for r in g] for g in groups(rows, most_users=2)]
    assert split == [[("a", 4), ("b", 4)], [("c", 4), ("d", 4)], [("b", 4)], [("a", 8)]]
