"""The web chat page `k2 serve` answers at `/` (serve/page.py).

* Always: the page is served (HTML, no external URL: nothing from a CDN), and the tool endpoints it
  uses behave (`/k2/tools` lists the world's schemas, `/k2/tools/call` runs one call; both 404 without
  a tool world, both need the key when one is set).
* In a real browser, when Chromium and chromedriver are installed (Debian: `apt-get install chromium
  chromium-driver`; skipped cleanly otherwise): headless Chromium loads the page, a message is typed
  and sent, and the answer streams in (the page's assistant bubble is seen with partial text before
  the end) — with a `ScriptedEngine` that calls a tool first, so the call, its result (run on the
  server) and the answer built from it are all shown; then with a real (random) micro model.
  The browser is driven over WebDriver's HTTP protocol by the small client below (no selenium).
"""

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import torch

from k2cli.data.chat import CALL_ARGS, CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, END

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from k2cli.serve.app import create_app  # noqa: E402
from k2cli.serve.server import BackgroundServer  # noqa: E402
from k2cli.serve.testing import ScriptedEngine  # noqa: E402
from k2cli.serve.tools import tool  # noqa: E402

NAME = "micro/v1"
ANSWER = "Anna Berg was born in Oslo, a city by the fjord."


def script(prompt: str) -> str:
    """Call find_person; answer once its result is in the conversation."""
    if "## Return of functions.find_person:0" in prompt:
        return ANSWER + END
    return (f"Let me look.{CALLS_BEGIN}{CALL_BEGIN}functions.find_person:0{CALL_ARGS}"
            f'{{"name": "Anna Berg"}}{CALL_END}{CALLS_END}{END}')


WORLD = {"find_person": (tool("find_person", "Look up a person.", {"name": {"type": "string"}}),
                         lambda args: {"name": args["name"], "birth_city": "Oslo"})}


@pytest.fixture(scope="module")
def tok():
    from k2cli.data.tokenizer import train_tokenizer

    return train_tokenizer([ANSWER, "Where was Anna Berg born?", "Let me look.", '{"name": "Anna Berg"}'] * 10, vocab_size=300)


