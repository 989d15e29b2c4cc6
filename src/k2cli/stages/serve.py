"""`k2 serve MODEL`: an OpenAI-compatible chat-completions server; `k2 chat MODEL`: a terminal chat.

    model artifact (with its tokenizer) -> the batching engine (continuous batching, serve/engine.py)
      serve: FastAPI + uvicorn on 127.0.0.1 (the `serve` extra): /v1/models, /v1/chat/completions
             (tools, tool_choice, n, stop, seed, streaming), optional Bearer key
      chat:  stdin/stdout; tool calls run against a tool world (--tools DATASET_REF) and are shown

Both render conversations with k2's chat format and parse tool calls with its parser
(`k2cli.data.chat`), so a model answers here exactly as SFT and RL saw it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import rich_click as click

from k2cli.console import err, out, quiet
from k2cli.errors import K2Error

DEFAULT_PORT = 8000


def resolve_device(device: str) -> str:
    """`auto` (the default of serve and chat): cuda when torch sees a GPU, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_chat_model(ref: str, device: str = "auto"):
    """(model, tokenizer, artifact) of a model artifact that carries a tokenizer."""
    from k2cli.data.tokenizer import has_tokenizer, load_tokenizer
    from k2cli.model.io import load_model
    from k2cli.model.precision import inference_dtype, store_for_inference

    device = resolve_device(device)
    try:
        model, art = load_model(ref, device=device)
    except RuntimeError as e:  # an unavailable device, or weights that do not fit the model
        hint = "check that the artifact is complete (k2 artifacts verify)" if device == "cpu" else "pass --device cpu"
        raise K2Error(f"cannot load {ref} on {device}: {str(e).splitlines()[0]}", hint)
    if not has_tokenizer(art.path):
        raise K2Error(f"model {art.id} has no tokenizer", "serve a model made by k2 pretrain / sft / rl")
    # this model only generates: store its matrices in the compute dtype once (bf16 on a CUDA GPU)
    store_for_inference(model, inference_dtype(model, model.embed_tokens.weight.device))
    return model, load_tokenizer(art.path), art


# ----------------------------------------------------------------------------- k2 serve


def _serve_extra():
    """The app and server modules (FastAPI, uvicorn), or one clear line when the extra is missing."""
    try:
        from k2cli.serve import app, server
    except ImportError as e:
        # (no square brackets in the hint: the CLI prints errors with rich markup)
        raise K2Error(f"k2 serve needs the serve extra ({e.name} is missing)", "pip install fastapi uvicorn")
    return app, server


def build_app(ref: str, name: str | None = None, api_key: str | None = None, max_batch: int = 32,
              default_max_tokens: int = 512, device: str = "auto", max_waiting: int = 1024, max_body_mb: float = 4.0,
              body_timeout: float = 30.0, tools_ref: str | None = None):
    """(app, engine, served name) for a model artifact; the engine thread is started."""
    create_app = _serve_extra()[0].create_app
    from k2cli.serve.engine import Engine

    if max_batch < 1 or default_max_tokens < 1:
        raise K2Error("--max-batch and --max-tokens must be at least 1", "e.g. --max-batch 32 --max-tokens 512")
    from k2cli.serve.tools import load_tool_world

    world = load_tool_world(tools_ref) if tools_ref else None
    model, tokenizer, art = load_chat_model(ref, device)
    engine = Engine(model, max_batch=max_batch).start()
    served = name or art.id
    app = create_app(engine, tokenizer, served, aliases={ref, art.id}, api_key=api_key,
                     default_max_tokens=default_max_tokens, max_waiting=max_waiting,
                     max_body_bytes=int(max_body_mb * (1 << 20)), body_timeout=body_timeout, tools=world)
    return app, engine, served


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you say otherwise).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0: any free port, printed).")
@click.option("--api-key", envvar="K2_API_KEY", default=None, help="Require `Authorization: Bearer KEY` (or set $K2_API_KEY).")
@click.option("--name", default=None, help="The model name clients send (default: the artifact id, e.g. sft/v1).")
@click.option("--max-batch", default=32, show_default=True, type=int, help="Rows (choices) generated together at most.")
@click.option("--max-tokens", "default_max_tokens", default=512, show_default=True, type=int,
              help="Completion budget when a request sets no max_tokens (capped by the context).")
@click.option("--max-waiting", default=1024, show_default=True, type=click.IntRange(1),
              help="Queued requests beyond which new ones get 429 (server busy).")
