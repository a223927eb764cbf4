"""``vlkit serve``'s engine in a process of its own (``--engine process``, the command's default):
answers equal the in-process engine's (greedy and seeded samples, streamed or whole, with images),
concurrent requests are batched in the child, the served weights leave the server's process, a
client that hangs up is cancelled in the child, and a child that dies or cannot load is reported
while the server goes on."""

from __future__ import annotations

import os
import signal
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("transformers")
import httpx  # noqa: E402
import torch  # noqa: E402

from vlkit.chat import ChatSession  # noqa: E402
from vlkit.errors import VlkitError  # noqa: E402
from vlkit.serve import ServeSettings, cpus, create_app, load_models  # noqa: E402
from vlkit.serve.app import start_engine  # noqa: E402
from vlkit.serve.engine_process import EngineProcess  # noqa: E402
from vlkit.serve.server import serving  # noqa: E402

from _serve_util import NEW, concurrently, data_url, image_message, lm_folder, next_vlm_folder, picture, vlm_folder  # noqa: E402

LONG = 3000  # tokens of an answer that cannot end early: the endless LM never says its EOS


def endless_lm_folder(path):
    """The server tests' chat LM, with a 4096-token context and its EOS row of the output head zeroed:
    greedy answers never end before ``max_tokens`` (a logit of 0 never beats the largest of ~400)."""
    import transformers

    path = lm_folder(path, positions=4096)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_process")
    return {"vlm": vlm_folder(root / "vlm"), "lm": endless_lm_folder(root / "lm"), "next": next_vlm_folder(root / "next")}


@pytest.fixture(scope="module")
def local(folders):
    """The models loaded here, for reference answers (the served ones lose their weights)."""
    return load_models([f"{name}={path}" for name, path in folders.items()])


@pytest.fixture(scope="module")
def served(folders):
    """As ``vlkit serve`` reads them: the chat models without their weights."""
    return load_models([f"{name}={path}" for name, path in folders.items()], chat_weights=False)


@pytest.fixture(scope="module")
def app(served):
    return create_app(served, ServeSettings(engine="process", max_tokens_cap=LONG))


@pytest.fixture(scope="module")
def url(app):
    with serving(app, start_timeout=120) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, messages, **kw):
    return client.chat.completions.create(model=kw.pop("model", "vlm"), messages=messages, max_tokens=kw.pop("max_tokens", NEW),
                                          temperature=kw.pop("temperature", 0), **kw)  # fmt: skip


def reference(local, text: str, images=(), name: str = "vlm") -> str:
    session = ChatSession(local[name].model, options={"max_new_tokens": NEW}, images=list(images))
    return "".join(session.reply(text))


