"""Tracking-server ingest: metric points per second over HTTP into `mlflow server` on PostgreSQL.

Starts the project's PostgreSQL cluster and MLflow tracking server (pipeline.services, the same
command as `make server`, only the `--workers` count varied per row) in a scratch home on free
loopback ports. In each cell, N client processes (each its own run) log per-step points the way
the pipeline's metric writer does: `MlflowClient(url).log_batch(run_id, metrics=[Metric(key,
value, ts_ms, step), ...], synchronous=True)` with 8 keys per step and up to 1000 points per call,
from 1, 2 or 4 threads per process (each thread sends different steps). The rate counts the points
of the requests that completed inside a steady-state window (after a warm-up); CPU time of the
server's processes, of PostgreSQL and of the clients is read from /proc over the same window.
After each run every client checks with `get_metric_history` that one key holds exactly the steps
(and values) it sent, and that the run's latest value is the last step's. Each cell runs several
times with fresh client processes (so fresh connections, which uvicorn places on its workers per
connection), and the table shows the median run. Replaces the "Tracking server" section of
bench/RESULTS.md.

    python bench/bench_server.py                       # the default grid, 3 runs per cell: ~8 min on 2 cores
    python bench/bench_server.py --cells 2:4:1:1000,4:4:1:1000 --repeats 5 --no-write
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

from benchlib import machine, write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Tracking server: metric points per second over HTTP"
# The trainer's per-step keys (pipeline/train.py PER_STEP_KEYS); copied so that the clients need not import torch.
KEYS = ("train/recon_nll", "train/kl", "train/kl_penalized", "train/beta", "train/loss", "train/elbo",
        "train/grad_norm", "train/lr")
# (server workers, client processes, requests in flight per client, points per request). Grouped by
# server workers so that each server starts once.
DEFAULT_CELLS = ("2:1:1:1000,2:1:2:1000,2:1:4:1000,2:1:1:200,2:4:1:1000,2:4:2:1000,"
                 "1:4:1:1000,"
                 "4:1:2:1000,4:4:1:1000,4:4:2:1000")
GPU_STEP_POINTS_S = 8_000  # 8 keys per ~1 ms GPU step
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _value(step: int, j: int) -> float:
    return step + j / 16  # exact in binary floating point, so the check can compare values exactly


# --- client process ------------------------------------------------------------------------------
def _client(idx: int, url: str, experiment_id: str, inflight: int, batch: int, warmup: float, duration: float,
            ready, go, start, results) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    try:
        client = MlflowClient(url)
        run_id = client.create_run(experiment_id, run_name=f"client{idx}-x{inflight}-b{batch}").info.run_id
        steps_per_request = max(1, batch // len(KEYS))
        ready.put(idx)
        go.wait()
        t_lo = start.value + warmup
        t_hi = t_lo + duration
        blocks = itertools.count()
        lock = threading.Lock()
        done: list[tuple[float, int, int]] = []  # (completion time, points, block) per request
        errors: list[str] = []

        def sender() -> None:
            try:
                while time.time() < t_hi and not errors:
                    with lock:
                        b = next(blocks)
                    ts = int(time.time() * 1000)
                    metrics = [Metric(k, _value(step, j), ts, step)
                               for step in range(b * steps_per_request, (b + 1) * steps_per_request)
                               for j, k in enumerate(KEYS)]
                    client.log_batch(run_id, metrics=metrics, synchronous=True)
                    done.append((time.time(), len(metrics), b))
            except Exception as e:  # reported, and the cell fails
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=sender) for _ in range(inflight)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Points completed in the window over the time from the last completion before it to the last in it:
        # whole requests over the time they took, so a few large requests per window do not quantize the rate.
        done.sort()
        inside = [(t, n) for t, n, _ in done if t_lo < t <= t_hi]
        before = [t for t, _, _ in done if t <= t_lo]
        rate = (sum(n for _, n in inside) / (inside[-1][0] - before[-1]) if inside and before
                else sum(n for _, n in inside) / duration)
        sent_blocks = sorted(b for _, _, b in done)
        expected = [s for b in sent_blocks for s in range(b * steps_per_request, (b + 1) * steps_per_request)]
        check, ok = "not run", False
        if not errors:
            key = "train/loss"
            j = KEYS.index(key)
            history = client.get_metric_history(run_id, key)
            got = sorted((m.step, m.value) for m in history)
            want = sorted((s, _value(s, j)) for s in expected)
            latest = client.get_run(run_id).data.metrics.get(key)
            ok = got == want and latest == _value(max(expected), j)
            check = (f"{len(got)} of {len(want)} steps of {key}, latest {latest}" if not ok
                     else f"{len(got)} steps of {key} exact")
        results.put({"idx": idx, "run_id": run_id, "rate": rate,
                     "ok": ok, "check": check,
                     "errors": errors[:3]})
    except Exception as e:
        ready.put(idx)  # never leave the parent waiting
        results.put({"idx": idx, "ok": False, "errors": [f"{type(e).__name__}: {e}"], "rate": 0.0, "check": "client failed"})


# --- CPU accounting from /proc -------------------------------------------------------------------
def _procs() -> list[tuple[int, int, int, float]]:
    """(pid, ppid, session, cpu seconds incl. reaped children) of every process."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
        out.append((int(d.name), int(f[1]), int(f[3]), sum(int(x) for x in f[11:15]) / CLK_TCK))
    return out


