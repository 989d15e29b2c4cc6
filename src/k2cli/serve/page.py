"""The web chat page `k2 serve` answers at `/`: one self-contained HTML document (no build step, no CDN).

It speaks only to the server it came from: `GET /v1/models` for the model name, `POST
/v1/chat/completions` with `stream: true` (server-sent events read from `fetch`'s body stream), and,
when the server was started with `--tools DATASET_REF`, `GET /k2/tools` (the tool schemas it declares
with every request) and `POST /k2/tools/call` (runs one call). A tool call streams in as the model
writes it, is shown with its arguments, run, its result shown and sent back, and the model answers
from it (up to 4 rounds per message), as `k2 chat --tools` does in the terminal. An API key, when the
server needs one, is asked for once and kept in the browser's localStorage.

Kept as a Python string, not a file next to this one, so that it ships in any wheel without
package-data configuration.
"""

HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>k2 chat</title>
<style>
  :root { --fg: #1d1d1f; --muted: #6b6b70; --line: #dcdce0; --user: #e8f0fe; --bot: #f5f5f7; --tool: #fff8e1; --err: #fdecea; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--fg); display: flex; flex-direction: column; height: 100vh; }
  header { padding: 8px 16px; border-bottom: 1px solid var(--line); display: flex; gap: 12px; align-items: center; flex-wrap: wrap; }
  header b { font-size: 16px; }
  header label { color: var(--muted); font-size: 13px; }
  header input { width: 5em; }
  header input::placeholder { color: var(--muted); }
  #system { width: 22em; }
  #log { flex: 1; overflow-y: auto; padding: 16px; display: flex; flex-direction: column; gap: 10px; }
  .msg { max-width: 80ch; padding: 8px 12px; border-radius: 8px; white-space: pre-wrap; word-wrap: break-word; }
  .user { background: var(--user); align-self: flex-end; }
  .assistant { background: var(--bot); }
  .tool { background: var(--tool); font-family: ui-monospace, monospace; font-size: 13px; }
  .error { background: var(--err); }
  .meta { color: var(--muted); font-size: 12px; }
  form { display: flex; gap: 8px; padding: 12px 16px; border-top: 1px solid var(--line); }
  textarea { flex: 1; resize: vertical; min-height: 2.6em; font: inherit; padding: 6px; }
  button { font: inherit; padding: 6px 14px; }
</style>
</head>
<body>
<header>
  <b>k2 chat</b><span id="model" class="meta">connecting…</span><span id="toolinfo" class="meta"></span>
  <label>system <input id="system" placeholder="optional system prompt"></label>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" placeholder="auto"></label>
  <button id="reset" type="button">New chat</button>
</header>
<main id="log"></main>
<form id="form">
  <textarea id="input" placeholder="Message (Enter sends, Shift+Enter: new line)" autofocus></textarea>
  <button id="send" type="submit">Send</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const state = { model: null, tools: null, messages: [], busy: false };
const MAX_TOOL_ROUNDS = 4;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem("k2-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// fetch with the API key; a 401 asks for the key once and retries
async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const r = await fetch(path, { ...options, headers: headers() });
    if (r.status !== 401 || attempt > 0) return r;
    const key = prompt("This server needs an API key:");
    if (!key) return r;
    localStorage.setItem("k2-api-key", key);
  }
}

async function errorText(r) {
  try { return (await r.json()).error.message; } catch (e) { return r.status + " " + r.statusText; }
}

function bubble(kind, text = "") {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

// one assistant turn, streamed into a bubble; -> {content, tool_calls, finish_reason}
async function streamTurn() {
  const body = { model: state.model, messages: state.messages, stream: true, temperature: Number($("temperature").value) };
  if ($("max_tokens").value) body.max_tokens = Number($("max_tokens").value);  // else: the server's budget, within the context
  const system = $("system").value.trim();
  if (system) body.messages = [{ role: "system", content: system }, ...state.messages];
  if (state.tools) body.tools = state.tools;
  const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body) });
  if (!r.ok) throw new Error(await errorText(r));
  const div = bubble("assistant");
  const turn = { content: "", tool_calls: [], finish_reason: null };
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event per blank-line-ended block
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) { turn.content += delta.content; div.textContent = turn.content; }
        for (const call of delta.tool_calls || []) turn.tool_calls[call.index] = call;
        if (choice.finish_reason) turn.finish_reason = choice.finish_reason;
      }
      $("log").scrollTop = $("log").scrollHeight;
    }
  }
  if (!turn.content && turn.tool_calls.length) div.remove();
  else if (!turn.content) div.textContent = "(no text)";
  div.dataset.finish = turn.finish_reason || "";
  return turn;
}

async function runTool(call) {
  bubble("tool", "→ " + call.function.name + "(" + call.function.arguments + ")");
  const r = await api("/k2/tools/call", { method: "POST",
    body: JSON.stringify({ name: call.function.name, arguments: call.function.arguments }) });
  const content = r.ok ? (await r.json()).content : JSON.stringify({ error: await errorText(r) });
  bubble("tool", "← " + content);
  return content;
}

async function send(text) {
  const start = state.messages.length;
  state.messages.push({ role: "user", content: text });
  bubble("user", text);
  try {
    for (let round = 0; round <= MAX_TOOL_ROUNDS; round++) {
      const turn = await streamTurn();
      const msg = { role: "assistant", content: turn.content };
      if (turn.tool_calls.length) msg.tool_calls = turn.tool_calls;
      state.messages.push(msg);
      if (!turn.tool_calls.length) return;
      if (round === MAX_TOOL_ROUNDS) { bubble("tool", "! stopped after " + MAX_TOOL_ROUNDS + " rounds of tool calls"); return; }
      for (const call of turn.tool_calls)
        state.messages.push({ role: "tool", tool_call_id: call.id, content: await runTool(call) });
    }
  } catch (e) {
    state.messages.length = start;  // the exchange failed: the conversation is left as it was
    bubble("error", "error: " + e.message);
  }
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy || !state.model) return;
  $("input").value = "";
  state.busy = true; $("send").disabled = true;
  try { await send(text); } finally { state.busy = false; $("send").disabled = false; $("input").focus(); }
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("reset").addEventListener("click", () => { state.messages = []; $("log").textContent = ""; });

(async () => {
  const r = await api("/v1/models");
  if (!r.ok) { $("model").textContent = "error: " + await errorText(r); return; }
  state.model = (await r.json()).data[0].id;
  $("model").textContent = state.model;
  const t = await api("/k2/tools");
  if (t.ok) {
    state.tools = (await t.json()).tools;
    $("toolinfo").textContent = "· tools: " + state.tools.map((x) => x.function.name).join(", ");
  } else {
    $("toolinfo").textContent = "· no tools (k2 serve --tools DATASET_REF)";
  }
  document.body.dataset.ready = "1";
})();
</script>
</body>
</html>
"""