def health(url: str, name: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()["models"][name]


def test_the_model_generates_in_another_process_and_its_weights_stay_out_of_this_one(app, url, served, folders):
    engine = app.state.engines["vlm"]
    assert isinstance(engine, EngineProcess) and engine.process.pid != os.getpid() and engine.process.poll() is None
    assert {p.device.type for p in served["vlm"].model.parameters()} == {"meta"}
    assert health(url, "vlm")["running"] == 0
    loaded = load_models([f"vlm={folders['vlm']}"])["vlm"]  # with its weights: they are freed once the engine runs
    assert loaded.has_weights
    engine = start_engine(loaded, ServeSettings(engine="process"))
    try:
        assert not loaded.has_weights and engine.health()["running"] == 0
    finally:
        engine.close()
    with pytest.raises(VlkitError, match="without its weights"):
        start_engine(served["vlm"], ServeSettings(engine="thread"))


def test_engine_cpus_leave_the_http_handling_at_least_one():
    from vlkit.serve.cpus import engine_cpus

    free = [0, 2, 5, 7]
    assert engine_cpus(1, free) == [7]
    assert engine_cpus(2, free[:3]) == [2, 5]  # a second engine: the last CPUs the first left free
    assert engine_cpus(3, free) == [2, 5, 7]
    assert engine_cpus(2, free[:2]) is None  # it would leave the HTTP handling no CPU: unbound
    assert engine_cpus(4, free) is None and engine_cpus(1, [3]) is None


def _fake_affinity(monkeypatch, usable: list[int]) -> list[list[int]]:
    """This process's CPU binding, faked: every ``cpus.bind`` is recorded (the last is in force)."""
    from vlkit.serve import cpus

    bound = [usable]
    monkeypatch.setattr(cpus, "usable_cpus", lambda: list(bound[-1]))
    monkeypatch.setattr(cpus, "bind", lambda c: bound.append(list(c)))
    return bound


def test_apps_that_overlap_keep_off_each_others_engines_and_give_every_cpu_back(monkeypatch):
    from vlkit.serve import cpus

    bound = _fake_affinity(monkeypatch, [0, 1, 2, 3])
    a, b = object(), object()
    cpus.hold(a, cpus.engine_cpus(1, cpus.free_cpus()))
    assert bound[-1] == [0, 1, 2]
    cpus.hold(b, cpus.engine_cpus(1, cpus.free_cpus()))
    assert bound[-1] == [0, 1]
    cpus.release(a)  # b still serves: its HTTP handling keeps off its engine's CPU, and gets a's back
    assert bound[-1] == [0, 1, 3]
    cpus.release(b)
    assert bound[-1] == [0, 1, 2, 3] and cpus.free_cpus() == [0, 1, 2, 3]


def test_the_cpus_come_back_when_closing_an_engine_fails(folders, monkeypatch):
    import asyncio

    from vlkit.serve import app as app_module

    class Stuck:
        cpus = [1]

        def close(self):
            raise RuntimeError("close failed")

    bound = _fake_affinity(monkeypatch, [0, 1])
    monkeypatch.setattr(app_module, "start_engine", lambda served, settings: Stuck())
    app = create_app(load_models([f"vlm={folders['vlm']}"], chat_weights=False), ServeSettings(engine="process"))

    async def serve():
        async with app.router.lifespan_context(app):
            assert bound[-1] == [0]

    with pytest.raises(RuntimeError, match="close failed"):
        asyncio.run(serve())
    assert bound[-1] == [0, 1]


def _affinities(pid: int) -> set[frozenset[int]]:
    """The CPU sets of every thread of process ``pid`` (a thread that ends meanwhile is left out)."""
    sets = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            sets.add(frozenset(os.sched_getaffinity(int(tid))))
        except ProcessLookupError:
            pass
    return sets


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_an_engine_process_with_a_spare_cpu_is_bound_to_its_own(folders, local, monkeypatch):
    usable = sorted(os.sched_getaffinity(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the engine's threads, as OMP_NUM_THREADS=1 makes them
    served = load_models([f"vlm={folders['vlm']}"], chat_weights=False)
    app = create_app(served, ServeSettings(engine="process", pin_engines=True))
    with serving(app, start_timeout=120) as base:
        assert health(base, "vlm")["cpus"] == usable[-1:]
        assert _affinities(app.state.engines["vlm"].process.pid) == {frozenset(usable[-1:])}  # every thread of it
        assert _affinities(os.getpid()) == {frozenset(usable[:-1])}  # the server's own threads keep off it
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        message = "Describe the picture in a few words."
        assert ask(client, [{"role": "user", "content": message}]).choices[0].message.content == reference(local, message)
    assert _affinities(os.getpid()) == {frozenset(usable)}  # given back when the server stops
    loaded = load_models([f"vlm={folders['vlm']}"])["vlm"]
    cpus.hold("another app", usable[1:])  # its engines leave this process one CPU
    try:  # binding a second engine would leave the HTTP handling no CPU: it stays unbound
        second = start_engine(loaded, ServeSettings(engine="process", pin_engines=True))
        assert second.health()["cpus"] is None and _affinities(second.process.pid) == {frozenset(usable[:1])}
        second.close()
    finally:
        cpus.release("another app")
    assert _affinities(os.getpid()) == {frozenset(usable)}


def test_answers_equal_the_in_process_engine(client, local):
    img = picture("blue")
    plain = ask(client, [{"role": "user", "content": "Hello, how are you?"}]).choices[0].message.content
    assert plain == reference(local, "Hello, how are you?")
    seen = ask(client, image_message("What is in the picture?", data_url(img))).choices[0].message.content
    assert seen == reference(local, "<image>\nWhat is in the picture?", [img])
    chunks = list(ask(client, [{"role": "user", "content": "Hello, how are you?"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    lm = ask(client, [{"role": "user", "content": "Tell me a story."}], model="lm").choices[0].message.content
    assert lm == reference(local, "Tell me a story.", name="lm")


def test_images_of_other_token_counts_share_a_prefill(client, local):
    """LLaVA-NeXT tiles a wide, a tall and a square picture differently: their visual tokens differ
    in count, and concurrent requests are prefilled together, left-padded, in the engine process."""
    pictures = [picture("red", (64, 48)), picture("green", (48, 64)), picture("blue", (64, 64))]
    assert len({local["next"].model.num_image_tokens(img.height, img.width) for img in pictures}) == 3
    answers = concurrently(lambda i: ask(client, image_message("What is in the picture?", data_url(pictures[i % 3])),
                                         model="next").choices[0].message.content, 6)  # fmt: skip
    expected = [reference(local, "<image>\nWhat is in the picture?", [img], name="next") for img in pictures]
    assert answers == [expected[i % 3] for i in range(6)]


def test_seeded_samples_equal_the_in_process_engine(client, local):
    messages = [{"role": "user", "content": "Tell me a story."}]
    there = [c.message.content for c in ask(client, messages, n=3, temperature=1.0, seed=7).choices]
    with serving(create_app(local)) as thread_url:
        here = openai.OpenAI(base_url=f"{thread_url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [c.message.content for c in ask(here, messages, n=3, temperature=1.0, seed=7).choices] == there
    assert len(set(there)) > 1  # three samples, not one answer thrice


def test_concurrent_requests_are_batched_in_the_engine_process(client, url):
    prompts = [image_message(f"Question {i}: what do you see?", data_url(picture(("red", "green")[i % 2])))
               for i in range(8)]  # fmt: skip
    alone = [ask(client, p).choices[0].message.content for p in prompts]
    before = health(url, "vlm")
    assert concurrently(lambda i: ask(client, prompts[i]).choices[0].message.content, 8) == alone
    after = health(url, "vlm")
    assert after["requests"] - before["requests"] == 8
    assert after["rows_stepped"] - before["rows_stepped"] > after["steps"] - before["steps"]  # rows decoded together


def test_a_client_leaving_mid_stream_is_cancelled_in_the_engine_process(client, url):
    body = {"model": "lm", "messages": [{"role": "user", "content": "Count."}], "max_tokens": LONG, "stream": True,
            "temperature": 0}  # fmt: skip
    before = health(url, "lm")
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # read one chunk, then hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = health(url, "lm")
        if stats["running"] == 0 and stats["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    assert stats["running"] == 0 and stats["cancelled"] == before["cancelled"] + 1, stats
    assert stats["rows_stepped"] - before["rows_stepped"] < LONG
    assert ask(client, [{"role": "user", "content": "Count."}], model="lm", max_tokens=5).usage.completion_tokens == 5


def test_ctrl_c_and_sigterm_leave_stopping_to_the_server(app, client, local):
    """They reach the whole process group; the engine must outlive them until the server stops it."""
    pid = app.state.engines["lm"].process.pid
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert app.state.engines["lm"].process.poll() is None
    r = ask(client, [{"role": "user", "content": "Tell me a story."}], model="lm")
    assert r.choices[0].message.content == reference(local, "Tell me a story.", name="lm")


def test_an_engine_process_that_dies_fails_its_requests_and_the_server_goes_on(folders):
    served = load_models([f"lm={folders['lm']}"])
    app = create_app(served, ServeSettings(engine="process", max_tokens_cap=LONG))
    with serving(app, start_timeout=120) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = ask(c, [{"role": "user", "content": "Count."}], model="lm", max_tokens=LONG, stream=True)
        next(iter(stream))
        os.kill(app.state.engines["lm"].process.pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine process exited"):
            list(stream)
        with pytest.raises(openai.InternalServerError, match="engine process exited"):
            ask(c, [{"role": "user", "content": "Count."}], model="lm")
        r = httpx.get(f"{url}/health", timeout=30)
        assert r.status_code == 503 and r.json()["status"] == "down" and "exited" in r.json()["models"]["lm"]["down"]
        assert [m.id for m in c.models.list().data] == ["lm"]


def test_a_model_the_engine_process_cannot_load_is_named(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["lm"], tmp_path / "lm")
    served = load_models([f"lm={folder}"])["lm"]
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(VlkitError, match=r"engine process could not load the model.*config\.json"):
        EngineProcess(served)


def test_messages_carry_plain_data_only():
    """A message naming a class or function is refused; a prompt's tensors travel by dtype, shape and bytes."""
    import pickle
    import socket
    from multiprocessing.connection import Connection

    from vlkit.models.llava_processor import ProcessedSample
    from vlkit.serve.engine_process import _prompt, _prompt_data, _recv
    from vlkit.serve.models import Prompt

    a, b = (Connection(s.detach()) for s in socket.socketpair())
    a.send_bytes(pickle.dumps(("submit", os.system, "echo no")))
    with pytest.raises(pickle.UnpicklingError, match="plain data only"):
        _recv(b)
    images = {"pixel_values": torch.randn(2, 3, 4, 4), "image_sizes": torch.tensor([[4, 4], [8, 6]]),
              "half": torch.randn(3, 5).bfloat16()}  # fmt: skip
    sample = ProcessedSample([5, 6, 7], [-100, -100, 7], images, 2, "the request")
    back = _prompt(_prompt_data(Prompt(sample.input_ids, images, sample)))
    assert back.ids == [5, 6, 7] and back.sample.labels == [-100, -100, 7] and back.sample.num_images == 2
    for key, t in images.items():
        assert back.sample.images[key].dtype == t.dtype and torch.equal(back.sample.images[key], t)
    assert _prompt(_prompt_data(Prompt([1, 2]))).sample is None