def get(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def post(url, body, headers=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_page_and_tool_endpoints(tok):
    engine = ScriptedEngine(tok, script)
    with BackgroundServer(create_app(engine, tok, NAME)) as server:
        root = server.base_url.removesuffix("/v1")
        status, headers, html = get(root + "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "<title>k2 chat</title>" in html and "/v1/chat/completions" in html and "stream: true" in html
        assert "http://" not in html and "https://" not in html  # self-contained: no CDN, no other host
        assert get(root + "/k2/tools")[0] == 404
    with BackgroundServer(create_app(engine, tok, NAME, api_key="k", tools=WORLD)) as server:
        root, key = server.base_url.removesuffix("/v1"), {"Authorization": "Bearer k"}
        assert get(root + "/")[0] == 200  # the page itself needs no key (it asks for one)
        assert get(root + "/k2/tools")[0] == 401
        status, _, text = get(root + "/k2/tools", key)
        assert status == 200 and [t["function"]["name"] for t in json.loads(text)["tools"]] == ["find_person"]
        status, body = post(root + "/k2/tools/call", {"name": "find_person", "arguments": '{"name": "Anna Berg"}'}, key)
        assert status == 200 and json.loads(body["content"]) == {"name": "Anna Berg", "birth_city": "Oslo"}
        status, body = post(root + "/k2/tools/call", {"name": "nope", "arguments": {}}, key)
        assert status == 200 and "unknown tool" in json.loads(body["content"])["error"]  # told to the model
        assert post(root + "/k2/tools/call", {"arguments": {}}, key)[0] == 400
        status, body = post(root + "/k2/tools/call", {"name": "find_person", "arguments": "[" * 100_000}, key)
        assert status == 200 and "nested too deeply" in json.loads(body["content"])["error"]


# ----------------------------------------------------------------------------- a real browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """Just enough of the W3C WebDriver protocol (JSON over HTTP) to drive headless Chromium."""

    def __init__(self, driver: str, browser: str):
        self.port = free_port()
        self.proc = subprocess.Popen([driver, f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                self._call("GET", "/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.proc.kill()
                    raise
                time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"binary": browser, "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.read().decode()[:500]}") from None

    def open(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def js(self, script: str, *args):
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not (value := self.js(script)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {script}\npage: {self.js('return document.body.innerText')}")
            time.sleep(0.05)
        return value

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def chromium():
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    found = chromium()
    if not found:
        pytest.skip("no Chromium + chromedriver here (Debian: apt-get install chromium chromium-driver)")
    wd = WebDriver(found[1], found[0])
    yield wd
    wd.close()


# Records every text the last assistant bubble shows, so a test can tell a streamed answer (several
# growing texts) from one that arrived whole.
WATCH = """
window.k2seen = [];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll('.msg.assistant');
  const last = bubbles[bubbles.length - 1];
  if (last && window.k2seen[window.k2seen.length - 1] !== last.textContent) window.k2seen.push(last.textContent);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


def say(wd, text: str) -> None:
    wd.js("document.getElementById('input').value = arguments[0]; document.getElementById('send').click();", text)


def test_browser_streams_an_answer_with_tool_calls(browser, tok):
    engine = ScriptedEngine(tok, script, context=1024, delay_s=0.02)  # a token every 20 ms: the stream is visible
    with BackgroundServer(create_app(engine, tok, NAME, tools=WORLD)) as server:
        browser.open(server.base_url.removesuffix("/v1") + "/")
        browser.wait("return document.body.dataset.ready === '1'")
        assert NAME in browser.js("return document.getElementById('model').textContent")
        assert "find_person" in browser.js("return document.getElementById('toolinfo').textContent")
        browser.js(WATCH)
        say(browser, "Where was Anna Berg born?")
        browser.wait("const b = document.querySelectorAll('.msg.assistant'); "
                     "return b.length === 2 && b[1].dataset.finish === 'stop'")
        bubbles = browser.js("return [...document.querySelectorAll('.msg')].map(b => [b.className, b.textContent])")
        kinds = [k.split()[1] for k, _ in bubbles]
        assert kinds == ["user", "assistant", "tool", "tool", "assistant"], bubbles
        assert bubbles[1][1] == "Let me look."
        assert bubbles[2][1] == '→ find_person({"name": "Anna Berg"})'
        assert json.loads(bubbles[3][1].removeprefix("← ")) == {"name": "Anna Berg", "birth_city": "Oslo"}
        assert bubbles[4][1] == ANSWER
        seen = browser.js("return window.k2seen")
        partial = [t for t in seen if t and ANSWER.startswith(t) and t != ANSWER]
        assert len(partial) >= 3, seen  # the answer grew on screen as it streamed
        # the server saw the whole tool round trip in k2's format
        assert '## Return of functions.find_person:0\n{"name": "Anna Berg", "birth_city": "Oslo"}' in engine.prompts[-1]
        # a second message continues the same conversation
        say(browser, "Thanks!")
        browser.wait("return document.querySelectorAll('.msg.user').length === 2 && "
                     "document.querySelectorAll('.msg.assistant').length >= 3 && !document.getElementById('send').disabled")
        assert "Thanks!" in engine.prompts[-1] and "Where was Anna Berg born?" in engine.prompts[-1]


def test_browser_with_a_real_micro_model(browser):
    from helpers import PEOPLE, model_artifact
    from k2cli.data.tokenizer import load_tokenizer
    from k2cli.model.io import load_model
    from k2cli.serve.engine import Engine

    torch.set_num_threads(1)
    art = model_artifact([f"{n} was born in {c} in {y}." for n, c, y in PEOPLE] * 5)
    model, _ = load_model(art.path)
    engine = Engine(model, max_batch=4).start()
    try:
        with BackgroundServer(create_app(engine, load_tokenizer(art.path), art.id)) as server:
            browser.open(server.base_url.removesuffix("/v1") + "/")
            browser.wait("return document.body.dataset.ready === '1'")
            assert "no tools" in browser.js("return document.getElementById('toolinfo').textContent")
            browser.js("document.getElementById('max_tokens').value = '12'")
            say(browser, "hello")
            finish = browser.wait("const b = document.querySelector('.msg.assistant'); return b && b.dataset.finish")
            assert finish in ("stop", "length") and not browser.js("return document.querySelector('.msg.error')")
            assert engine.stats["prefills"] >= 1
    finally:
        engine.stop()


def test_k2_serve_tools_option_gives_the_page_a_world():
    """`k2 serve MODEL --tools DATASET_REF`: the dataset's tool world behind /k2/tools."""
    from helpers import PEOPLE, model_artifact
    from k2cli.artifacts import ArtifactWriter
    from k2cli.data.world import build_world, save_world
    from k2cli.stages.serve import build_app

    world = build_world(6, seed=0)
    with ArtifactWriter(stage="synth", kind="dataset") as w:
        save_world(world, w.dir / "world.json")
        ref = w.commit(summary="a world").id.replace("/", ":")
    art = model_artifact([f"{n} was born in {c} in {y}." for n, c, y in PEOPLE] * 5)
    app, engine, served = build_app(art.id.replace("/", ":"), max_batch=2, device="cpu", tools_ref=ref)
    try:
        with BackgroundServer(app) as server:
            root = server.base_url.removesuffix("/v1")
            names = [t["function"]["name"] for t in json.loads(get(root + "/k2/tools")[2])["tools"]]
            assert names == ["find_person", "city_info", "organisation_info"]
            status, body = post(root + "/k2/tools/call", {"name": "find_person", "arguments": {"name": world.people[0].name}})
            assert status == 200 and json.loads(body["content"])["name"] == world.people[0].name
    finally:
        engine.stop()