def _cpu_sample(server_sid: int, postmaster: int, clients: tuple[int, ...] = ()) -> dict[str, float]:
    procs = _procs()
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    return {
        "server": sum(c for pid, _, sid, c in procs if sid == server_sid),
        "postgres": sum(c for pid, ppid, _, c in procs if postmaster in (pid, ppid)),
        "clients": sum(c for pid, _, _, c in procs if pid in clients),
        "busy": (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK,  # all but idle and iowait
        "total": sum(ticks) / CLK_TCK,
    }


# --- server and cells ----------------------------------------------------------------------------
def _start_server(services, pg_port: int, workers: int) -> tuple[str, int]:
    """services.start_server (the `make server` command), with `--workers` set to `workers`."""
    real_popen = services.subprocess.Popen

    def popen(cmd, *a, **kw):
        if isinstance(cmd, list) and "--workers" in cmd:
            cmd = list(cmd)
            cmd[cmd.index("--workers") + 1] = str(workers)
        return real_popen(cmd, *a, **kw)

    with mock.patch.object(services.subprocess, "Popen", popen):
        url = services.start_server(_free_port(), pg_port=pg_port, log=lambda *_: None)
    pid = services._our_server_pid()
    if pid is None:
        raise SystemExit("the MLflow server came up but its pid file is missing")
    return url, pid


def _settle(server_sid: int, postmaster: int, limit_s: float = 180) -> float:
    """Wait until the server's processes are idle (< 0.1 core over 2 s): MLflow 3's server starts a
    job runner whose consumer processes spend tens of CPU seconds importing. Returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        a = _cpu_sample(server_sid, postmaster)["server"]
        time.sleep(2)
        if _cpu_sample(server_sid, postmaster)["server"] - a < 0.2:
            break
    return time.perf_counter() - t0


def _run_cell(ctx, url: str, experiment_id: str, server_sid: int, postmaster: int, clients: int, inflight: int,
              batch: int, warmup: float, duration: float) -> dict:
    t0 = time.perf_counter()
    ready, results, go, start = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_client, args=(i, url, experiment_id, inflight, batch, warmup, duration, ready,
                                               go, start, results), daemon=True) for i in range(clients)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=180)
        start.value = time.time() + 0.2
        go.set()
        time.sleep(max(0.0, start.value + warmup - time.time()))
        pids = tuple(p.pid for p in procs)
        a = _cpu_sample(server_sid, postmaster, pids)
        time.sleep(max(0.0, start.value + warmup + duration - time.time()))
        b = _cpu_sample(server_sid, postmaster, pids)
        out = [results.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    overhead = time.perf_counter() - t0 - warmup - duration
    out.sort(key=lambda r: r["idx"])
    rate = sum(r["rate"] for r in out)
    points = rate * duration  # in the CPU-sampling window

    def per_point(seconds: float) -> float:
        return 1e6 * seconds / points if points else float("nan")

    return {
        "rate": rate,
        "per_client": [r["rate"] for r in out],
        "server_us": per_point(b["server"] - a["server"]),
        "postgres_us": per_point(b["postgres"] - a["postgres"]),
        "client_us": per_point(b["clients"] - a["clients"]),
        "busy": (b["busy"] - a["busy"]) / max(1e-9, b["total"] - a["total"]),
        # CPU (in cores) of everything else on the machine in the window: should be ~0
        "other": ((b["busy"] - a["busy"]) - sum(b[k] - a[k] for k in ("server", "postgres", "clients"))) / duration,
        "ok": all(r["ok"] for r in out),
        "checks": [r["check"] for r in out],
        "errors": [e for r in out for e in r["errors"]],
        "overhead_s": overhead,  # start-up and check around the measurement
    }


def _store_reference(services, pg, seconds: float) -> dict[str, float]:
    """MLflow's SqlAlchemyStore.log_batch on the same PostgreSQL in this process, without HTTP: how much of
    the server's CPU per point is the store itself."""
    from mlflow.entities import Metric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(pg.url("mlflow"), str(services.services_dir() / "mlflow-artifacts"))
    exp_id = store.get_experiment_by_name("bench-server").experiment_id
    run_id = store.create_run(exp_id, "bench", int(time.time() * 1000), [], "store-in-process").info.run_id

    def batch(b: int) -> list:
        ts = int(time.time() * 1000)
        return [Metric(k, _value(s, j), ts, s) for s in range(b * 125, (b + 1) * 125) for j, k in enumerate(KEYS)]

    for b in range(2):
        store.log_batch(run_id, batch(b), [], [])
    n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        store.log_batch(run_id, batch(2 + n), [], [])
        n += 1
    points = 1000 * n
    return {"cpu_us": 1e6 * (time.process_time() - cpu0) / points, "rate": points / (time.perf_counter() - t0)}


Cell = tuple[int, int, int, int]


def _section(rows: list[tuple[Cell, dict]], startup: dict[int, tuple[float, float]], store: dict[str, float] | None,
             duration: float, warmup: float, repeats: int, command: str) -> list[str]:
    repeats_txt = f"; median of {repeats} runs per row (range in brackets)" if repeats > 1 else "; one run per row"
    lines = [
        SECTION,
        "",
        f"Machine: {machine()}.",
        f"`{command}`, measured in one session with the client processes, the MLflow server",
        "(`make server`'s command, `--workers` as in the row) and PostgreSQL all on this machine. Each client",
        "process logs its own run the way the metric writer does: `log_batch(..., synchronous=True)`,",
        f"{len(KEYS)} keys per step, consecutive steps per request, each in-flight thread sending different steps.",
        f"Rate: whole requests completed in a {duration:g} s steady-state window (after {warmup:g} s of warm-up)",
        f"over the time they took{repeats_txt}. CPU per point: CPU seconds of the server's",
        "processes (uvicorn supervisor and workers, job runner), of PostgreSQL (postmaster and backends) and of",
        "the clients over the points; other load: CPU (in cores) used by anything else on the machine meanwhile.",
        "Check: `get_metric_history` of `train/loss` returns exactly the steps and values sent, and the",
        "run's latest value is the last step's, for every client.",
        "",
        "| server `--workers` | clients | in flight / client | points / request | points/s total | points/s per client "
        "| server CPU µs/pt | PostgreSQL CPU µs/pt | client CPU µs/pt | machine busy | other load | check |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (w, c, k, b), r in rows:
        per = r["per_client"]
        per_txt = f"{per[0]:,.0f}" if len(per) == 1 else f"{sum(per) / len(per):,.0f} ({min(per):,.0f}–{max(per):,.0f})"
        rates = r.get("rates", [r["rate"]])
        rate_txt = f"{r['rate']:,.0f}" + (f" ({min(rates):,.0f}–{max(rates):,.0f})" if len(rates) > 1 else "")
        lines.append(f"| {w} | {c} | {k} | {b} | {rate_txt} | {per_txt} | {r['server_us']:.0f} | "
                     f"{r['postgres_us']:.0f} | {r['client_us']:.0f} | {100 * r['busy']:.0f}% | {r['other']:.2f} | "
                     f"{'exact' if r['ok'] else 'FAIL'} |")
    lines.append("")
    if store:
        lines.append(f"Reference, no HTTP: MLflow's `SqlAlchemyStore.log_batch` on the same PostgreSQL in one process, "
                     f"1000 points per call: {store['rate']:,.0f} points/s, {store['cpu_us']:.0f} µs of Python CPU per "
                     "point.")
    if startup:
        lines.append("Server start (healthy → idle): " + ", ".join(
            f"`--workers {w}` {up:.0f} s → {quiet:.0f} s" for w, (up, quiet) in sorted(startup.items()))
            + "; MLflow 3's server also starts a job runner (huey consumer processes) that keeps both cores busy "
              "importing for the difference, so each server is measured only once idle.")
    lines.append("")

    ok = {cell: r for cell, r in rows if r["ok"]}

    def best(pred) -> tuple[Cell, dict] | None:
        cand = [(cell, r) for cell, r in ok.items() if pred(cell)]
        return max(cand, key=lambda x: x[1]["rate"]) if cand else None

    base, one, four, top = ok.get((2, 1, 1, 1000)), best(lambda c: c[1] == 1), best(lambda c: c[1] == 4), best(
        lambda c: True)
    if not (base and one and four and top):
        return lines
    (w1, _, k1, b1), r1 = one
    (w4, _, k4, _), r4 = four
    rt = top[1]
    srv = rt["server_us"] + rt["postgres_us"]
    total_us = srv + rt["client_us"]
    cores = os.cpu_count() or 1
    def pct(r: dict) -> str:
        return f"{100 * (r['rate'] / base['rate'] - 1):+.0f}%"

    single = [f"{k} in flight {ok[(2, 1, k, 1000)]['rate']:,.0f} ({pct(ok[(2, 1, k, 1000)])})"
              for k in (2, 4) if (2, 1, k, 1000) in ok]
    small = ok.get((2, 1, 1, 200))
    text = [f"One writer (one client, one request of 1000 points in flight, `--workers 2`) stores {base['rate']:,.0f} "
            "points/s" + (f"; {', '.join(single)}" if single else "")
            + (f"; 200-point requests only {small['rate']:,.0f}" if small else "") + "."]
    four_by_w = {w: r for (w, c, k, b), r in ok.items() if c == 4 and k == 1 and b == 1000}
    spreads = [(max(r["rates"]) - min(r["rates"])) / r["rate"] for r in ok.values() if len(r.get("rates", [])) > 1]
    text.append(f"Four clients together reach {r4['rate']:,.0f} points/s at best ({r4['rate'] / 4:,.0f} per client, "
                f"`--workers {w4}`, {k4} in flight each); with one in flight each "
                + ", ".join(f"{r['rate']:,.0f} at `--workers {w}`" for w, r in sorted(four_by_w.items()))
                + (f", so one server worker (one core) tops out near {four_by_w[1]['rate']:,.0f}" if 1 in four_by_w
                   else "")
                + (f"; runs of one row differ by up to {100 * max(spreads):.0f}% because uvicorn spreads connections, "
                   "not requests, over its workers, so two clients' keep-alive connections can share a worker while "
                   "another idles" if spreads and max(spreads) > 0.1 else "") + ".")
    store_txt = (f" (MLflow's SqlAlchemyStore alone, in one process without HTTP, takes {store['cpu_us']:.0f} µs, so "
                 "most of it is the store's ORM unit of work and latest-metrics update, not HTTP)" if store else "")
    text.append(f"The ceiling is the CPU: at the best row ({rt['rate']:,.0f} points/s, machine {100 * rt['busy']:.0f}% "
                f"busy) a point costs {rt['server_us']:.0f} µs in the server{store_txt}, {rt['postgres_us']:.0f} µs "
                f"in PostgreSQL and {rt['client_us']:.0f} µs in the client, so {cores} cores cannot ingest much more "
                f"than {cores * 1e6 / total_us:,.0f} points/s whatever the knobs, and each server core (with "
                f"PostgreSQL) adds about {1e6 / srv:,.0f} points/s.")
    text.append(f"A GPU trainer at ~1 ms per step logs {GPU_STEP_POINTS_S:,} points/s ({len(KEYS)} keys), "
                f"{GPU_STEP_POINTS_S / r1['rate']:.1f}× the best single client here: per-step logging over HTTP to a "
                f"stock MLflow server needs about {GPU_STEP_POINTS_S * srv / 1e6:.1f} server cores per GPU trainer.")
    text.append(f"Best settings measured: {b1} points per request, {k1} requests in flight "
                f"for a lone client, and for four clients `--workers {w4}` with {k4} in flight (rows within the "
                "run-to-run range are ties).")
    lines.append(" ".join(text))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=DEFAULT_CELLS,
                    help="comma-separated server_workers:clients:in_flight:points_per_request")
    ap.add_argument("--duration", type=float, default=6.0, help="steady-state seconds per run (>= 5)")
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the table shows the median run")
    ap.add_argument("--store-seconds", type=float, default=5.0,
                    help="seconds of the in-process SqlAlchemyStore reference (0: skip)")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    ap.add_argument("--keep", action="store_true", help="keep the scratch home and the cluster's data")
    args = ap.parse_args()
    t_bench = time.perf_counter()
    cells = [tuple(int(x) for x in c.split(":")) for c in args.cells.split(",") if c.strip()]
    if any(len(c) != 4 or min(c) < 1 or c[3] > 1000 for c in cells):
        raise SystemExit("--cells: workers:clients:in_flight:points (points per request at most 1000)")
    order = sorted(range(len(cells)), key=lambda i: [c[0] for c in cells].index(cells[i][0]))  # group by workers

    home = Path(tempfile.mkdtemp(prefix="bench-server-"))
    os.environ["VAE_PIPELINE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    sys.path.insert(0, str(REPO))
    from mlflow import MlflowClient

    from pipeline import services

    # Client processes fork from a server process that has imported mlflow once: a fresh process (and fresh
    # HTTP connections) per run without paying the import each time.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "mlflow", "mlflow.entities"])
    rows: dict[int, dict] = {}
    startup: dict[int, tuple[float, float]] = {}
    store = None
    pg_port = _free_port()
    pg = None
    try:
        pg = services.start_postgres(pg_port, log=lambda *_: None)
        os.environ["PGPASSFILE"] = str(services.pgpass_path())
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        current = None
        for i in order:
            w, c, k, b = cells[i]
            if current != w:
                services.stop_server(log=lambda *_: None)
                t0 = time.perf_counter()
                url, server_pid = _start_server(services, pg_port, w)
                up = time.perf_counter() - t0
                current = w
                client = MlflowClient(url)
                exp = client.get_experiment_by_name("bench-server")
                exp_id = exp.experiment_id if exp else client.create_experiment("bench-server")
                quiet = up + _settle(server_pid, postmaster)
                startup[w] = (up, quiet)
                print(f"[bench] server --workers {w} on {url}: healthy after {up:.1f} s, idle after {quiet:.1f} s",
                      flush=True)
            runs = []
            for _ in range(args.repeats):
                r = _run_cell(ctx, url, exp_id, server_pid, postmaster, c, k, b, args.warmup, args.duration)
                runs.append(r)
                print(f"[bench] workers {w}, {c} client(s) × {k} in flight, {b} pts/request: {r['rate']:,.0f} pts/s "
                      f"(per client {', '.join(f'{x:,.0f}' for x in r['per_client'])}); CPU µs/pt server "
                      f"{r['server_us']:.0f}, postgres {r['postgres_us']:.0f}, client {r['client_us']:.0f}; busy "
                      f"{100 * r['busy']:.0f}%, other load {r['other']:.2f} cores; {'; '.join(r['checks'])}; "
                      f"{r['overhead_s']:.1f} s around the measurement"
                      f"{'; ' + '; '.join(r['errors']) if r['errors'] else ''}", flush=True)
            runs.sort(key=lambda r: r["rate"])
            rows[i] = {**runs[len(runs) // 2], "ok": all(r["ok"] for r in runs),
                       "rates": [r["rate"] for r in runs]}  # the median run, and every run's rate
        services.stop_server(log=lambda *_: None)
        if args.store_seconds > 0:
            store = _store_reference(services, pg, args.store_seconds)
            print(f"[bench] SqlAlchemyStore in-process, no HTTP: {store['rate']:,.0f} pts/s, {store['cpu_us']:.0f} "
                  "µs CPU/pt", flush=True)
    finally:
        services.stop_server(log=lambda *_: None)
        if pg is not None:
            services.stop_postgres(pg_port, log=lambda *_: None)
        if not args.keep:
            if pg is not None and pg.root != services.services_dir() / "postgres":
                shutil.rmtree(pg.root, ignore_errors=True)  # root's cluster under /var/tmp
            shutil.rmtree(home, ignore_errors=True)

    lines = _section([(cells[i], rows[i]) for i in range(len(cells))], startup, store, args.duration, args.warmup,
                     args.repeats, " ".join(["python", "bench/bench_server.py", *sys.argv[1:]]))
    if not args.no_write:
        write_section(Path(args.out), SECTION, lines)
    print("\n".join(lines))
    print(f"[bench] {time.perf_counter() - t_bench:.0f} s in all")
    failed = [cells[i] for i in range(len(cells)) if not rows[i]["ok"]]
    if failed:
        print(f"[bench] FAILED check in cells {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
