// ─────────────────────────────────────────────────────────────────────────────────────────────
// Runtime: configuration, template helpers, HTTP with retries, model providers, notifications,
// history. Everything below "Blueprint" is the automation itself.
// ─────────────────────────────────────────────────────────────────────────────────────────────

import { readFileSync, mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { hostname as osHostname } from "node:os";
import { createRequire } from "node:module";

class BadInput extends Error {}

function loadDotenv(path = ".env") {
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    return;
  }
  for (let line of text.split("\n")) {
    line = line.trim();
    if (!line || line.startsWith("#") || !line.includes("=")) continue;
    let [key, ...rest] = line.split("=");
    key = key.trim().replace(/^export\s+/, "");
    let value = rest.join("=").trim();
    if (value.length >= 2 && value[0] === value.at(-1) && (value[0] === '"' || value[0] === "'")) {
      value = value.slice(1, -1);
    }
    if (process.env[key] === undefined) process.env[key] = value;
  }
}

function env(name, fallback = null) {
  const value = (process.env[name] ?? "").trim();
  return value ? value : fallback;
}

function envInt(name, fallback, minimum = 0) {
  const value = env(name);
  if (value === null) return fallback;
  const n = /^\d+$/.test(value) ? Number(value) : -1;
  if (n < minimum) throw new BadInput(`${name}=${JSON.stringify(value)} is not valid: expected a whole number`);
  return n;
}

function envBool(name) {
  const value = (env(name) ?? "false").toLowerCase();
  if (["1", "true", "yes", "on"].includes(value)) return true;
  if (["0", "false", "no", "off"].includes(value)) return false;
  throw new BadInput(`${name}=${JSON.stringify(value)} is not valid: expected true or false`);
}

function loadConfig() {
  const scale = Number(env("OMNIFLOW_TIME_SCALE", "1"));
  if (!(scale > 0) || !Number.isFinite(scale)) {
    throw new BadInput(`OMNIFLOW_TIME_SCALE=${JSON.stringify(env("OMNIFLOW_TIME_SCALE"))} is not valid: expected a positive number`);
  }
  return {
    hfToken: env("HUGGINGFACE_TOKEN") ?? env("HF_TOKEN"),
    hfUrl: env("HF_INFERENCE_URL", "https://router.huggingface.co").replace(/\/+$/, ""),
    useOllama: envBool("USE_OLLAMA"),
    ollamaUrl: env("OLLAMA_URL", "http://localhost:11434").replace(/\/+$/, ""),
    ollamaModel: env("OLLAMA_MODEL"),
    openaiUrl: env("OPENAI_BASE_URL")?.replace(/\/+$/, "") || null,
    openaiKey: env("OPENAI_API_KEY"),
    requestTimeout: envInt("REQUEST_TIMEOUT", 300, 1),
    maxRetries: Math.min(envInt("MAX_RETRIES", 3, 0), 100),
    telegramToken: env("TELEGRAM_BOT_TOKEN"),
    telegramChat: env("TELEGRAM_CHAT_ID"),
    telegramUrl: env("TELEGRAM_API_URL", "https://api.telegram.org").replace(/\/+$/, ""),
    discordWebhook: env("DISCORD_WEBHOOK") ?? env("DISCORD_WEBHOOK_URL"),
    dbFile: env("DB_FILE", "./automation_runner.db"),
    concurrency: Math.min(envInt("CONCURRENCY", 32, 1), 4096),
    timeScale: scale,
  };
}

let CONFIG = null;
const ABORT = new AbortController();

/** Every wait goes through here: OMNIFLOW_TIME_SCALE=0.001 makes tests 1000x faster. */
function scaled(seconds) {
  return seconds * CONFIG.timeScale;
}

/** A timeout under OMNIFLOW_TIME_SCALE is scaled too, but never below 1 s: a test machine's
 * first connection must not time out. */
function scaledTimeoutMs(seconds) {
  return CONFIG.timeScale === 1 ? seconds * 1000 : Math.max(scaled(seconds) * 1000, 1000);
}

function sleep(seconds) {
  return new Promise((resolve) => {
    if (ABORT.signal.aborted) return resolve(true);
    const done = () => {
      clearTimeout(timer);
      ABORT.signal.removeEventListener("abort", done);
      resolve(ABORT.signal.aborted);
    };
    const timer = setTimeout(done, scaled(seconds) * 1000);
    ABORT.signal.addEventListener("abort", done);
  });
}

// ── Errors ────────────────────────────────────────────────────────────────────────────────────

const RETRYABLE = new Set(["timeout", "rate_limited", "model_loading", "server", "network", "empty_output",
  "truncated_stream", "bad_response"]);

/** A failed attempt: a kind (which alone decides whether to retry), a message, and the
 * provider's own hint of how long to wait (seconds). */
class StepError extends Error {
  constructor(kind, message, retryAfter = null) {
    super(message);
    this.kind = kind;
    this.retryAfter = retryAfter;
  }
}

class TemplateError extends Error {}

/** Names the field in a template error: `field("node.prompt", () => …)`. */
function field(name, render) {
  try {
    return render();
  } catch (e) {
    if (e instanceof TemplateError) throw new StepError("template", name ? `${name}: ${e.message}` : e.message);
    throw e;
  }
}

// ── Template helpers (minijinja semantics) ────────────────────────────────────────────────────

/** A value that is not there: false in `if`, replaced by `default`, an error when printed. */
const UNDEF = Object.freeze({ undefinedValue: true });

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && v !== UNDEF;

