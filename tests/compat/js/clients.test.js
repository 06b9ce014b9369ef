// ollama-js (npm `ollama`), unchanged, against a running `duet serve` (CPU layout): chat
// and generate streamed and not, tool calls, schema output, embeddings, keep_alive.
// Run by scripts/test with DUET_URL set: `node --test` in this folder.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { Ollama } from "ollama";

const ollama = new Ollama({ host: process.env.DUET_URL ?? "http://127.0.0.1:11434" });
const SMALL = "qwen2.5-coder:0.5b";
const LARGE = "qwen2.5-coder:1.5b";
const EMBED = "all-minilm";
const weather = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather for a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};
const ask = [{ role: "user", content: "What is the weather in Paris right now?" }];

test("list, show and version", async () => {
  const { models } = await ollama.list();
  assert.deepEqual(models.map((m) => m.model), [SMALL, LARGE, "auto", EMBED]);
  const show = await ollama.show({ model: LARGE });
  assert.equal(show.model_info["general.architecture"], "qwen2");
  assert.ok(show.capabilities.includes("tools"));
  assert.ok(show.template.includes(".Suffix"));
});

test("generate and chat, streamed and not", async () => {
  const r = await ollama.generate({ model: SMALL, prompt: "def add(a, b):", raw: true, options: { temperature: 0, num_predict: 8 } });
  assert.equal(r.done, true);
  assert.equal(r.eval_count, 8);
  let text = "";
  for await (const part of await ollama.chat({ model: SMALL, messages: [{ role: "user", content: "Say hi." }], stream: true, options: { num_predict: 6, seed: 1 } })) {
    text += part.message.content;
    if (part.done) assert.equal(part.eval_count, 6);
  }
  assert.ok(text.length > 0);
});

test("tool calls, streamed and not, and the answer to a result", async () => {
  const r = await ollama.chat({ model: LARGE, messages: ask, tools: [weather], options: { temperature: 0 } });
  const call = r.message.tool_calls[0];
  assert.equal(call.function.name, "get_weather");
  assert.deepEqual(call.function.arguments, { city: "Paris" });
  const streamed = [];
  for await (const part of await ollama.chat({ model: LARGE, messages: ask, tools: [weather], stream: true, options: { temperature: 0 } })) {
    streamed.push(...(part.message.tool_calls ?? []));
  }
  assert.deepEqual(streamed.map((c) => c.function.name), ["get_weather"]);
  const history = [
    ...ask,
    r.message,
    { role: "tool", tool_name: "get_weather", content: "18 C, cloudy" },
    { role: "user", content: "So, do I need a coat? Answer in one sentence without calling tools." },
  ];
  const answer = await ollama.chat({ model: LARGE, messages: history, tools: [weather], options: { temperature: 0, num_predict: 40 } });
  assert.ok(answer.message.content.length > 0);
});

test("a JSON schema is always followed", async () => {
  const schema = {
    type: "object",
    properties: { languages: { type: "array", items: { type: "object", properties: { name: { type: "string" }, year: { type: "integer" } }, required: ["name", "year"] } } },
    required: ["languages"],
  };
  const r = await ollama.chat({ model: SMALL, messages: [{ role: "user", content: "Name two programming languages and their years." }], format: schema, options: { temperature: 0, num_predict: 200 } });
  const v = JSON.parse(r.message.content);
  assert.ok(Array.isArray(v.languages));
  for (const l of v.languages) {
    assert.equal(typeof l.name, "string");
    assert.ok(Number.isInteger(l.year));
  }
});

test("embeddings match the reference vectors", async () => {
  const ref = JSON.parse(readFileSync(new URL("../../vectors/embeddings-all-minilm-l6-v2.json", import.meta.url)));
  const cases = ref.cases.slice(0, 3);
  const r = await ollama.embed({ model: EMBED, input: cases.map((c) => c.input) });
  assert.equal(r.embeddings.length, cases.length);
  r.embeddings.forEach((got, i) => {
    const want = cases[i].embedding;
    let dot = 0, a = 0, b = 0;
    for (let k = 0; k < want.length; k++) { dot += got[k] * want[k]; a += got[k] ** 2; b += want[k] ** 2; }
    assert.ok(dot / Math.sqrt(a * b) >= 0.999);
  });
});

test("keep_alive 0 unloads, the next request loads again", async () => {
  const r = await ollama.generate({ model: SMALL, prompt: "", keep_alive: 0 });
  assert.equal(r.done_reason, "unload");
  const loaded = async () => (await ollama.ps()).models.some((m) => m.model === SMALL);
  for (let i = 0; i < 200 && (await loaded()); i++) await new Promise((ok) => setTimeout(ok, 50));
  assert.equal(await loaded(), false);
  const again = await ollama.generate({ model: SMALL, prompt: "def add(a, b):", raw: true, keep_alive: "5m", options: { num_predict: 3 } });
  assert.equal(again.eval_count, 3);
  assert.equal(await loaded(), true);
  await ollama.generate({ model: SMALL, prompt: "", keep_alive: -1 });
});