@click.option("--device", default="auto", show_default=True, help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads (default: torch's choice).")
@click.option("--tools", "tools_ref", default=None, metavar="DATASET_REF",
              help="Give the web chat at / this dataset's tool world (its calls run on the server, shown in the page).")
@click.option("--max-body-mb", default=4.0, show_default=True, type=click.FloatRange(0.001),
              help="Largest request body accepted (larger ones get 413 before they are read).")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(0.01),
              help="Seconds a connection has to send a complete request head (closes half-open and slow-loris ones).")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(0.01),
              help="Seconds a request body has to arrive (408 after that).")
def serve_cmd(model, host, port, api_key, name, max_batch, default_max_tokens, max_waiting, device, threads,
              tools_ref, max_body_mb, header_timeout, body_timeout):
    """Serve MODEL over an OpenAI-compatible API: `/v1/models`, `/v1/chat/completions` (tools, streaming, logprobs),
    `/v1/completions`; and a web chat page at `/`.

    Point any OpenAI client at the printed URL, e.g. `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")`.
    """
    server_mod = _serve_extra()[1]
    bind, make_server, url_of = server_mod.bind, server_mod.make_server, server_mod.url_of

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        sock = bind(host, port)  # first: a busy port fails before a model is loaded
    except OSError as e:
        raise K2Error(f"cannot listen on {host}:{port}: {e.strerror or e}", "choose another --port (0 picks a free one)")
    try:
        app, engine, served = build_app(model, name, api_key, max_batch, default_max_tokens, device, max_waiting,
                                        max_body_mb, body_timeout, tools_ref)
    except BaseException:
        sock.close()
        raise
    url = url_of(sock)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(f"[yellow]warning:[/] serving on {host} without an API key: anyone who can reach it can use it")
    if not quiet():
        err.print(f"serving [bold]{served}[/] on {engine.device} (context {engine.context}, batch {max_batch}, "
                  f"{'key required' if api_key else 'no key'}) on {url} — web chat at {url.removesuffix('/v1')}/ — "
                  "Ctrl-C stops", soft_wrap=True)
    out.print(url, soft_wrap=True)
    sys.stdout.flush()
    server = make_server(app, log_level="warning" if os.environ.get("K2_QUIET") else "info", header_timeout=header_timeout)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()


# ----------------------------------------------------------------------------- k2 chat

HELP = "commands: /reset (forget the conversation), /save FILE (write it as JSON), /quit"


@dataclass
class ChatSettings:
    system: str | None = None
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    max_tool_rounds: int = 4