function get(value, ...path) {
  for (const key of path) {
    if (value === UNDEF) throw new TemplateError(`undefined value (cannot look up ${JSON.stringify(key)} in an undefined value)`);
    if (isObject(value)) {
      value = typeof key === "string" && Object.hasOwn(value, key) ? value[key] : UNDEF;
    } else if ((Array.isArray(value) || typeof value === "string") && Number.isInteger(key)) {
      const items = typeof value === "string" ? Array.from(value) : value;
      const i = key < 0 ? items.length + key : key;
      value = i >= 0 && i < items.length ? items[i] : UNDEF;
    } else {
      value = UNDEF;
    }
  }
  return value;
}

function truthy(v) {
  if (v === UNDEF || v === null || v === undefined || v === false || v === 0 || v === "") return false;
  if (Array.isArray(v)) return v.length > 0;
  if (isObject(v)) return Object.keys(v).length > 0;
  return true;
}

const and = (a, b) => { const x = a(); return truthy(x) ? b() : x; };
const or = (a, b) => { const x = a(); return truthy(x) ? x : b(); };

/** minijinja's plain string form of a value (join, ~, string filters). */
function display(v) {
  if (v === UNDEF) return "";
  if (v === null) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (Array.isArray(v) || isObject(v)) return JSON.stringify(v, null, 1).replace(/\n\s*/g, " ").replace(/([[{]) /g, "$1").replace(/ ([\]}])/g, "$1");
  return String(v);
}

/** What `{{ value }}` prints: none → empty, lists and maps → compact JSON. */
function text(v) {
  if (v === UNDEF) throw new TemplateError("undefined value");
  if (v === null) return "";
  if (Array.isArray(v) || isObject(v)) return JSON.stringify(v);
  return display(v);
}

function stringArg(v, what) {
  if (v === UNDEF) throw new TemplateError(`undefined value passed to \`${what}\``);
  return typeof v === "string" ? v : display(v);
}

function itemsOf(v, what = "iterate over") {
  if (v === UNDEF) throw new TemplateError(`undefined value (cannot ${what} an undefined value)`);
  if (Array.isArray(v)) return v;
  if (isObject(v)) return Object.keys(v);
  if (typeof v === "string") return Array.from(v);
  throw new TemplateError(`invalid operation: cannot ${what} ${display(v)}`);
}

function* withLoop(value) {
  const items = itemsOf(value);
  const n = items.length;
  for (let i = 0; i < n; i++) {
    yield [{ index0: i, index: i + 1, first: i === 0, last: i === n - 1, length: n, revindex: n - i, revindex0: n - i - 1 }, items[i]];
  }
}

const join = (v, sep = "") => itemsOf(v, "join").map((x) => (typeof x === "string" ? x : display(x)))
  .join(sep === undefined || sep === null ? "" : stringArg(sep, "join"));

function tojson(v, indent) {
  if (v === UNDEF) throw new TemplateError("undefined value passed to `tojson`");
  if (indent === true) indent = 2;
  const out = indent === undefined || indent === null || indent === false ? JSON.stringify(v) : JSON.stringify(v, null, indent);
  return out.replaceAll("<", "\\u003c").replaceAll(">", "\\u003e").replaceAll("&", "\\u0026").replaceAll("'", "\\u0027");
}

function fromjson(v) {
  try {
    return JSON.parse(stringArg(v, "fromjson"));
  } catch (e) {
    if (e instanceof TemplateError) throw e;
    throw new TemplateError(`invalid operation: fromjson: not valid JSON: ${e.message}`);
  }
}

const default_ = (v, other = "") => (v === UNDEF ? other : v);

function truncate(v, length = 255, killwords = false, end = "...", leeway = 5) {
  const chars = Array.from(stringArg(v, "truncate"));
  length ??= 255; end ??= "..."; leeway ??= 5;
  const endLen = Array.from(end).length;
  if (length < endLen) throw new TemplateError(`truncate: length ${length} is shorter than the end marker ${JSON.stringify(end)}`);
  if (chars.length <= length + leeway) return chars.join("");
  const head = chars.slice(0, length - endLen).join("");
  if (killwords) return head + end;
  const pos = head.lastIndexOf(" ");
  return (pos >= 0 ? head.slice(0, pos) : head) + end;
}

const upper = (v) => stringArg(v, "upper").toUpperCase();
const lower = (v) => stringArg(v, "lower").toLowerCase();
const trim = (v) => stringArg(v, "trim").trim();
const replace = (v, a, b) => stringArg(v, "replace").replaceAll(stringArg(a, "replace"), stringArg(b, "replace"));

function length(v) {
  if (typeof v === "string") return Array.from(v).length;
  if (Array.isArray(v)) return v.length;
  if (isObject(v)) return Object.keys(v).length;
  throw new TemplateError(`invalid operation: cannot calculate length of ${display(v)}`);
}

function first(v) {
  const items = itemsOf(v, "get the first item of");
  return items.length ? items[0] : UNDEF;
}

function last(v) {
  const items = itemsOf(v, "get the last item of");
  return items.length ? items.at(-1) : UNDEF;
}

function lines(v) {
  const out = stringArg(v, "lines").split("\n");
  if (out.length && out.at(-1) === "") out.pop();
  return out.map((l) => (l.endsWith("\r") ? l.slice(0, -1) : l));
}

function sliceOf(v, start, stop) {
  if (v === UNDEF) throw new TemplateError("undefined value (cannot slice an undefined value)");
  const cut = (items) => {
    const n = items.length;
    const norm = (i, d) => (i === null || i === undefined ? d : i < 0 ? Math.max(n + i, 0) : Math.min(i, n));
    return items.slice(norm(start, 0), norm(stop, n));
  };
  if (typeof v === "string") return cut(Array.from(v)).join("");
  if (Array.isArray(v)) return cut(v);
  throw new TemplateError(`invalid operation: cannot slice ${display(v)}`);
}
const slice_of = sliceOf;

