# ─────────────────────────────────────────────────────────────────────────────────────────────
# Runtime: configuration, template helpers, HTTP with retries, model providers, notifications,
# history. Everything below "Blueprint" is the automation itself.
# ─────────────────────────────────────────────────────────────────────────────────────────────

import email.utils
import json
import os
import random
import socket
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import datetime, timezone


def load_dotenv(path=".env"):
    """Reads KEY=VALUE lines from .env without overriding the environment."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#") or "=" not in line:
                    continue
                key, value = line.split("=", 1)
                key = key.strip().removeprefix("export ").strip()
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                os.environ.setdefault(key, value)
    except OSError:
        pass


class BadInput(Exception):
    """Bad input or configuration: exit code 2."""


def env(name, default=None):
    value = os.environ.get(name, "").strip()
    return value if value else default


def env_int(name, default, minimum=0):
    value = env(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < minimum:
        raise BadInput(f"{name}={value!r} is not valid: expected a whole number")
    return number


def env_bool(name):
    value = (env(name) or "false").lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise BadInput(f"{name}={value!r} is not valid: expected true or false")


class Config:
    def __init__(self):
        self.hf_token = env("HUGGINGFACE_TOKEN") or env("HF_TOKEN")
        self.hf_url = env("HF_INFERENCE_URL", "https://router.huggingface.co").rstrip("/")
        self.use_ollama = env_bool("USE_OLLAMA")
        self.ollama_url = env("OLLAMA_URL", "http://localhost:11434").rstrip("/")
        self.ollama_model = env("OLLAMA_MODEL")
        self.openai_url = (env("OPENAI_BASE_URL") or "").rstrip("/") or None
        self.openai_key = env("OPENAI_API_KEY")
        self.request_timeout = env_int("REQUEST_TIMEOUT", 300, 1)
        self.max_retries = min(env_int("MAX_RETRIES", 3, 0), 100)
        self.telegram_token = env("TELEGRAM_BOT_TOKEN")
        self.telegram_chat = env("TELEGRAM_CHAT_ID")
        self.telegram_url = env("TELEGRAM_API_URL", "https://api.telegram.org").rstrip("/")
        self.discord_webhook = env("DISCORD_WEBHOOK") or env("DISCORD_WEBHOOK_URL")
        self.db_file = env("DB_FILE", "./automation_runner.db")
        self.concurrency = min(env_int("CONCURRENCY", 32, 1), 4096)
        scale = env("OMNIFLOW_TIME_SCALE", "1")
        try:
            self.time_scale = float(scale)
        except ValueError:
            self.time_scale = -1.0
        if not self.time_scale > 0:
            raise BadInput(f"OMNIFLOW_TIME_SCALE={scale!r} is not valid: expected a positive number")


CONFIG = None
ABORT = threading.Event()


def scaled(seconds):
    """Every wait goes through here: OMNIFLOW_TIME_SCALE=0.001 makes tests 1000x faster."""
    return seconds * CONFIG.time_scale


def scaled_timeout(seconds):
    """A timeout under OMNIFLOW_TIME_SCALE is scaled too, but never below 1 s: a test machine's
    first connection must not time out."""
    return seconds if CONFIG.time_scale == 1 else max(scaled(seconds), 1.0)


# ── Errors ────────────────────────────────────────────────────────────────────────────────────

RETRYABLE = {"timeout", "rate_limited", "model_loading", "server", "network", "empty_output",
             "truncated_stream", "bad_response"}


class StepError(Exception):
    """A failed attempt: a kind (which alone decides whether to retry), a message, and the
    provider's own hint of how long to wait."""

    def __init__(self, kind, message, retry_after=None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


class TemplateError(Exception):
    pass


class field:
    """`with field("node.prompt"):` names the field in a template error."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, TemplateError):
            raise StepError("template", f"{self.name}: {error}" if self.name else str(error)) from None
        return False


# ── Template helpers (minijinja semantics) ────────────────────────────────────────────────────

class Undefined:
    """A value that is not there: false in `if`, replaced by `default`, an error when printed."""

    def __bool__(self):
        return False

    def __repr__(self):
        return "UNDEF"


UNDEF = Undefined()


def get(value, *path):
    for key in path:
        if value is UNDEF:
            raise TemplateError(f"undefined value (cannot look up {key!r} in an undefined value)")
        if isinstance(value, dict):
            value = value.get(key, UNDEF) if isinstance(key, str) else UNDEF
        elif isinstance(value, (list, str)) and isinstance(key, int) and not isinstance(key, bool):
            value = value[key] if -len(value) <= key < len(value) else UNDEF
        else:
            value = UNDEF
    return value


def truthy(value):
    return bool(value)


def display(value):
    """minijinja's plain string form of a value (join, ~, string filters)."""
    if value is UNDEF:
        return ""
    if value is None:
        return "None"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        text_ = repr(value)
        return text_ if "." in text_ or "e" in text_ else text_ + ".0"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def text(value):
    """What `{{ value }}` prints: none → empty, lists and maps → compact JSON."""
    if value is UNDEF:
        raise TemplateError("undefined value")
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return compact_json(value)
    return display(value)


def compact_json(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def string_arg(value, what):
    if value is UNDEF:
        raise TemplateError(f"undefined value passed to `{what}`")
    return value if isinstance(value, str) else display(value)


def items_of(value, what="iterate over"):
    if value is UNDEF:
        raise TemplateError(f"undefined value (cannot {what} an undefined value)")
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.keys())
    if isinstance(value, str):
        return list(value)
    raise TemplateError(f"invalid operation: cannot {what} {display(value)}")


def with_loop(value):
    items = items_of(value)
    n = len(items)
    for i, item in enumerate(items):
        loop = {"index0": i, "index": i + 1, "first": i == 0, "last": i == n - 1,
                "length": n, "revindex": n - i, "revindex0": n - i - 1}
        yield loop, item


def join(value, sep=""):
    sep = "" if sep is None else string_arg(sep, "join")
    return sep.join(x if isinstance(x, str) else display(x) for x in items_of(value, "join"))


def tojson(value, indent=None):
    if value is UNDEF:
        raise TemplateError("undefined value passed to `tojson`")
    if indent is True:
        indent = 2
    if indent is None or indent is False:
        out = compact_json(value)
    else:
        out = json.dumps(value, ensure_ascii=False, indent=indent, separators=(",", ": "))
    return (out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("'", "\\u0027"))


def fromjson(value):
    try:
        return json.loads(string_arg(value, "fromjson"))
    except ValueError as e:
        raise TemplateError(f"invalid operation: fromjson: not valid JSON: {e}") from None


def default_(value, other=""):
    return other if value is UNDEF else value


def truncate(value, length=None, killwords=None, end=None, leeway=None):
    s = string_arg(value, "truncate")
    length = 255 if length is None else length
    end = "..." if end is None else end
    leeway = 5 if leeway is None else leeway
    if length < len(end):
        raise TemplateError(f"truncate: length {length} is shorter than the end marker {end!r}")
    if len(s) <= length + leeway:
        return s
    head = s[: length - len(end)]
    if killwords:
        return head + end
    pos = head.rfind(" ")
    return (head[:pos] if pos >= 0 else head) + end


def upper(value):
    return string_arg(value, "upper").upper()


def lower(value):
    return string_arg(value, "lower").lower()


def trim(value):
    return string_arg(value, "trim").strip()


def replace(value, old, new):
    return string_arg(value, "replace").replace(string_arg(old, "replace"), string_arg(new, "replace"))


def length(value):
    if isinstance(value, (str, list, dict)):
        return len(value)
    raise TemplateError(f"invalid operation: cannot calculate length of {display(value)}")


def first(value):
    items = items_of(value, "get the first item of")
    return items[0] if items else UNDEF


def last(value):
    items = items_of(value, "get the last item of")
    return items[-1] if items else UNDEF


def lines(value):
    s = string_arg(value, "lines")
    out = s.split("\n")
    if out and out[-1] == "":
        out.pop()
    return [line[:-1] if line.endswith("\r") else line for line in out]


def slice_of(value, start, stop):
    if value is UNDEF:
        raise TemplateError("undefined value (cannot slice an undefined value)")
    if isinstance(value, (str, list)):
        return value[start:stop]
    raise TemplateError(f"invalid operation: cannot slice {display(value)}")


def comparable(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a, b
    return a, b


def eq(a, b):
    if (a is UNDEF) != (b is UNDEF):
        return False
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def ne(a, b):
    return not eq(a, b)


def ordered(op, a, b):
    try:
        return op(a, b)
    except TypeError:
        raise TemplateError(f"invalid operation: cannot compare {display(a)} and {display(b)}") from None


def lt(a, b):
    return ordered(lambda x, y: x < y, a, b)


def le(a, b):
    return ordered(lambda x, y: x <= y, a, b)


def gt(a, b):
    return ordered(lambda x, y: x > y, a, b)


def ge(a, b):
    return ordered(lambda x, y: x >= y, a, b)


def contains(container, item):
    if isinstance(container, str):
        return isinstance(item, str) and item in container
    if isinstance(container, list):
        return any(eq(x, item) for x in container)
    if isinstance(container, dict):
        return isinstance(item, str) and item in container
    raise TemplateError(f"invalid operation: cannot perform a containment check on {display(container)}")


def not_contains(container, item):
    return not contains(container, item)


def concat(a, b):
    return display(a) + display(b)


def number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TemplateError(f"invalid operation: {display(v)} is not a number")
    return v


def add(a, b):
    if isinstance(a, str) and isinstance(b, str):
        return a + b
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    return number(a) + number(b)


def sub(a, b):
    return number(a) - number(b)


def neg(a):
    return -number(a)


def is_defined(v):
    return v is not UNDEF


def is_undefined(v):
    return v is UNDEF


def is_none(v):
    return v is None


def as_list(value):
    """A forEach's items: a list, or a string holding a JSON array."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value.strip())
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
        short = value[:40] + ("…" if len(value) > 40 else "")
        raise StepError("template", f"forEach must yield a list, got a string that is not a JSON array ({json.dumps(short, ensure_ascii=False)})")
    raise StepError("template", f"forEach must yield a list, got {json_type(value)}")


def json_type(v):
    if v is None or v is UNDEF:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "an object"


def parse_json_text(node_id, text_):
    try:
        return json.loads(text_.strip())
    except ValueError as e:
        raise StepError("template", f"{node_id}.template: the rendered text is not valid JSON ({e}); use `tojson` for values, or parse: \"text\"") from None


# ── HTTP ──────────────────────────────────────────────────────────────────────────────────────

MAX_BODY_BYTES = 10 * 1024 * 1024


def fmt_secs(seconds):
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def request(method, url, headers=None, body=None, timeout=300, service=None):
    """One HTTP request. Returns (status, headers, text); raises StepError on a transport
    failure (timeout or network). `service` replaces the URL in messages (it may hold a token)."""
    data = None
    headers = dict(headers or {})
    headers.setdefault("User-Agent", "omniflow-export/1")
    if body is not None:
        if isinstance(body, str):
            data = body.encode("utf-8")
        else:
            data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    where = service or url
    try:
        with urllib.request.urlopen(req, timeout=scaled_timeout(timeout)) as resp:
            raw = resp.read(MAX_BODY_BYTES + 1)
            status, resp_headers = resp.status, resp.headers
    except urllib.error.HTTPError as e:
        raw = e.read(MAX_BODY_BYTES + 1)
        status, resp_headers = e.code, e.headers
    except (socket.timeout, TimeoutError):
        raise StepError("timeout", f"request to {where} timed out") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise StepError("timeout", f"request to {where} timed out") from None
        raise StepError("network", f"request to {where} failed ({e.reason})") from None
    except OSError as e:
        raise StepError("network", f"request to {where} failed ({e})") from None
    if len(raw) > MAX_BODY_BYTES:
        raise StepError("bad_response", f"{where} answered with more than {MAX_BODY_BYTES >> 20} MiB; refused")
    return status, resp_headers, raw.decode("utf-8", errors="replace")


def retry_after_header(headers):
    """Retry-After in seconds: a number, or an HTTP-date turned into the time left until it."""
    raw = (headers.get("Retry-After") or "").strip()
    try:
        value = float(raw)
        return value if value >= 0 and value == value and value != float("inf") else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def http_node(method, url, headers, body, response, timeout):
    """An http node's attempt: the reply's body as text, or as JSON."""
    status, resp_headers, body_text = request(method, url, headers, body, timeout)
    if not 200 <= status < 300:
        snippet = body_text.strip()[:200]
        kind = {429: "rate_limited", 408: "timeout", 401: "auth", 403: "auth"}.get(status)
        kind = kind or ("server" if 500 <= status <= 599 else "invalid_request")
        raise StepError(kind, f"{url} answered HTTP {status}: {snippet}", retry_after_header(resp_headers))
    is_json = "json" in (resp_headers.get("Content-Type") or "")
    if response == "text" or (response != "json" and not is_json):
        return body_text
    try:
        return json.loads(body_text)
    except ValueError as e:
        raise StepError("bad_response", f"{url} answered with invalid JSON ({e})") from None


# ── Models: Hugging Face router, Ollama, OpenAI-compatible ────────────────────────────────────

NO_PROVIDER = ("no model provider is configured: set HUGGINGFACE_TOKEN in .env (create a read "
               "token at https://huggingface.co/settings/tokens), or USE_OLLAMA=true with a local "
               "`ollama serve`, or OPENAI_BASE_URL for an OpenAI-compatible server")


def pick_provider(provider):
    if provider == "auto":
        if CONFIG.use_ollama:
            return "ollama"
        if CONFIG.hf_token:
            return "huggingface"
        if CONFIG.openai_url:
            return "openai"
        raise StepError("config", NO_PROVIDER)
    return provider


def error_text(body_text):
    """The message in an error body, whatever its shape."""
    try:
        body = json.loads(body_text)
    except ValueError:
        return body_text.strip()[:200]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        for key in ("error", "detail", "message"):
            if isinstance(body.get(key), str):
                return body[key]
    return body_text.strip()[:200]


def model_error(service, status, headers, body_text, model):
    message = error_text(body_text)
    hint = retry_after_header(headers)
    if status == 503:
        try:
            estimated = json.loads(body_text).get("estimated_time")
        except (ValueError, AttributeError):
            estimated = None
        if isinstance(estimated, (int, float)):
            return StepError("model_loading", f"model {model} is currently loading ({service} 503); waiting {estimated:.1f}s as the provider asks", float(estimated))
    if status == 429:
        return StepError("rate_limited", f"{service} rate limit reached (429): {message}", hint)
    if status in (401, 403):
        return StepError("auth", f"{service} refused the token ({status}): {message} — check the token in .env")
    if status == 402:
        return StepError("credits_exhausted", f"{service}: the account has no credits left (402): {message}")
    if "model_not_supported" in body_text or (status == 404 and "not found" in message):
        return StepError("model_not_supported", f"{service} does not serve the model {model}: {message}")
    if 500 <= status <= 599:
        return StepError("server", f"{service} failed ({status}): {message}", hint)
    if status == 408:
        return StepError("timeout", f"{service} timed out ({status}): {message}")
    return StepError("invalid_request", f"{service} refused the request ({status}): {message}")


def call_model(provider, model, system, prompt, temperature, max_tokens, timeout):
    """One model call. Returns (text, tokens, provider, model)."""
    provider = pick_provider(provider)
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": prompt})
    if provider == "ollama":
        name = CONFIG.ollama_model or model
        body = {"model": name, "messages": messages, "stream": False, "options": {}}
        if temperature is not None:
            body["options"]["temperature"] = temperature
        if max_tokens is not None:
            body["options"]["num_predict"] = max_tokens
        status, headers, reply = request("POST", CONFIG.ollama_url + "/api/chat", {}, body, timeout, "Ollama")
        if status != 200:
            raise model_error("Ollama", status, headers, reply, name)
        try:
            data = json.loads(reply)
            content = data["message"]["content"]
        except (ValueError, KeyError, TypeError):
            raise StepError("bad_response", f"Ollama answered something that is not a chat reply: {reply[:200]}") from None
        tokens = (data.get("prompt_eval_count") or 0) + (data.get("eval_count") or 0)
        return content, tokens, "ollama", name
    if provider == "huggingface":
        if not CONFIG.hf_token:
            raise StepError("config", "provider huggingface needs HUGGINGFACE_TOKEN (or HF_TOKEN)")
        url, key, service = CONFIG.hf_url + "/v1/chat/completions", CONFIG.hf_token, "Hugging Face"
    elif provider == "openai":
        if not CONFIG.openai_url:
            raise StepError("config", "provider openai needs OPENAI_BASE_URL")
        url, key, service = CONFIG.openai_url + "/v1/chat/completions", CONFIG.openai_key, "the OpenAI-compatible server"
    else:
        raise StepError("config", f"unknown provider {provider!r}: use auto, huggingface, ollama or openai")
    body = {"model": model, "messages": messages, "stream": False}
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, resp_headers, reply = request("POST", url, headers, body, timeout, service)
    if status != 200:
        raise model_error(service, status, resp_headers, reply, model)
    try:
        data = json.loads(reply)
        content = data["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise StepError("bad_response", f"{service} answered something that is not a chat completion: {reply[:200]}") from None
    usage = data.get("usage") or {}
    tokens = usage.get("total_tokens") or ((usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0))
    return content, tokens, provider, model


def llm_node(provider, model, system, prompt, temperature, max_tokens, parse, timeout):
    content, tokens, used_provider, used_model = call_model(provider, model, system, prompt, temperature, max_tokens, timeout)
    if not content.strip():
        raise StepError("empty_output", f"the model {used_model} returned an empty answer")
    if parse != "json":
        return content.strip(), tokens
    t = content.strip()
    for fence in ("```json", "```"):
        if t.startswith(fence):
            t = t[len(fence):].rstrip()
            while t.endswith("```"):
                t = t[:-3]
            break
    try:
        return json.loads(t.strip()), tokens
    except ValueError as e:
        raise StepError("bad_response", f"the model's answer is not valid JSON ({e}); ask for JSON only in the prompt, or use parse: \"text\"") from None


# ── Notifications: Telegram and Discord ───────────────────────────────────────────────────────

def split_text(text_, limit):
    """Pieces of at most `limit` characters, cut between words when possible."""
    out, rest = [], text_
    while len(rest) > limit:
        head = rest[:limit]
        at = head.rfind("\n")
        if at <= 0:
            at = head.rfind(" ")
        if at <= 0:
            at = limit
        out.append(rest[:at].rstrip())
        rest = rest[at:].lstrip()
    rest = rest.rstrip()
    if rest or not out:
        out.append(rest)
    return out


def telegram(text_, parse_mode, timeout):
    if not (CONFIG.telegram_token and CONFIG.telegram_chat):
        raise StepError("config", "Telegram is not configured: set TELEGRAM_BOT_TOKEN (from @BotFather) and TELEGRAM_CHAT_ID in .env")
    url = f"{CONFIG.telegram_url}/bot{CONFIG.telegram_token}/sendMessage"
    ids = []
    for part in split_text(text_, 4096):
        body = {"chat_id": CONFIG.telegram_chat, "text": part}
        if parse_mode is not None:
            body["parse_mode"] = parse_mode
        status, headers, reply_text = request("POST", url, {}, body, timeout, "Telegram")
        try:
            reply = json.loads(reply_text)
        except ValueError:
            reply = {}
        reply = reply if isinstance(reply, dict) else {}
        if reply.get("ok") is True:
            ids.append((reply.get("result") or {}).get("message_id"))
            continue
        desc = reply.get("description") if isinstance(reply.get("description"), str) else "no description"
        code = reply.get("error_code") if isinstance(reply.get("error_code"), int) else status
        wait_s = (reply.get("parameters") or {}).get("retry_after")
        wait_s = float(wait_s) if isinstance(wait_s, (int, float)) else retry_after_header(headers)
        if code == 429:
            kind, hint = "rate_limited", "Telegram asks to slow down"
        elif code in (401, 404):
            kind, hint = "auth", "the bot token is invalid: check TELEGRAM_BOT_TOKEN"
        elif code == 403:
            kind, hint = "auth", "the bot cannot write to this chat (blocked, or not a member): add the bot to the chat"
        elif code == 400 and "chat not found" in desc:
            kind, hint = "invalid_request", "check TELEGRAM_CHAT_ID, and send the bot a message first"
        elif 500 <= code <= 599:
            kind, hint = "server", "Telegram failed"
        else:
            kind, hint = "invalid_request", "Telegram refused the message"
        raise StepError(kind, f"Telegram error {code}: {desc} — {hint}", wait_s)
    # The same record as `omniflow run` writes (this program keeps no delivery history, so
    # nothing is ever "already sent").
    return {"channel": "telegram", "delivered": True, "parts": len(ids), "alreadySent": 0, "messageIds": ids, "text": text_}


def discord(text_, timeout):
    if not CONFIG.discord_webhook:
        raise StepError("config", "Discord is not configured: set DISCORD_WEBHOOK (Server Settings → Integrations → Webhooks → Copy Webhook URL) in .env")
    ids = []
    # wait=true makes Discord answer with the message (and its id), as `omniflow run` asks.
    url = CONFIG.discord_webhook + ("&" if "?" in CONFIG.discord_webhook else "?") + "wait=true"
    for part in split_text(text_, 2000):
        body = {"content": part, "allowed_mentions": {"parse": []}}
        status, headers, reply_text = request("POST", url, {}, body, timeout, "Discord")
        try:
            reply = json.loads(reply_text)
        except ValueError:
            reply = {}
        reply = reply if isinstance(reply, dict) else {}
        if 200 <= status < 300:
            ids.append(reply.get("id"))
            continue
        msg = reply.get("message") if isinstance(reply.get("message"), str) else "no message"
        wait_s = reply.get("retry_after")
        wait_s = float(wait_s) if isinstance(wait_s, (int, float)) else retry_after_header(headers)
        if status == 429:
            kind, hint = "rate_limited", "Discord asks to slow down"
        elif status in (401, 403):
            kind, hint = "auth", "the webhook refused us: check DISCORD_WEBHOOK"
        elif status == 404:
            kind, hint = "invalid_request", "unknown webhook: it was deleted — create a new one and do not use this one again"
        elif 500 <= status <= 599:
            kind, hint = "server", "Discord failed"
        else:
            kind, hint = "invalid_request", "Discord refused the message"
        raise StepError(kind, f"Discord error {status}: {msg} — {hint}", wait_s)
    return {"channel": "discord", "delivered": True, "parts": len(ids), "alreadySent": 0, "messageIds": ids, "text": text_}


def notify_node(channel, text_, parse_mode, timeout):
    return telegram(text_, parse_mode, timeout) if channel == "telegram" else discord(text_, timeout)


def delay_node(seconds):
    ABORT.wait(scaled(seconds))
    return {"waitedMs": int(round(seconds * 1000))}


# ── Retries ───────────────────────────────────────────────────────────────────────────────────

MODEL_LOADING_CAP = 30.0
RATE_LIMIT_DEFAULT = 60.0


class Retry:
    """`attempts` counts every try; waits are backoff, backoff*factor, … capped at max_delay,
    ± jitter. None means "inherit" (the blueprint's defaults, then MAX_RETRIES: 1 s, 2 s, 4 s)."""

    def __init__(self, attempts=None, backoff=None, factor=None, max_delay=None, jitter=None):
        self.attempts, self.backoff, self.factor = attempts, backoff, factor
        self.max_delay, self.jitter = max_delay, jitter


def retry_policy(*specs):
    policy = {"attempts": CONFIG.max_retries + 1, "backoff": 1.0, "factor": 2.0, "max_delay": 30.0, "jitter": 0.1}
    for spec in specs:
        if spec is None:
            continue
        if spec.attempts is not None:
            policy["attempts"] = max(spec.attempts, 1)
        if spec.backoff is not None:
            policy["backoff"] = spec.backoff
        if spec.factor is not None:
            policy["factor"] = max(spec.factor, 1.0)
        if spec.max_delay is not None:
            policy["max_delay"] = spec.max_delay
        if spec.jitter is not None:
            policy["jitter"] = min(max(spec.jitter, 0.0), 1.0)
    return policy


def retry_wait(policy, attempt, error):
    """Seconds to wait before the next try, or None to give up."""
    if error.kind not in RETRYABLE or attempt >= policy["attempts"]:
        return None
    hint = error.retry_after
    if error.kind == "model_loading" and hint is not None:
        return min(hint, MODEL_LOADING_CAP)
    if error.kind == "rate_limited":
        return RATE_LIMIT_DEFAULT if hint is None else hint
    if hint is not None:
        return min(hint, max(policy["max_delay"], MODEL_LOADING_CAP))
    base = min(policy["backoff"] * policy["factor"] ** min(attempt - 1, 60), policy["max_delay"])
    return max(base * (1 + random.uniform(-1, 1) * policy["jitter"]), 0.0)


# ── History: runner_executions in DB_FILE, the table OmniFlow writes ──────────────────────────

def iso_now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def hostname():
    try:
        with open("/proc/sys/kernel/hostname", encoding="utf-8") as f:
            host = f.read().strip()
    except OSError:
        host = os.environ.get("HOSTNAME", "").strip()
    return host or None


class History:
    """Writes this run's row in runner_executions. A history failure is a warning, never the
    run's failure."""

    def __init__(self, path):
        self.conn = None
        try:
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            conn = sqlite3.connect(path, timeout=5, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 5000")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript("BEGIN IMMEDIATE;" + SCHEMA + ";PRAGMA user_version = 1;COMMIT;")
            self.conn = conn
        except (sqlite3.Error, OSError) as e:
            warn(f"history disabled: cannot open {path}: {e}")

    def write(self, sql, params):
        if self.conn is None:
            return
        try:
            self.conn.execute(sql, params)
        except sqlite3.Error as e:
            warn(f"history: {e}")

    def queued(self, run_id, priority, variables, at):
        self.write(
            "INSERT INTO runner_executions (id, blueprint_name, status, priority, trigger, sandbox, seed, "
            "simulate_failures, variables, blueprint, parent_run_id, queued_at, started_at, tokens_used, host, pid) "
            "VALUES (?, ?, 'queued', ?, 'cli', 0, NULL, 0.0, ?, ?, NULL, ?, ?, 0, ?, ?)",
            (run_id, BLUEPRINT_NAME, priority, compact_json(variables), BLUEPRINT_JSON, at, at, hostname(), os.getpid()))

    def started(self, run_id, steps_total):
        self.write("UPDATE runner_executions SET status = 'running', started_at = ?, steps_total = ?, "
                   "steps_done = 0 WHERE id = ?", (iso_now(), steps_total, run_id))

    def finished(self, run_id, outcome, steps_done):
        self.write("UPDATE runner_executions SET status = ?, finished_at = ?, total_time_ms = ?, tokens_used = ?, "
                   "steps_done = ?, error = ?, error_kind = ?, failed_step = ? WHERE id = ?",
                   (outcome["status"], iso_now(), outcome["totalTimeMs"], outcome["tokensUsed"], steps_done,
                    outcome["error"], outcome.get("errorKind"), outcome.get("failedStep"), run_id))


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def new_run_id():
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    ms, head = int(time.time() * 1000), ""
    while ms:
        ms, digit = divmod(ms, 36)
        head = alphabet[digit] + head
    return head.rjust(9, "0")[-9:] + "".join(random.choice(alphabet) for _ in range(4))


# ── The run: readiness, fan-out, condition skips, fail-fast, retries ──────────────────────────

class Node:
    def __init__(self, id, kind, prepare, needs=(), for_each=None, retry=None, timeout=None,
                 continue_on_error=False, extra_timeout=0.0):
        self.id, self.kind, self.prepare, self.needs = id, kind, prepare, list(needs)
        self.for_each, self.retry, self.timeout = for_each, retry, timeout
        self.continue_on_error, self.extra_timeout = continue_on_error, extra_timeout


def timeout_message(node, seconds):
    if node.kind == "llm":
        return (f"the model call timed out after {fmt_secs(seconds)}s and was stopped (REQUEST_TIMEOUT or the "
                "node's \"timeout\"); raise it if the model is just slow, or pick a smaller model")
    return (f"the step timed out after {fmt_secs(seconds)}s and was stopped; raise the node's \"timeout\" "
            "(or REQUEST_TIMEOUT)")


def run_step(node, ctx, key, item):
    """Renders the step's templates once, then attempts it until it succeeds, fails for good,
    or the run is aborted. Returns a summary."""
    started = time.monotonic()
    summary = {"node": node.id, "step": key, "status": "error", "attempts": 0, "durationMs": 0,
               "tokensUsed": 0, "cached": False, "error": None}
    if item is not None:
        summary["item"] = item
    output, error, attempt = None, None, 0
    try:
        attempt_fn = node.prepare(ctx)
    except StepError as e:
        error = e
    else:
        policy = retry_policy(DEFAULT_RETRY, node.retry)
        timeout = (node.timeout if node.timeout is not None else DEFAULT_TIMEOUT)
        timeout = (timeout if timeout is not None else CONFIG.request_timeout) + node.extra_timeout
        while True:
            attempt += 1
            if ABORT.is_set():
                error = StepError("cancelled", "cancelled")
                break
            try:
                result = attempt_fn(timeout)
                output, tokens = result if node.kind == "llm" else (result, 0)
                summary["tokensUsed"] = tokens
                if ABORT.is_set():
                    error, output = StepError("cancelled", "cancelled"), None
                break
            except StepError as e:
                if e.kind == "timeout":
                    e.message = timeout_message(node, timeout)
                error = e
            wait_s = retry_wait(policy, attempt, error)
            if wait_s is None:
                if attempt > 1 and error.kind in RETRYABLE:
                    error.message = f"{error.message} (gave up after {attempt} attempts)"
                break
            print(f"  {key}: attempt {attempt} failed ({error.kind}: {error.message}); retrying in {wait_s:.1f}s",
                  file=sys.stderr)
            if ABORT.wait(scaled(wait_s)):
                error = StepError("cancelled", "cancelled")
                break
            error = None
    summary["attempts"] = attempt
    summary["durationMs"] = int((time.monotonic() - started) * 1000)
    if error is None:
        summary["status"] = "success"
    else:
        summary["status"] = "cancelled" if error.kind == "cancelled" else "error"
        summary["error"] = error.message
        summary["errorKind"] = error.kind
    return summary, output, error


def main_run(variables, json_out):
    run_id = new_run_id()
    history = History(CONFIG.db_file)
    history.queued(run_id, PRIORITY, variables, iso_now())
    history.started(run_id, len(NODES))
    started = time.monotonic()
    index = {n.id: i for i, n in enumerate(NODES)}
    states = [["pending", None] for _ in NODES]  # pending | running | done | failed_continue | failed | skipped
    running = {}  # node index -> {"remaining", "outputs", "failed"}
    summaries, inflight = [], {}
    failure, timed_out, tokens, steps_done = None, False, 0, 0
    deadline = started + scaled(RUN_TIMEOUT) if RUN_TIMEOUT is not None else None

    def context():
        nodes = {}
        for i, (state, value) in enumerate(states):
            if state == "done":
                nodes[NODES[i].id] = {"output": value, "status": "success"}
            elif state == "failed_continue":
                nodes[NODES[i].id] = {"output": None, "status": "error", "error": value.message}
            elif state == "skipped":
                nodes[NODES[i].id] = {"output": None, "status": "skipped"}
        return {"vars": variables, "nodes": nodes,
                "run": {"id": run_id, "blueprint": BLUEPRINT_NAME, "sandbox": False}}

    def skip_reason(needs):
        for d in needs:
            state, value = states[d]
            if state == "skipped":
                return f"skipped because {NODES[d].id} was skipped"
            if state == "done" and NODES[d].kind == "condition":
                ok = all(truthy(v) for v in value) if isinstance(value, list) else truthy(value)
                if not ok:
                    return f"skipped because condition {NODES[d].id} was false"
        return None

    def plan_failed(i, e):
        nonlocal failure
        summaries.append({"node": NODES[i].id, "step": NODES[i].id, "status": "error", "attempts": 0,
                          "durationMs": 0, "tokensUsed": 0, "cached": False, "error": e.message,
                          "errorKind": e.kind})
        if NODES[i].continue_on_error:
            states[i] = ["failed_continue", e]
        else:
            states[i] = ["failed", None]
            failure = (NODES[i].id, e)
            ABORT.set()

    with ThreadPoolExecutor(max_workers=CONFIG.concurrency) as pool:
        while True:
            changed = failure is None and not ABORT.is_set()
            while changed and failure is None:
                changed = False
                for i, node in enumerate(NODES):
                    if states[i][0] != "pending":
                        continue
                    needs = [index[n] for n in node.needs if n in index]
                    if not all(states[d][0] not in ("pending", "running") for d in needs):
                        continue
                    changed = True
                    reason = skip_reason(needs)
                    if reason is not None:
                        states[i] = ["skipped", None]
                        summaries.append({"node": node.id, "step": node.id, "status": "skipped", "attempts": 0,
                                          "durationMs": 0, "tokensUsed": 0, "cached": False, "error": None})
                        continue
                    ctx = context()
                    if node.for_each is None:
                        steps = [(node.id, None, ctx)]
                    else:
                        try:
                            items = node.for_each(ctx)
                        except StepError as e:
                            plan_failed(i, e)
                            break
                        steps = [(f"{node.id}[{n}]", n, dict(ctx, item=item, index=n)) for n, item in enumerate(items)]
                        if not steps:
                            states[i] = ["done", []]
                            continue
                    states[i] = ["running", None]
                    running[i] = {"remaining": len(steps), "outputs": [None] * len(steps), "failed": None}
                    for key, item, step_ctx in steps:
                        inflight[pool.submit(run_step, node, step_ctx, key, item)] = (i, item)
            if not inflight:
                break
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            done, _ = wait(list(inflight), timeout=timeout, return_when=FIRST_COMPLETED)
            if not done:
                timed_out = True
                ABORT.set()
                done, _ = wait(list(inflight))
            for future in done:
                i, item = inflight.pop(future)
                summary, output, error = future.result()
                summaries.append(summary)
                tokens += summary["tokensUsed"]
                steps_done += 1
                r = running[i]
                if error is None:
                    r["outputs"][item or 0] = output
                elif r["failed"] is None or r["failed"].kind == "cancelled":
                    r["failed"] = error
                r["remaining"] -= 1
                if r["remaining"] > 0:
                    continue
                node = NODES[i]
                value = r["outputs"] if node.for_each is not None else r["outputs"][0]
                e = r["failed"]
                if e is None:
                    states[i] = ["done", value]
                elif node.continue_on_error and e.kind != "cancelled":
                    states[i] = ["failed_continue", e]
                else:
                    states[i] = ["failed", None]
                    if e.kind != "cancelled" and failure is None and not ABORT.is_set():
                        failure = (node.id, e)
                        ABORT.set()

    outcome = {"runId": run_id, "blueprint": BLUEPRINT_NAME, "status": "success",
               "totalTimeMs": int((time.monotonic() - started) * 1000),
               "outputs": {NODES[i].id: v for i, (s, v) in enumerate(states) if s == "done"},
               "steps": summaries, "error": None, "tokensUsed": tokens}
    if timed_out:
        outcome.update(status="error", errorKind="timeout",
                       error=f"the run exceeded its timeout of {RUN_TIMEOUT_TEXT} and was stopped; raise the blueprint's \"timeout\"")
    elif failure is not None:
        outcome.update(status="error", error=f"step {failure[0]} failed: {failure[1].message}",
                       errorKind=failure[1].kind, failedStep=failure[0])
    history.finished(run_id, outcome, steps_done)
    return outcome


def parse_var_value(text_):
    t = text_.strip()
    looks_json = t[:1] in ("[", "{", '"') or t in ("true", "false", "null")
    if not looks_json:
        try:
            float(t)
            looks_json = t.lower() not in ("nan", "inf", "-inf", "infinity", "-infinity", "+inf")
        except ValueError:
            pass
    if looks_json:
        try:
            return json.loads(t)
        except ValueError:
            pass
    return text_


def main(argv=None):
    global CONFIG
    argv = sys.argv[1:] if argv is None else argv
    json_out, overrides = False, {}
    try:
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg == "--json":
                json_out = True
            elif arg in ("-h", "--help"):
                print(f"usage: main.py [--var KEY=VALUE]... [--json]\n\nRuns the {BLUEPRINT_NAME} automation "
                      "(exported from OmniFlow). Exit 0 success, 1 the run failed, 2 bad input.")
                return 0
            elif arg == "--var" or arg.startswith("--var="):
                if arg == "--var":
                    i += 1
                    if i >= len(argv):
                        raise BadInput("--var needs KEY=VALUE")
                    arg = argv[i]
                else:
                    arg = arg[len("--var="):]
                key, sep, value = arg.partition("=")
                if not sep or not key.strip():
                    raise BadInput(f"bad --var {arg!r}: expected KEY=VALUE, e.g. --var TOPICS='[\"rust\",\"wasm\"]'")
                overrides[key.strip()] = parse_var_value(value)
            else:
                raise BadInput(f"unknown argument {arg!r} (try --help)")
            i += 1
        variables = dict(VARIABLES)
        for key, value in overrides.items():
            if key not in variables:
                declared = ", ".join(VARIABLES) or "none"
                raise BadInput(f"--var {key}: blueprint \"{BLUEPRINT_NAME}\" declares no variable {key!r} (declared: {declared})")
            variables[key] = value
        load_dotenv()
        CONFIG = Config()
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outcome = main_run(variables, json_out)
    if json_out:
        print(json.dumps(outcome, ensure_ascii=False, separators=(",", ":")))
    else:
        mark = "✓" if outcome["status"] == "success" else "✗"
        print(f"{mark} {BLUEPRINT_NAME} {'succeeded' if outcome['status'] == 'success' else 'failed'} in "
              f"{outcome['totalTimeMs'] / 1000:.1f}s — {len(outcome['steps'])} steps, {outcome['tokensUsed']} tokens",
              file=sys.stderr)
        if outcome["error"]:
            print(f"  {outcome['error']}", file=sys.stderr)
        if outcome["outputs"]:
            last_id, value = list(outcome["outputs"].items())[-1]
            print(f"── output of {last_id} ──", file=sys.stderr)
            print(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=2))
    return 0 if outcome["status"] == "success" else 1