class ChatSession:
    """A conversation with a model: history, tool execution, save/reset. Usable without a terminal."""

    def __init__(self, engine, tokenizer, settings: ChatSettings, world=None, echo=None, echo_tool=None, begin=None, end=None):
        from k2cli.serve.tools import tool_schemas

        self.engine, self.tok, self.s, self.world = engine, tokenizer, settings, world
        self.tools = tool_schemas(world) if world else None
        self.echo = echo or (lambda text: None)  # the assistant's text, as it streams
        self.echo_tool = echo_tool or (lambda text: None)  # tool calls and results, one line each
        self.begin, self.end = begin or (lambda: None), end or (lambda: None)  # around each assistant turn
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.s.system}] if self.s.system else []

    def save(self, path: str) -> Path:
        p = Path(path).expanduser()
        try:
            p.write_text(json.dumps({"messages": self.messages, "tools": self.tools}, indent=1, ensure_ascii=False) + "\n")
        except OSError as e:
            raise K2Error(f"cannot write {p}: {e.strerror}", "choose another file")
        return p

    def say(self, text: str) -> list[dict]:
        """Add a user message and generate until the assistant answers without calling a tool.

        Returns the messages this exchange added. On an error the conversation is left as it was.
        """
        start = len(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            for _ in range(self.s.max_tool_rounds + 1):
                turn, began_call = self._assistant_turn()
                msg = {"role": "assistant", "content": turn.content}
                calls = [{"id": c["id"], "type": "function",
                          "function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                         for c in turn.tool_calls]
                if calls:
                    msg["tool_calls"] = calls
                self.messages.append(msg)
                for e in turn.errors:
                    self.echo_tool(f"! malformed tool call: {e}")
                if began_call:  # without tools the call section is a stop token: the turn ended there
                    self.echo_tool("! the model began a tool call, but no tool world is loaded (--tools DATASET_REF)")
                if not calls:
                    break
                self._run_calls(calls)
            else:
                self.echo_tool(f"! stopped after {self.s.max_tool_rounds} rounds of tool calls")
        except BaseException:
            del self.messages[start:]
            raise
        return self.messages[start:]

    def _run_calls(self, calls: list[dict]) -> None:
        from k2cli.serve.tools import execute

        for c in calls:
            name, args = c["function"]["name"], c["function"]["arguments"]
            self.echo_tool(f"→ {name}({json.dumps(args, ensure_ascii=False)})")
            result = execute(self.world, name, args)
            self.echo_tool(f"← {result}")
            self.messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})

    def _assistant_turn(self):
        from k2cli.data.chat import CALLS_BEGIN
        from k2cli.serve.engine import SamplingParams
        from k2cli.serve.turns import TurnDecoder, build_prompt

        prompt = build_prompt(self.tok, self.messages, self.tools)
        room = self.engine.context - len(prompt.ids)
        if room < 1:
            raise K2Error(f"the conversation is {len(prompt.ids)} tokens, the model's context is {self.engine.context}",
                          "/reset to start over")
        params = SamplingParams(max_tokens=min(self.s.max_tokens, room), temperature=self.s.temperature,
                                top_p=self.s.top_p, seed=self.s.seed + self.turns, stop_ids=prompt.stop_ids)
        self.turns += 1
        decoder = TurnDecoder(self.tok, prefix=prompt.prefix, allow_tools=prompt.allow_tools)
        reason = "length"
        self.begin()
        for kind, _, value in self.engine.stream(prompt.ids, params):
            if kind == "token":
                self.echo(decoder.feed(value))
            elif kind == "done":
                reason = value
            elif kind == "error":
                raise K2Error(f"generation failed: {value}")
        self.echo(decoder.flush())
        self.end()
        began_call = not prompt.allow_tools and decoder.ids[-1:] == [self.tok.token_id(CALLS_BEGIN)]
        return decoder.finish(reason), began_call


def open_chat_engine(ref: str, device: str = "auto"):
    """(engine, tokenizer, name) for `k2 chat`: an inline (unthreaded) engine of one row.

    Test hook: tests replace this function (monkeypatch) to chat with a `serve.testing.ScriptedEngine`.
    """
    from k2cli.serve.engine import Engine

    model, tokenizer, art = load_chat_model(ref, device)
    return Engine(model, max_batch=1), tokenizer, art.id


@click.command("chat")
@click.argument("model")
@click.option("--system", default=None, help="A system prompt.")
@click.option("--tools", "tools_ref", default=None, metavar="DATASET_REF",
              help="Run the model's tool calls against this dataset's tool world (its world.json).")
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0, 2))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1), help="Per assistant turn.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="torch device: auto (cuda when available, else cpu), cpu, cuda, ...")
def chat_cmd(model, system, tools_ref, temperature, top_p, max_tokens, seed, device):
    """Chat with MODEL in the terminal; tool calls are executed and shown. Commands: /reset, /save FILE, /quit."""
    from k2cli.serve.tools import load_tool_world

    world = load_tool_world(tools_ref) if tools_ref else None
    engine, tokenizer, name = open_chat_engine(model, device)
    settings = ChatSettings(system, temperature, top_p, max_tokens, seed)
    session = ChatSession(engine, tokenizer, settings, world,
                          echo=lambda text: click.echo(text, nl=False) if text else None,
                          echo_tool=lambda line: err.print(f"  {line}", soft_wrap=True, markup=False, style="dim"),
                          begin=lambda: click.echo("assistant> ", nl=False), end=lambda: click.echo(""))
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover
        pass
    tools_note = (f"{len(world)} tools from {tools_ref}" if world else
                  "no tools (pass --tools DATASET_REF to run the model's tool calls against a dataset's world)")
    err.print(f"[bold]k2 chat[/] with {name}, {tools_note}. {HELP}", soft_wrap=True, markup=True)
    while True:
        click.echo("you> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            click.echo("", err=True)
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit", "/q"):
                break
            if cmd == "/reset":
                session.reset()
                err.print("(conversation reset)")
            elif cmd == "/save":
                if not arg.strip():
                    err.print("usage: /save FILE")
                    continue
                try:
                    err.print(f"(saved {len(session.messages)} messages to {session.save(arg.strip())})", markup=False)
                except K2Error as e:
                    err.print(f"error: {e.line()}", markup=False)
            elif cmd == "/help":
                err.print(HELP, soft_wrap=True)
            else:
                err.print(f"unknown command {cmd}; {HELP}", markup=False, soft_wrap=True)
            continue
        try:
            session.say(text)
        except K2Error as e:
            err.print(f"error: {e.line()}", markup=False)
        except KeyboardInterrupt:
            err.print("\n(interrupted; that exchange was dropped)")


COMMANDS = [serve_cmd, chat_cmd]