function eq(a, b) {
  if (a === b) return true;
  if (Array.isArray(a) && Array.isArray(b)) return a.length === b.length && a.every((x, i) => eq(x, b[i]));
  if (isObject(a) && isObject(b)) {
    const ka = Object.keys(a);
    return ka.length === Object.keys(b).length && ka.every((k) => Object.hasOwn(b, k) && eq(a[k], b[k]));
  }
  return false;
}
const ne = (a, b) => !eq(a, b);

function ordered(a, b) {
  const ok = (typeof a === "number" && typeof b === "number") || (typeof a === "string" && typeof b === "string");
  if (!ok) throw new TemplateError(`invalid operation: cannot compare ${display(a)} and ${display(b)}`);
}
const lt = (a, b) => (ordered(a, b), a < b);
const le = (a, b) => (ordered(a, b), a <= b);
const gt = (a, b) => (ordered(a, b), a > b);
const ge = (a, b) => (ordered(a, b), a >= b);

function contains(container, item) {
  if (typeof container === "string") return typeof item === "string" && container.includes(item);
  if (Array.isArray(container)) return container.some((x) => eq(x, item));
  if (isObject(container)) return typeof item === "string" && Object.hasOwn(container, item);
  throw new TemplateError(`invalid operation: cannot perform a containment check on ${display(container)}`);
}
const not_contains = (c, i) => !contains(c, i);
const concat = (a, b) => display(a) + display(b);

function number(v) {
  if (typeof v !== "number") throw new TemplateError(`invalid operation: ${display(v)} is not a number`);
  return v;
}
function add(a, b) {
  if (typeof a === "string" && typeof b === "string") return a + b;
  if (Array.isArray(a) && Array.isArray(b)) return [...a, ...b];
  return number(a) + number(b);
}
const sub = (a, b) => number(a) - number(b);
const neg = (a) => -number(a);
const is_defined = (v) => v !== UNDEF;
const is_undefined = (v) => v === UNDEF;
const is_none = (v) => v === null;

function jsonType(v) {
  if (v === null || v === UNDEF) return "null";
  if (typeof v === "boolean") return "a boolean";
  if (typeof v === "number") return Number.isInteger(v) ? "an integer" : "a number";
  if (typeof v === "string") return "a string";
  if (Array.isArray(v)) return "a list";
  return "an object";
}

/** A forEach's items: a list, or a string holding a JSON array. */
function asList(v) {
  if (Array.isArray(v)) return v;
  if (typeof v === "string") {
    let parsed = null;
    try { parsed = JSON.parse(v.trim()); } catch { /* not JSON */ }
    if (Array.isArray(parsed)) return parsed;
    const chars = Array.from(v);
    const short = chars.slice(0, 40).join("") + (chars.length > 40 ? "…" : "");
    throw new StepError("template", `forEach must yield a list, got a string that is not a JSON array (${JSON.stringify(short)})`);
  }
  throw new StepError("template", `forEach must yield a list, got ${jsonType(v)}`);
}

function parseJsonText(nodeId, t) {
  try {
    return JSON.parse(t.trim());
  } catch (e) {
    throw new StepError("template", `${nodeId}.template: the rendered text is not valid JSON (${e.message}); use \`tojson\` for values, or parse: "text"`);
  }
}

// ── HTTP ──────────────────────────────────────────────────────────────────────────────────────

const MAX_BODY_BYTES = 10 * 1024 * 1024;
const fmtSecs = (s) => String(s);

/** One HTTP request → { status, headers, text }; a transport failure is a StepError. `service`
 * replaces the URL in messages (it may hold a token). */
async function request(method, url, headers = {}, body = null, timeout = 300, service = null) {
  headers = { "User-Agent": "omniflow-export/1", ...headers };
  let payload;
  if (body !== null && body !== undefined) {
    if (typeof body === "string") payload = body;
    else {
      payload = JSON.stringify(body);
      if (!Object.keys(headers).some((k) => k.toLowerCase() === "content-type")) headers["Content-Type"] = "application/json";
    }
  }
  const where = service ?? url;
  const signal = AbortSignal.any([ABORT.signal, AbortSignal.timeout(scaledTimeoutMs(timeout))]);
  try {
    const resp = await fetch(url, { method, headers, body: payload, signal });
    const buf = Buffer.from(await resp.arrayBuffer());
    if (buf.length > MAX_BODY_BYTES) throw new StepError("bad_response", `${where} answered with more than ${MAX_BODY_BYTES >> 20} MiB; refused`);
    return { status: resp.status, headers: resp.headers, text: buf.toString("utf8") };
  } catch (e) {
    if (e instanceof StepError) throw e;
    if (ABORT.signal.aborted) throw new StepError("cancelled", "cancelled");
    if (e?.name === "TimeoutError") throw new StepError("timeout", `request to ${where} timed out`);
    throw new StepError("network", `request to ${where} failed (${e?.cause?.code ?? e?.message ?? e})`);
  }
}

/** Retry-After in seconds: a number, or an HTTP-date turned into the time left until it. */
function retryAfterHeader(headers) {
  const raw = (headers.get("retry-after") ?? "").trim();
  if (raw === "") return null;
  const value = Number(raw);
  if (!Number.isNaN(value)) return Number.isFinite(value) && value >= 0 ? value : null;
  const at = Date.parse(raw);
  return Number.isNaN(at) ? null : Math.max(0, (at - Date.now()) / 1000);
}

