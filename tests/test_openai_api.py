"""The OpenAI routes of `perpcs serve`, driven by the real `openai` client against a real uvicorn on 127.0.0.1."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from perpcs.generation import generate
from perpcs.models import load_base
from perpcs.serve import ServeSettings, create_app
from test_serve import histories, offline, run  # noqa: F401  (module fixtures, a tiny run with a pool)

TEXTS = ["A quiet film about a lighthouse keeper.", "Explosions, car chases and a heist."]


@contextmanager
def serving(folder, settings: ServeSettings):
    """A real uvicorn server on a free loopback port; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(folder, settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # bounded: 60 s
            if server.started:
                break
            time.sleep(0.1)
        assert server.started
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def url(run, histories):  # noqa: F811
    """One server for the module, alice and bob assembled through it (recipes in the run, for every server)."""
    with serving(run, ServeSettings(batch_window_ms=0)) as base_url:
        for user, body in histories.items():
            assert httpx.post(f"{base_url}/v1/users/{user}/assemble", json=body, timeout=120).status_code == 200
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_completions_and_chat_equal_offline_generation_per_user(run, url, client):  # noqa: F811
    expected = {u: offline(run, u, TEXTS, 6) for u in ("alice", "bob")}
    assert expected["alice"] != expected["bob"]
    prompt = run.data.task.format_prompt
    for user in ("alice", "bob"):
        for text, want in zip(TEXTS, expected[user]):
            done = client.completions.create(model=user, prompt=prompt(text), max_tokens=6, temperature=0)
            assert done.choices[0].text == want and done.model == user and done.object == "text_completion"
            chat = client.chat.completions.create(model=user, messages=[{"role": "user", "content": text}],
                                                  max_tokens=6, temperature=0)
            assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
            tokens = len(load_tokenizer(run)(prompt(text), add_special_tokens=False)["input_ids"])
            assert (done.usage.prompt_tokens, chat.usage.prompt_tokens) == (tokens, tokens)
            assert 1 <= done.usage.completion_tokens <= 6
            assert done.usage.total_tokens == tokens + done.usage.completion_tokens
            assert done.choices[0].finish_reason == ("length" if done.usage.completion_tokens == 6 else "stop")


def load_tokenizer(run):  # noqa: F811
    return load_base(run.merged_path)[1]


def test_concurrent_requests_for_two_users_share_one_batch(run, url):  # noqa: F811
    jobs = [(u, t) for u in ("alice", "bob") for t in TEXTS]
    with serving(run, ServeSettings(max_batch=4, batch_window_ms=30_000)) as batching:  # the 4th request closes it
        client = openai.OpenAI(base_url=f"{batching}/v1", api_key="unused", max_retries=0, timeout=120)
        before = httpx.get(f"{batching}/health").json()
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: client.completions.create(
                model=job[0], prompt=run.data.task.format_prompt(job[1]), max_tokens=6, temperature=0).choices[0].text,
                jobs))
        after = httpx.get(f"{batching}/health").json()
    assert answers == [offline(run, u, [t], 6)[0] for u, t in jobs]
    assert (after["batches"] - before["batches"], after["generated"] - before["generated"]) == (1, 4)


def test_streaming_gives_the_same_text_and_usage(run, url, client):  # noqa: F811
    for user in ("alice", "bob"):
        whole = client.chat.completions.create(model=user, messages=[{"role": "user", "content": TEXTS[0]}],
                                               max_tokens=8, temperature=0)
        chunks = list(client.chat.completions.create(model=user, messages=[{"role": "user", "content": TEXTS[0]}],
                                                     max_tokens=8, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
        streamed = client.completions.create(model=user, prompt=run.data.task.format_prompt(TEXTS[1]), max_tokens=8,
                                             temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == offline(run, user, [TEXTS[1]], 8)[0]


def test_stop_strings_cut_the_text_where_they_start(run, url, client):  # noqa: F811
    full = offline(run, "alice", [TEXTS[0]], 8)[0]
    assert len(full) >= 3
    stop = full[1:3]
    want = full[: full.find(stop)]
    done = client.completions.create(model="alice", prompt=run.data.task.format_prompt(TEXTS[0]), max_tokens=8,
                                     temperature=0, stop=[stop, "never-in-the-text"])
    assert (done.choices[0].text, done.choices[0].finish_reason) == (want, "stop")
    streamed = client.completions.create(model="alice", prompt=run.data.task.format_prompt(TEXTS[0]), max_tokens=8,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_base_model_and_model_list(run, url, client):  # noqa: F811
    base = Path(run.config.base).name
    assert [m.id for m in client.models.list()] == [base, "alice", "bob"]
    model, tok = load_base(run.merged_path)
    want = generate(model, tok, [run.data.task.format_prompt(TEXTS[0])], 6)[0]
    got = client.chat.completions.create(model=base, messages=[{"role": "user", "content": TEXTS[0]}], max_tokens=6,
                                         temperature=0)
    assert got.choices[0].message.content == want
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[1]}]
    templated = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    got = client.chat.completions.create(model=base, messages=conversation, max_tokens=6, temperature=0)
    assert got.choices[0].message.content == generate(model, tok, [templated], 6)[0]


def test_sampling_with_a_seed_repeats(run, url, client):  # noqa: F811
    def sample(seed):
        return client.completions.create(model="bob", prompt="Once upon", max_tokens=8, temperature=1.5, top_p=0.95,
                                         seed=seed).choices[0].text
    assert sample(3) == sample(3)


def test_errors_in_openai_shape(run, url, client):  # noqa: F811
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    error = e.value.response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert "nobody" in error["message"] and set(error) == {"message", "type", "param", "code"}
    for bad, param in [({"n": 2}, "n"), ({"max_tokens": 65}, "max_tokens"), ({"temperature": -1}, "temperature")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="alice", prompt="hi", **bad)
        assert e.value.response.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alice", messages=[])
    assert e.value.response.json()["error"]["param"] == "messages"
    big = httpx.post(f"{url}/v1/completions", json={"model": "alice", "prompt": "x" * 1_000_001})
    assert (big.status_code, big.json()["error"]["code"]) == (413, "request_too_large")
    assert httpx.get(f"{url}/v1/users/nobody").json() == {"detail": "no recipe for user 'nobody'"}  # old shape there


def test_api_key_as_bearer_or_header(run):  # noqa: F811
    with serving(run, ServeSettings(api_key="secret")) as base_url:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.response.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{base_url}/v1", api_key="secret", max_retries=0)
        assert Path(run.config.base).name in [m.id for m in good.models.list()]
        assert httpx.get(f"{base_url}/v1/models", headers={"X-API-Key": "secret"}).status_code == 200
        assert httpx.get(f"{base_url}/v1/users/x", headers={"Authorization": "Bearer secret"}).status_code == 404
