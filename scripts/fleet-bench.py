#!/usr/bin/env python3
"""Fleet measurements with the real binaries on a real PostgreSQL: claim latency, a fan-out of
40 x 200 ms model calls over 1 and 3 processes, steps/s with 1-3 worker processes, each beside
the same work on SQLite alone.

    cargo build --release
    python3 scripts/fleet-bench.py target/release/omniflow [lat] [fan] [fanlocal] [fanprof] [tput]

`fanprof` interleaves the fan-out on SQLite alone, over 1 and over 3 processes (ROUNDS rounds,
default 3) and says per step where the time beyond the call goes (the queue rows' times kept by a
trigger, beside the history's).

Needs PostgreSQL at 127.0.0.1:5432 (user postgres, trust) and psql; creates and drops its own
databases (fleet_bench_*). A fake OpenAI-compatible server in this process answers the calls.
"""
import asyncio, json, os, signal, sqlite3, statistics, subprocess, sys, tempfile, threading, time
from datetime import datetime

BIN = os.path.abspath(sys.argv[1])
PG = "postgres://postgres@127.0.0.1:5432/"
LAT = {"s": 0.0}
ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(ANSWER)


async def answer(reader, writer):
    """One keep-alive connection of the fake: each request is answered LAT seconds after it came.
    An event loop, not a thread per connection: 40 calls in flight cost the fake nothing, so the
    span measured is OmniFlow's (a threaded server added 6-13 ms per call here)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            await asyncio.sleep(LAT["s"])
            writer.write(HEAD + ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve(ready):
    async def main():
        server = await asyncio.start_server(answer, "127.0.0.1", 0, backlog=256)
        ready.append(server.sockets[0].getsockname()[1])
        await server.serve_forever()
    asyncio.run(main())


_ready = []
threading.Thread(target=serve, args=(_ready,), daemon=True).start()
while not _ready:
    time.sleep(0.01)
FAKE = f"http://127.0.0.1:{_ready[0]}/v1"


def psql(db, sql):
    subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", db, "-c", sql], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fresh_db(name):
    psql("postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    psql("postgres", f"CREATE DATABASE {name}")
    return PG + name


def env(d, host, url, extra):
    e = {"PATH": os.environ["PATH"], "DB_FILE": f"{d}/{host}.db", "LOG_DIR": f"{d}/logs-{host}",
         "OPENAI_BASE_URL": FAKE, "OPENAI_CONCURRENCY": "0", "CACHE_TTL": "0", "MAX_RETRIES": "0",
         "HF_RATE_LIMIT": "0"}
    if url:
        e["DATABASE_URL"] = url
    e.update(extra)
    return e


def daemon(d, host, url, extra):
    os.makedirs(f"{d}/none", exist_ok=True)
    return subprocess.Popen([BIN, "daemon", "--dir", f"{d}/none"], env=env(d, host, url, extra), cwd=d,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(d, url, bp, extra):
    p = f"{d}/bp.json"
    with open(p, "w") as f:
        json.dump(bp, f)
    t = time.monotonic()
    r = subprocess.run([BIN, "run", p], env=env(d, "driver", url, extra), cwd=d, capture_output=True, text=True)
    wall = time.monotonic() - t
    if r.returncode != 0:
        print(r.stderr[-2000:])
        raise SystemExit("run failed")
    c = History(d, url)
    rid, total = c.one("SELECT id, total_time_ms FROM runner_executions ORDER BY queued_at DESC LIMIT 1")
    return c, rid, total, wall


class History:
    """The driver's history: the fleet's PostgreSQL database, or its own SQLite file."""

    def __init__(self, d, url):
        self.url = url
        self.sqlite = None if url else sqlite3.connect(f"{d}/driver.db")

    def one(self, sql, args=()):
        if self.sqlite:
            return self.sqlite.execute(sql, args).fetchone()
        for a in args:
            sql = sql.replace("?", "'" + str(a).replace("'", "''") + "'", 1)
        out = subprocess.run(["psql", "-At", "-F", "|", self.url, "-c", sql], capture_output=True,
                             text=True, check=True).stdout.strip()
        return tuple(int(x) if x.isdigit() else x for x in out.split("|"))


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def span(c, rid, node):
    if c.sqlite:
        q, f = c.one("SELECT min(queued_at), max(finished_at) FROM runner_steps WHERE run_id=? AND node_id=?",
                     (rid, node))
        return ts(f) - ts(q)
    (secs,) = c.one("SELECT extract(epoch FROM max(finished_at) - min(queued_at)) FROM runner_steps "
                    "WHERE run_id=? AND node_id=?", (rid, node))
    return float(secs)


def wait_idle(s=3):
    time.sleep(s)


def stop(ps):
    for p in ps:
        p.send_signal(signal.SIGTERM)
    for p in ps:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def claim_latency():
    d = tempfile.mkdtemp()
    url = fresh_db("fleet_bench_lat")
    ds = [daemon(d, "w1", url, {"OMNIFLOW_TAGS": "w", "CONCURRENCY": "4"})]
    wait_idle(4)
    # The queue's tables exist now; keep each row's times when its driver takes it.
    psql("fleet_bench_lat", "CREATE TABLE lat (available_at timestamptz, claimed_at timestamptz, finished_at timestamptz);"
         "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO lat VALUES "
         "(OLD.available_at, OLD.claimed_at, OLD.finished_at); RETURN OLD; END $$;"
         "CREATE TRIGGER keep BEFORE DELETE ON runner_queue FOR EACH ROW EXECUTE FUNCTION keep();")
    nodes = []
    for i in range(30):
        n = {"id": f"s{i}", "type": "transform", "template": "x", "tags": ["w"]}
        if i:
            n["needs"] = [f"s{i-1}"]
        nodes.append(n)
    # A chain: each step is enqueued when the previous ended, to a worker that is idle by then.
    c, rid, total, wall = run(d, url, {"name": "chain", "nodes": nodes}, {"CONCURRENCY": "4"})
    stop(ds)
    out = subprocess.run(["psql", "-At", "-h", "127.0.0.1", "-U", "postgres", "fleet_bench_lat", "-c",
                          "SELECT extract(epoch FROM claimed_at - available_at)*1000, "
                          "extract(epoch FROM finished_at - claimed_at)*1000 FROM lat"],
                         capture_output=True, text=True).stdout.split()
    claims = sorted(float(x.split("|")[0]) for x in out)
    step_ms = total / 30
    return claims, step_ms


# A first step that goes through the queue, so the process's connections and the queue's tables
# are there before the measured node starts (a long-running process has them).
WARM = {"id": "warm", "type": "transform", "template": "x"}


def fanout(n_procs, reps=5):
    LAT["s"] = 0.2
    res = []
    for r in range(reps):
        d = tempfile.mkdtemp()
        url = fresh_db("fleet_bench_fan")
        ds = [daemon(d, f"d{i}", url, {"CONCURRENCY": "40"}) for i in range(n_procs - 1)]
        wait_idle(3 if ds else 0)
        bp = {"name": "fan", "variables": {"ITEMS": [f"x{r}i{i}" for i in range(40)]},
              "nodes": [WARM, {"id": "ask", "type": "llm", "provider": "openai", "model": "m", "needs": ["warm"],
                         "forEach": "{{ vars.ITEMS }}", "prompt": "say {{ item }}"}]}
        c, rid, total, wall = run(d, url, bp, {"CONCURRENCY": "40"})
        res.append(span(c, rid, "ask") * 1000)
        stop(ds)
    LAT["s"] = 0.0
    return res


STAGES = [("enqueue", "q.available_at - s.queued_at"), ("claim", "q.claimed_at - q.available_at"),
          ("start", "s.started_at - q.claimed_at"), ("call+complete", "q.finished_at - s.started_at"),
          ("collect+record", "s.finished_at - q.finished_at")]


def fanout_profile(n_procs, reps=5):
    """The fan-out with each queue row's times kept (a trigger copies a row as its driver deletes
    it) beside the step's times in the history: where the time beyond the 200 ms call goes.
    Also the CPU time (user + system) of all the processes of each repetition."""
    LAT["s"] = 0.2
    res = []
    for r in range(reps):
        d = tempfile.mkdtemp()
        url = fresh_db("fleet_bench_prof")
        # Migrates the database (the queue's table is one of the migrations).
        run(d, url, {"name": "init", "nodes": [WARM]}, {"CONCURRENCY": "1"})
        psql("fleet_bench_prof", "CREATE TABLE lat (id bigint, step_key text, available_at timestamptz, "
             "claimed_at timestamptz, finished_at timestamptz, locked_by text);"
             "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO lat VALUES "
             "(OLD.id, OLD.step_key, OLD.available_at, OLD.claimed_at, OLD.finished_at, OLD.locked_by); "
             "RETURN OLD; END $$;"
             "CREATE TRIGGER keep BEFORE DELETE ON runner_queue FOR EACH ROW EXECUTE FUNCTION keep();")
        cpu0 = os.times()
        ds = [daemon(d, f"d{i}", url, {"CONCURRENCY": "40"}) for i in range(n_procs - 1)]
        wait_idle(3 if ds else 0)
        bp = {"name": "fan", "variables": {"ITEMS": [f"p{r}i{i}" for i in range(40)]},
              "nodes": [WARM, {"id": "ask", "type": "llm", "provider": "openai", "model": "m", "needs": ["warm"],
                         "forEach": "{{ vars.ITEMS }}", "prompt": "say {{ item }}"}]}
        c, rid, total, wall = run(d, url, bp, {"CONCURRENCY": "40"})
        stop(ds)
        cpu1 = os.times()
        cpu = (cpu1.children_user - cpu0.children_user + cpu1.children_system - cpu0.children_system) * 1000
        span_ms = span(c, rid, "ask") * 1000
        cols = ", ".join(f"percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM {e})*1000), "
                         f"max(extract(epoch FROM {e})*1000)" for _, e in STAGES)
        row = c.one(f"SELECT {cols}, count(DISTINCT q.locked_by), "
                    "extract(epoch FROM max(q.available_at) - min(s.queued_at))*1000, "
                    "extract(epoch FROM max(s.finished_at) - max(q.finished_at))*1000 "
                    "FROM lat q JOIN runner_steps s ON s.step_key = q.step_key "
                    f"WHERE s.run_id = '{rid}' AND s.node_id = 'ask'")
        vals = [float(x) for x in row]
        stages = ", ".join(f"{name} {vals[2*i]:.1f}/{vals[2*i+1]:.1f}" for i, (name, _) in enumerate(STAGES))
        print(f"  {n_procs} proc, rep {r}: span {span_ms:.0f} ms, cpu {cpu:.0f} ms; per step median/max ms: {stages}; "
              f"claimed by {int(vals[10])} process(es); last enqueue {vals[11]:.1f} ms after the first queued; "
              f"last recorded {vals[12]:.1f} ms after the last finished in the queue", flush=True)
        res.append((span_ms, cpu))
    LAT["s"] = 0.0
    return res


def fanlocal(reps=5):
    LAT["s"] = 0.2
    r = []
    for k in range(reps):
        d = tempfile.mkdtemp()
        bp = {"name": "fan", "variables": {"ITEMS": [f"y{k}i{i}" for i in range(40)]},
              "nodes": [WARM, {"id": "ask", "type": "llm", "provider": "openai", "model": "m", "needs": ["warm"],
                         "forEach": "{{ vars.ITEMS }}", "prompt": "say {{ item }}"}]}
        cpu0 = os.times()
        c, rid, total, wall = run(d, None, bp, {"CONCURRENCY": "40"})
        cpu1 = os.times()
        cpu = (cpu1.children_user - cpu0.children_user + cpu1.children_system - cpu0.children_system) * 1000
        r.append((span(c, rid, "ask") * 1000, cpu))
    LAT["s"] = 0.0
    return r


def throughput(workers, n=2000, local=False):
    d = tempfile.mkdtemp()
    url = None if local else fresh_db("fleet_bench_tput")
    ds = [] if local else [daemon(d, f"w{i}", url, {"OMNIFLOW_TAGS": "w", "CONCURRENCY": "40"}) for i in range(workers)]
    wait_idle(3 if ds else 0)
    node = {"id": "each", "type": "transform", "forEach": "{{ vars.ITEMS }}", "template": "{{ item }}",
            "needs": ["warm"]}
    warm = dict(WARM)
    if not local:
        node["tags"] = ["w"]
        warm["tags"] = ["w"]
    bp = {"name": "tput", "variables": {"ITEMS": list(range(n))}, "nodes": [warm, node]}
    c, rid, total, wall = run(d, url, bp, {"CONCURRENCY": "40"})
    stop(ds)
    return n / (span(c, rid, "each")), total


what = sys.argv[2:] or ["lat", "fan", "tput"]
print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
if "lat" in what:
    claims, step_ms = claim_latency()
    print(f"claim latency queued->running (idle worker woken by NOTIFY), 30 chained steps: "
          f"median {statistics.median(claims):.1f} ms, p90 {claims[int(len(claims)*0.9)]:.1f} ms, "
          f"max {claims[-1]:.1f} ms; whole step round trip (driver->worker->driver) {step_ms:.1f} ms/step")
if "fan" in what:
    for n in (1, 3):
        r = fanout(n)
        print(f"fan-out 40 x 200 ms over {n} process(es): node span {', '.join(f'{x:.0f}' for x in r)} ms "
              f"(median {statistics.median(r):.0f} ms)")
if "tput" in what:
    sps, total = throughput(0, local=True)
    print(f"steps/s SQLite only, 1 process, 2000 transform steps: {sps:.0f} (run {total} ms)")
    for w in (1, 2, 3):
        sps, total = throughput(w)
        print(f"steps/s fleet, {w} worker process(es) + driver, 2000 transform steps: {sps:.0f} (run {total} ms)")
print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
if "fanlocal" in what:
    r = [x for x, _ in fanlocal()]
    print(f"fan-out 40 x 200 ms, SQLite only (no fleet), 1 process: {', '.join(f'{x:.0f}' for x in r)} ms")
if "fanprof" in what:
    # Interleaved rounds (baseline, 1 process, 3 processes), so load that comes and goes during
    # the measurement hits all three alike.
    rounds = int(os.environ.get("ROUNDS", "3"))
    out = {"sqlite": [], 1: [], 3: []}
    for k in range(rounds):
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
        out["sqlite"] += fanlocal(reps=2)
        out[1] += fanout_profile(1, reps=2)
        out[3] += fanout_profile(3, reps=2)
    for key, label in (("sqlite", "SQLite only (no fleet), 1 process"), (1, "fleet, 1 process"),
                       (3, "fleet, 3 processes")):
        spans = [x for x, _ in out[key]]
        cpus = [c for _, c in out[key]]
        print(f"fan-out 40 x 200 ms, {label}: span median {statistics.median(spans):.0f} ms "
              f"({', '.join(f'{x:.0f}' for x in spans)}); CPU median {statistics.median(cpus):.0f} ms")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