/** An http node's attempt: the reply's body as text, or as JSON. */
async function httpNode(method, url, headers, body, response, timeout) {
  const r = await request(method, url, headers, body, timeout);
  if (r.status < 200 || r.status >= 300) {
    const snippet = Array.from(r.text.trim()).slice(0, 200).join("");
    const kind = { 429: "rate_limited", 408: "timeout", 401: "auth", 403: "auth" }[r.status]
      ?? (r.status >= 500 && r.status <= 599 ? "server" : "invalid_request");
    throw new StepError(kind, `${url} answered HTTP ${r.status}: ${snippet}`, retryAfterHeader(r.headers));
  }
  const isJson = (r.headers.get("content-type") ?? "").includes("json");
  if (response === "text" || (response !== "json" && !isJson)) return r.text;
  try {
    return JSON.parse(r.text);
  } catch (e) {
    throw new StepError("bad_response", `${url} answered with invalid JSON (${e.message})`);
  }
}

// ── Models: Hugging Face router, Ollama, OpenAI-compatible ────────────────────────────────────

const NO_PROVIDER = "no model provider is configured: set HUGGINGFACE_TOKEN in .env (create a read "
  + "token at https://huggingface.co/settings/tokens), or USE_OLLAMA=true with a local "
  + "`ollama serve`, or OPENAI_BASE_URL for an OpenAI-compatible server";

function pickProvider(provider) {
  if (provider !== "auto") return provider;
  if (CONFIG.useOllama) return "ollama";
  if (CONFIG.hfToken) return "huggingface";
  if (CONFIG.openaiUrl) return "openai";
  throw new StepError("config", NO_PROVIDER);
}

function errorText(bodyText) {
  let body;
  try { body = JSON.parse(bodyText); } catch { return Array.from(bodyText.trim()).slice(0, 200).join(""); }
  if (isObject(body)) {
    if (isObject(body.error)) return String(body.error.message ?? JSON.stringify(body.error));
    for (const key of ["error", "detail", "message"]) if (typeof body[key] === "string") return body[key];
  }
  return Array.from(bodyText.trim()).slice(0, 200).join("");
}

function modelError(service, r, model) {
  const message = errorText(r.text);
  const hint = retryAfterHeader(r.headers);
  if (r.status === 503) {
    let estimated = null;
    try { estimated = JSON.parse(r.text)?.estimated_time ?? null; } catch { /* not JSON */ }
    if (typeof estimated === "number") {
      return new StepError("model_loading", `model ${model} is currently loading (${service} 503); waiting ${estimated.toFixed(1)}s as the provider asks`, estimated);
    }
  }
  if (r.status === 429) return new StepError("rate_limited", `${service} rate limit reached (429): ${message}`, hint);
  if (r.status === 401 || r.status === 403) return new StepError("auth", `${service} refused the token (${r.status}): ${message} — check the token in .env`);
  if (r.status === 402) return new StepError("credits_exhausted", `${service}: the account has no credits left (402): ${message}`);
  if (r.text.includes("model_not_supported") || (r.status === 404 && message.includes("not found"))) {
    return new StepError("model_not_supported", `${service} does not serve the model ${model}: ${message}`);
  }
  if (r.status >= 500 && r.status <= 599) return new StepError("server", `${service} failed (${r.status}): ${message}`, hint);
  if (r.status === 408) return new StepError("timeout", `${service} timed out (${r.status}): ${message}`);
  return new StepError("invalid_request", `${service} refused the request (${r.status}): ${message}`);
}

/** One model call → { content, tokens, provider, model }. */
async function callModel(provider, model, system, prompt, temperature, maxTokens, timeout) {
  provider = pickProvider(provider);
  const messages = system !== null ? [{ role: "system", content: system }] : [];
  messages.push({ role: "user", content: prompt });
  if (provider === "ollama") {
    const name = CONFIG.ollamaModel ?? model;
    const options = {};
    if (temperature !== null) options.temperature = temperature;
    if (maxTokens !== null) options.num_predict = maxTokens;
    const r = await request("POST", `${CONFIG.ollamaUrl}/api/chat`, {}, { model: name, messages, stream: false, options }, timeout, "Ollama");
    if (r.status !== 200) throw modelError("Ollama", r, name);
    let data;
    try { data = JSON.parse(r.text); } catch { data = null; }
    if (typeof data?.message?.content !== "string") throw new StepError("bad_response", `Ollama answered something that is not a chat reply: ${r.text.slice(0, 200)}`);
    return { content: data.message.content, tokens: (data.prompt_eval_count ?? 0) + (data.eval_count ?? 0), provider: "ollama", model: name };
  }
  let url, key, service;
  if (provider === "huggingface") {
    if (!CONFIG.hfToken) throw new StepError("config", "provider huggingface needs HUGGINGFACE_TOKEN (or HF_TOKEN)");
    [url, key, service] = [`${CONFIG.hfUrl}/v1/chat/completions`, CONFIG.hfToken, "Hugging Face"];
  } else if (provider === "openai") {
    if (!CONFIG.openaiUrl) throw new StepError("config", "provider openai needs OPENAI_BASE_URL");
    [url, key, service] = [`${CONFIG.openaiUrl}/v1/chat/completions`, CONFIG.openaiKey, "the OpenAI-compatible server"];
  } else {
    throw new StepError("config", `unknown provider ${JSON.stringify(provider)}: use auto, huggingface, ollama or openai`);
  }
  const body = { model, messages, stream: false };
  if (temperature !== null) body.temperature = temperature;
  if (maxTokens !== null) body.max_tokens = maxTokens;
  const r = await request("POST", url, key ? { Authorization: `Bearer ${key}` } : {}, body, timeout, service);
  if (r.status !== 200) throw modelError(service, r, model);
  let data;
  try { data = JSON.parse(r.text); } catch { data = null; }
  const content = data?.choices?.[0]?.message?.content;
  if (content === undefined) throw new StepError("bad_response", `${service} answered something that is not a chat completion: ${r.text.slice(0, 200)}`);
  const usage = data.usage ?? {};
  const tokens = usage.total_tokens || ((usage.prompt_tokens ?? 0) + (usage.completion_tokens ?? 0));
  return { content: content ?? "", tokens, provider, model };
}

async function llmNode(provider, model, system, prompt, temperature, maxTokens, parse, timeout) {
  const reply = await callModel(provider, model, system, prompt, temperature, maxTokens, timeout);
  if (!reply.content.trim()) throw new StepError("empty_output", `the model ${reply.model} returned an empty answer`);
  if (parse !== "json") return [reply.content.trim(), reply.tokens];
  let t = reply.content.trim();
  for (const fence of ["```json", "```"]) {
    if (t.startsWith(fence)) {
      t = t.slice(fence.length).trimEnd();
      while (t.endsWith("```")) t = t.slice(0, -3);
      break;
    }
  }
  try {
    return [JSON.parse(t.trim()), reply.tokens];
  } catch (e) {
    throw new StepError("bad_response", `the model's answer is not valid JSON (${e.message}); ask for JSON only in the prompt, or use parse: "text"`);
  }
}

// ── Notifications: Telegram and Discord ───────────────────────────────────────────────────────

/** Pieces of at most `limit` characters, cut between words when possible. */
function splitText(text, limit) {
  const out = [];
  let rest = Array.from(text);
  while (rest.length > limit) {
    const head = rest.slice(0, limit).join("");
    let at = head.lastIndexOf("\n");
    if (at <= 0) at = head.lastIndexOf(" ");
    at = at <= 0 ? limit : Array.from(head.slice(0, at)).length;
    out.push(rest.slice(0, at).join("").trimEnd());
    rest = Array.from(rest.slice(at).join("").trimStart());
  }
  const tail = rest.join("").trimEnd();
  if (tail || !out.length) out.push(tail);
  return out;
}

async function telegram(text, parseMode, timeout) {
  if (!(CONFIG.telegramToken && CONFIG.telegramChat)) {
    throw new StepError("config", "Telegram is not configured: set TELEGRAM_BOT_TOKEN (from @BotFather) and TELEGRAM_CHAT_ID in .env");
  }
  const url = `${CONFIG.telegramUrl}/bot${CONFIG.telegramToken}/sendMessage`;
  const ids = [];
  for (const part of splitText(text, 4096)) {
    const body = { chat_id: CONFIG.telegramChat, text: part };
    if (parseMode !== null) body.parse_mode = parseMode;
    const r = await request("POST", url, {}, body, timeout, "Telegram");
    let reply = {};
    try { reply = JSON.parse(r.text) ?? {}; } catch { /* not JSON */ }
    if (!isObject(reply)) reply = {};
    if (reply.ok === true) {
      ids.push(reply.result?.message_id ?? null);
      continue;
    }
    const desc = typeof reply.description === "string" ? reply.description : "no description";
    const code = Number.isInteger(reply.error_code) ? reply.error_code : r.status;
    const wait = typeof reply.parameters?.retry_after === "number" ? reply.parameters.retry_after : retryAfterHeader(r.headers);
    let kind = "invalid_request", hint = "Telegram refused the message";
    if (code === 429) [kind, hint] = ["rate_limited", "Telegram asks to slow down"];
    else if (code === 401 || code === 404) [kind, hint] = ["auth", "the bot token is invalid: check TELEGRAM_BOT_TOKEN"];
    else if (code === 403) [kind, hint] = ["auth", "the bot cannot write to this chat (blocked, or not a member): add the bot to the chat"];
    else if (code === 400 && desc.includes("chat not found")) [kind, hint] = ["invalid_request", "check TELEGRAM_CHAT_ID, and send the bot a message first"];
    else if (code >= 500 && code <= 599) [kind, hint] = ["server", "Telegram failed"];
    throw new StepError(kind, `Telegram error ${code}: ${desc} — ${hint}`, wait);
  }
  // The same record as `omniflow run` writes (no delivery history here: nothing "already sent").
  return { channel: "telegram", delivered: true, parts: ids.length, alreadySent: 0, messageIds: ids, text };
}

async function discord(text, timeout) {
  if (!CONFIG.discordWebhook) {
    throw new StepError("config", "Discord is not configured: set DISCORD_WEBHOOK (Server Settings → Integrations → Webhooks → Copy Webhook URL) in .env");
  }
  const ids = [];
  // wait=true makes Discord answer with the message (and its id), as `omniflow run` asks.
  const url = CONFIG.discordWebhook + (CONFIG.discordWebhook.includes("?") ? "&" : "?") + "wait=true";
  for (const part of splitText(text, 2000)) {
    const r = await request("POST", url, {}, { content: part, allowed_mentions: { parse: [] } }, timeout, "Discord");
    let reply = {};
    try { reply = JSON.parse(r.text) ?? {}; } catch { /* not JSON */ }
    if (!isObject(reply)) reply = {};
    if (r.status >= 200 && r.status < 300) {
      ids.push(reply.id ?? null);
      continue;
    }
    const msg = typeof reply.message === "string" ? reply.message : "no message";
    const wait = typeof reply.retry_after === "number" ? reply.retry_after : retryAfterHeader(r.headers);
    let kind = "invalid_request", hint = "Discord refused the message";
    if (r.status === 429) [kind, hint] = ["rate_limited", "Discord asks to slow down"];
    else if (r.status === 401 || r.status === 403) [kind, hint] = ["auth", "the webhook refused us: check DISCORD_WEBHOOK"];
    else if (r.status === 404) [kind, hint] = ["invalid_request", "unknown webhook: it was deleted — create a new one and do not use this one again"];
    else if (r.status >= 500 && r.status <= 599) [kind, hint] = ["server", "Discord failed"];
    throw new StepError(kind, `Discord error ${r.status}: ${msg} — ${hint}`, wait);
  }
  return { channel: "discord", delivered: true, parts: ids.length, alreadySent: 0, messageIds: ids, text };
}

const notifyNode = (channel, text, parseMode, timeout) =>
  channel === "telegram" ? telegram(text, parseMode, timeout) : discord(text, timeout);

async function delayNode(seconds) {
  await sleep(seconds);
  return { waitedMs: Math.round(seconds * 1000) };
}

// ── Retries ───────────────────────────────────────────────────────────────────────────────────

const MODEL_LOADING_CAP = 30;
const RATE_LIMIT_DEFAULT = 60;

/** `attempts` counts every try; waits are backoff, backoff*factor, … capped at maxDelay,
 * ± jitter. Unset fields inherit (the blueprint's defaults, then MAX_RETRIES: 1 s, 2 s, 4 s). */
function retryPolicy(...specs) {
  const p = { attempts: CONFIG.maxRetries + 1, backoff: 1, factor: 2, maxDelay: 30, jitter: 0.1 };
  for (const s of specs) {
    if (!s) continue;
    if (s.attempts !== undefined) p.attempts = Math.max(s.attempts, 1);
    if (s.backoff !== undefined) p.backoff = s.backoff;
    if (s.factor !== undefined) p.factor = Math.max(s.factor, 1);
    if (s.maxDelay !== undefined) p.maxDelay = s.maxDelay;
    if (s.jitter !== undefined) p.jitter = Math.min(Math.max(s.jitter, 0), 1);
  }
  return p;
}

/** Seconds to wait before the next try, or null to give up. */
function retryWait(policy, attempt, error) {
  if (!RETRYABLE.has(error.kind) || attempt >= policy.attempts) return null;
  const hint = error.retryAfter;
  if (error.kind === "model_loading" && hint !== null) return Math.min(hint, MODEL_LOADING_CAP);
  if (error.kind === "rate_limited") return hint ?? RATE_LIMIT_DEFAULT;
  if (hint !== null) return Math.min(hint, Math.max(policy.maxDelay, MODEL_LOADING_CAP));
  const base = Math.min(policy.backoff * policy.factor ** Math.min(attempt - 1, 60), policy.maxDelay);
  return Math.max(base * (1 + (Math.random() * 2 - 1) * policy.jitter), 0);
}

// ── History: runner_executions in DB_FILE, the table OmniFlow writes ──────────────────────────

const isoNow = () => new Date().toISOString();

function hostname() {
  try {
    return readFileSync("/proc/sys/kernel/hostname", "utf8").trim() || null;
  } catch {
    return (process.env.HOSTNAME ?? "").trim() || osHostname() || null;
  }
}

const warn = (message) => process.stderr.write(`warning: ${message}\n`);

/** Writes this run's row in runner_executions with better-sqlite3 (the one dependency). Without
 * it installed the run still works; history is skipped with a warning. */
class History {
  constructor(path) {
    this.db = null;
    let Database;
    try {
      Database = createRequire(import.meta.url)("better-sqlite3");
    } catch {
      warn("history skipped: better-sqlite3 is not installed (run `npm install`)");
      return;
    }
    try {
      if (dirname(path)) mkdirSync(dirname(path), { recursive: true });
      const db = new Database(path, { timeout: 5000 });
      if (db.pragma("user_version", { simple: true }) === 0) {
        db.pragma("journal_mode = WAL");
        db.exec("BEGIN IMMEDIATE");
        try {
          if (db.pragma("user_version", { simple: true }) === 0) {
            db.exec(SCHEMA);
            db.pragma("user_version = 1");
          }
          db.exec("COMMIT");
        } catch (e) {
          db.exec("ROLLBACK");
          throw e;
        }
      }
      this.db = db;
    } catch (e) {
      warn(`history disabled: cannot open ${path}: ${e.message}`);
    }
  }

  write(sql, params) {
    if (!this.db) return;
    try {
      this.db.prepare(sql).run(...params);
    } catch (e) {
      warn(`history: ${e.message}`);
    }
  }

  queued(runId, priority, variables, at) {
    this.write(
      "INSERT INTO runner_executions (id, blueprint_name, status, priority, trigger, sandbox, seed, "
      + "simulate_failures, variables, blueprint, parent_run_id, queued_at, started_at, tokens_used, host, pid) "
      + "VALUES (?, ?, 'queued', ?, 'cli', 0, NULL, 0.0, ?, ?, NULL, ?, ?, 0, ?, ?)",
      [runId, BLUEPRINT_NAME, priority, JSON.stringify(variables), BLUEPRINT_JSON, at, at, hostname(), process.pid]);
  }

  started(runId, stepsTotal) {
    this.write("UPDATE runner_executions SET status = 'running', started_at = ?, steps_total = ?, steps_done = 0 WHERE id = ?",
      [isoNow(), stepsTotal, runId]);
  }

  finished(runId, o, stepsDone) {
    this.write("UPDATE runner_executions SET status = ?, finished_at = ?, total_time_ms = ?, tokens_used = ?, "
      + "steps_done = ?, error = ?, error_kind = ?, failed_step = ? WHERE id = ?",
      [o.status, isoNow(), o.totalTimeMs, o.tokensUsed, stepsDone, o.error, o.errorKind ?? null, o.failedStep ?? null, runId]);
  }
}

function newRunId() {
  const alphabet = "0123456789abcdefghijklmnopqrstuvwxyz";
  let tail = "";
  for (let i = 0; i < 4; i++) tail += alphabet[Math.floor(Math.random() * 36)];
  return Date.now().toString(36).padStart(9, "0").slice(-9) + tail;
}

// ── The run: readiness, fan-out, condition skips, fail-fast, retries ──────────────────────────

function timeoutMessage(node, seconds) {
  if (node.kind === "llm") {
    return `the model call timed out after ${fmtSecs(seconds)}s and was stopped (REQUEST_TIMEOUT or the node's "timeout"); raise it if the model is just slow, or pick a smaller model`;
  }
  return `the step timed out after ${fmtSecs(seconds)}s and was stopped; raise the node's "timeout" (or REQUEST_TIMEOUT)`;
}

/** Renders the step's templates once, then attempts it until it succeeds, fails for good, or the
 * run is aborted. */
async function runStep(node, ctx, key, item) {
  const started = performance.now();
  const summary = { node: node.id, step: key, status: "error", attempts: 0, durationMs: 0, tokensUsed: 0, cached: false, error: null };
  if (item !== null) summary.item = item;
  let output = null, error = null, attempt = 0;
  let attemptFn = null;
  try {
    attemptFn = node.prepare(ctx);
  } catch (e) {
    if (!(e instanceof StepError)) throw e;
    error = e;
  }
  if (attemptFn) {
    const policy = retryPolicy(DEFAULT_RETRY, node.retry);
    const timeout = (node.timeout ?? DEFAULT_TIMEOUT ?? CONFIG.requestTimeout) + (node.extraTimeout ?? 0);
    for (;;) {
      attempt += 1;
      error = null;
      if (ABORT.signal.aborted) { error = new StepError("cancelled", "cancelled"); break; }
      try {
        const result = await attemptFn(timeout);
        if (node.kind === "llm") [output, summary.tokensUsed] = result;
        else output = result;
        if (ABORT.signal.aborted) { error = new StepError("cancelled", "cancelled"); output = null; }
        break;
      } catch (e) {
        if (!(e instanceof StepError)) throw e;
        error = e;
        if (e.kind === "timeout") error.message = timeoutMessage(node, timeout);
      }
      if (error.kind === "cancelled") break;
      const wait = retryWait(policy, attempt, error);
      if (wait === null) {
        if (attempt > 1 && RETRYABLE.has(error.kind)) error.message = `${error.message} (gave up after ${attempt} attempts)`;
        break;
      }
      process.stderr.write(`  ${key}: attempt ${attempt} failed (${error.kind}: ${error.message}); retrying in ${wait.toFixed(1)}s\n`);
      if (await sleep(wait)) { error = new StepError("cancelled", "cancelled"); break; }
    }
  }
  summary.attempts = attempt;
  summary.durationMs = Math.floor(performance.now() - started);
  if (error === null) summary.status = "success";
  else {
    summary.status = error.kind === "cancelled" ? "cancelled" : "error";
    summary.error = error.message;
    summary.errorKind = error.kind;
  }
  return { summary, output, error };
}

async function runBlueprint(variables) {
  const runId = newRunId();
  const history = new History(CONFIG.dbFile);
  history.queued(runId, PRIORITY, variables, isoNow());
  history.started(runId, NODES.length);
  const started = performance.now();
  const index = new Map(NODES.map((n, i) => [n.id, i]));
  const states = NODES.map(() => ({ state: "pending", value: null }));
  const running = new Map();
  const summaries = [];
  const inflight = new Map();
  let failure = null, timedOut = false, tokens = 0, stepsDone = 0, seq = 0;
  const deadline = RUN_TIMEOUT !== null ? started + scaled(RUN_TIMEOUT) * 1000 : null;

  const context = () => {
    const nodes = {};
    states.forEach((s, i) => {
      if (s.state === "done") nodes[NODES[i].id] = { output: s.value, status: "success" };
      else if (s.state === "failed_continue") nodes[NODES[i].id] = { output: null, status: "error", error: s.value.message };
      else if (s.state === "skipped") nodes[NODES[i].id] = { output: null, status: "skipped" };
    });
    return { vars: variables, nodes, run: { id: runId, blueprint: BLUEPRINT_NAME, sandbox: false } };
  };

  const skipReason = (needs) => {
    for (const d of needs) {
      const s = states[d];
      if (s.state === "skipped") return `skipped because ${NODES[d].id} was skipped`;
      if (s.state === "done" && NODES[d].kind === "condition") {
        const ok = Array.isArray(s.value) ? s.value.every(truthy) : truthy(s.value);
        if (!ok) return `skipped because condition ${NODES[d].id} was false`;
      }
    }
    return null;
  };

  const planFailed = (i, e) => {
    summaries.push({ node: NODES[i].id, step: NODES[i].id, status: "error", attempts: 0, durationMs: 0, tokensUsed: 0, cached: false, error: e.message, errorKind: e.kind });
    if (NODES[i].continueOnError) states[i] = { state: "failed_continue", value: e };
    else {
      states[i] = { state: "failed", value: null };
      failure = [NODES[i].id, e];
      ABORT.abort();
    }
  };

  for (;;) {
    let changed = failure === null && !ABORT.signal.aborted;
    while (changed && failure === null) {
      changed = false;
      for (let i = 0; i < NODES.length && failure === null; i++) {
        const node = NODES[i];
        if (states[i].state !== "pending") continue;
        const needs = node.needs.filter((n) => index.has(n)).map((n) => index.get(n));
        if (!needs.every((d) => !["pending", "running"].includes(states[d].state))) continue;
        changed = true;
        const reason = skipReason(needs);
        if (reason !== null) {
          states[i] = { state: "skipped", value: null };
          summaries.push({ node: node.id, step: node.id, status: "skipped", attempts: 0, durationMs: 0, tokensUsed: 0, cached: false, error: null });
          continue;
        }
        const ctx = context();
        let steps;
        if (!node.forEach) steps = [[node.id, null, ctx]];
        else {
          let items;
          try {
            items = node.forEach(ctx);
          } catch (e) {
            if (!(e instanceof StepError)) throw e;
            planFailed(i, e);
            break;
          }
          steps = items.map((item, n) => [`${node.id}[${n}]`, n, { ...ctx, item, index: n }]);
          if (!steps.length) { states[i] = { state: "done", value: [] }; continue; }
        }
        states[i] = { state: "running", value: null };
        running.set(i, { remaining: steps.length, outputs: steps.map(() => null), failed: null });
        for (const [key, item, stepCtx] of steps) {
          const id = seq++;
          inflight.set(id, runStep(node, stepCtx, key, item).then((r) => ({ id, i, item, ...r })));
        }
      }
    }
    if (!inflight.size) break;
    let next = Promise.race(inflight.values());
    if (deadline !== null) {
      let timer;
      const expired = new Promise((resolve) => { timer = setTimeout(() => resolve(null), Math.max(deadline - performance.now(), 0)); });
      next = Promise.race([next, expired]).finally(() => clearTimeout(timer));
    }
    let done = await next;
    if (done === null) {
      timedOut = true;
      ABORT.abort();
      done = await Promise.race(inflight.values());
    }
    inflight.delete(done.id);
    summaries.push(done.summary);
    tokens += done.summary.tokensUsed;
    stepsDone += 1;
    const r = running.get(done.i);
    if (done.error === null) r.outputs[done.item ?? 0] = done.output;
    else if (r.failed === null || r.failed.kind === "cancelled") r.failed = done.error;
    r.remaining -= 1;
    if (r.remaining > 0) continue;
    const node = NODES[done.i];
    const value = node.forEach ? r.outputs : r.outputs[0];
    const e = r.failed;
    if (e === null) states[done.i] = { state: "done", value };
    else if (node.continueOnError && e.kind !== "cancelled") states[done.i] = { state: "failed_continue", value: e };
    else {
      states[done.i] = { state: "failed", value: null };
      if (e.kind !== "cancelled" && failure === null && !ABORT.signal.aborted) {
        failure = [node.id, e];
        ABORT.abort();
      }
    }
  }

  const outputs = {};
  states.forEach((s, i) => { if (s.state === "done") outputs[NODES[i].id] = s.value; });
  const outcome = { runId, blueprint: BLUEPRINT_NAME, status: "success", totalTimeMs: Math.floor(performance.now() - started),
    outputs, steps: summaries, error: null, tokensUsed: tokens };
  if (timedOut) {
    Object.assign(outcome, { status: "error", errorKind: "timeout",
      error: `the run exceeded its timeout of ${RUN_TIMEOUT_TEXT} and was stopped; raise the blueprint's "timeout"` });
  } else if (failure !== null) {
    Object.assign(outcome, { status: "error", error: `step ${failure[0]} failed: ${failure[1].message}`, errorKind: failure[1].kind, failedStep: failure[0] });
  }
  history.finished(runId, outcome, stepsDone);
  return outcome;
}

function parseVarValue(text) {
  const t = text.trim();
  const looksJson = ["[", "{", '"'].includes(t[0]) || ["true", "false", "null"].includes(t)
    || (t !== "" && Number.isFinite(Number(t)));
  if (looksJson) {
    try { return JSON.parse(t); } catch { /* text */ }
  }
  return text;
}

async function main(argv = process.argv.slice(2)) {
  let jsonOut = false, variables;
  const overrides = {};
  try {
    for (let i = 0; i < argv.length; i++) {
      let arg = argv[i];
      if (arg === "--json") jsonOut = true;
      else if (arg === "-h" || arg === "--help") {
        console.log(`usage: node main.js [--var KEY=VALUE]... [--json]\n\nRuns the ${BLUEPRINT_NAME} automation (exported from OmniFlow). Exit 0 success, 1 the run failed, 2 bad input.`);
        return 0;
      } else if (arg === "--var" || arg.startsWith("--var=")) {
        if (arg === "--var") {
          if (++i >= argv.length) throw new BadInput("--var needs KEY=VALUE");
          arg = argv[i];
        } else arg = arg.slice("--var=".length);
        const eq = arg.indexOf("=");
        if (eq <= 0 || !arg.slice(0, eq).trim()) throw new BadInput(`bad --var ${JSON.stringify(arg)}: expected KEY=VALUE, e.g. --var TOPICS='["rust","wasm"]'`);
        overrides[arg.slice(0, eq).trim()] = parseVarValue(arg.slice(eq + 1));
      } else throw new BadInput(`unknown argument ${JSON.stringify(arg)} (try --help)`);
    }
    variables = { ...VARIABLES };
    for (const [k, v] of Object.entries(overrides)) {
      if (!Object.hasOwn(variables, k)) {
        throw new BadInput(`--var ${k}: blueprint "${BLUEPRINT_NAME}" declares no variable ${JSON.stringify(k)} (declared: ${Object.keys(VARIABLES).join(", ") || "none"})`);
      }
      variables[k] = v;
    }
    loadDotenv();
    CONFIG = loadConfig();
  } catch (e) {
    if (!(e instanceof BadInput)) throw e;
    process.stderr.write(`error: ${e.message}\n`);
    return 2;
  }
  const outcome = await runBlueprint(variables);
  if (jsonOut) console.log(JSON.stringify(outcome));
  else {
    const ok = outcome.status === "success";
    process.stderr.write(`${ok ? "✓" : "✗"} ${BLUEPRINT_NAME} ${ok ? "succeeded" : "failed"} in ${(outcome.totalTimeMs / 1000).toFixed(1)}s — ${outcome.steps.length} steps, ${outcome.tokensUsed} tokens\n`);
    if (outcome.error) process.stderr.write(`  ${outcome.error}\n`);
    const ids = Object.keys(outcome.outputs);
    if (ids.length) {
      const value = outcome.outputs[ids.at(-1)];
      process.stderr.write(`── output of ${ids.at(-1)} ──\n`);
      console.log(typeof value === "string" ? value : JSON.stringify(value, null, 2));
    }
  }
  return ok(outcome) ? 0 : 1;
}

const ok = (outcome) => outcome.status === "success";
