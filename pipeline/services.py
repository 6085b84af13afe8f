"""Local servers for the multi-worker path: a PostgreSQL cluster and an MLflow tracking server.

For development, tests and single-node runs; on a cluster point `--storage` and
`MLFLOW_TRACKING_URI` at managed servers instead. These are the stock engines, started with
their own tools (initdb, pg_ctl, `mlflow server`), not re-implementations.

Credentials never appear in a URL or on a command line: the cluster's password lives in a
libpq password file (`services/pgpass`, mode 600), which every client here reads through
`PGPASSFILE`; URLs name only the user. PostgreSQL refuses to run as root, so as root the cluster
runs as the `postgres` system user (the Debian package creates it).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline import paths
from pipeline.errors import PipelineError

PG_USER = "vae"
PG_DATABASES = ("optuna", "mlflow")
DEFAULT_PG_PORT = 5433  # not 5432: leaves a system cluster alone
DEFAULT_MLFLOW_PORT = 5000


class ServiceError(PipelineError, RuntimeError):
    """A local server cannot be started or reached; the message says what to check."""


def services_dir() -> Path:
    return paths.home() / "services"


def pgpass_path() -> Path:
    return services_dir() / "pgpass"


def use_pgpass() -> None:
    """Point libpq at the project's password file unless the user chose one."""
    if "PGPASSFILE" not in os.environ and pgpass_path().exists():
        os.environ["PGPASSFILE"] = str(pgpass_path())


# --- PostgreSQL ----------------------------------------------------------------------------------
def pg_bindir() -> Path:
    """The directory of initdb/pg_ctl: pg_config's answer, else the newest Debian install."""
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    raise ServiceError("PostgreSQL is not installed: on Debian/Ubuntu `apt-get install postgresql` "
                       "(.ci/run does this), or point --storage at an existing server")


@dataclass(frozen=True)
class Postgres:
    root: Path  # data/, run/ (socket), log
    port: int
    run_as: str | None  # the system user the server runs as when we are root

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str) -> str:
        """An SQLAlchemy URL without the password (libpq takes it from PGPASSFILE)."""
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"


def _pg_root_for(run_as: str | None) -> Path:
    """services/postgres, unless the server's user cannot reach it (root's private temp dirs):
    then a directory of its own under /var/tmp, named after this project home."""
    root = services_dir() / "postgres"
    if run_as is None:
        return root
    root.mkdir(parents=True, exist_ok=True)
    shutil.chown(root, run_as)
    if subprocess.run(["runuser", "-u", run_as, "--", "test", "-w", str(root)]).returncode == 0:
        return root
    tag = hashlib.sha256(str(paths.home()).encode()).hexdigest()[:10]
    return Path("/var/tmp") / f"vae-pipeline-postgres-{tag}"


def postgres(port: int | None = None) -> Postgres:
    run_as = "postgres" if os.geteuid() == 0 else None
    port = port or int(os.environ.get("VAE_PG_PORT", DEFAULT_PG_PORT))
    return Postgres(_pg_root_for(run_as), port, run_as)


def _as_server_user(pg: Postgres, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    if pg.run_as:
        cmd = ["runuser", "-u", pg.run_as, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _pg_ready(pg: Postgres) -> bool:
    return subprocess.run([str(pg_bindir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(pg.port), "-q"]).returncode == 0


def start_postgres(port: int | None = None, log=print) -> Postgres:
    """Create (once) and start the project's cluster on 127.0.0.1:port with databases optuna and mlflow."""
    pg = postgres(port)
    bindir = pg_bindir()
    services_dir().mkdir(parents=True, exist_ok=True)
    if not (pg.data / "PG_VERSION").exists():
        password = secrets.token_urlsafe(24)
        pg.root.mkdir(parents=True, exist_ok=True)
        pwfile = pg.root / "initdb.pw"
        pwfile.write_text(password + "\n")
        if pg.run_as:
            shutil.chown(pg.root, pg.run_as)
            shutil.chown(pwfile, pg.run_as)
        pwfile.chmod(0o600)
        out = _as_server_user(pg, [str(bindir / "initdb"), "-D", str(pg.data), "-U", PG_USER, "--pwfile", str(pwfile),
                                   "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"])
        pwfile.unlink(missing_ok=True)
        if out.returncode != 0:
            raise ServiceError(f"initdb failed in {pg.data}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        _write_pgpass(pg, password)
        log(f"[postgres] new cluster in {pg.data} (user {PG_USER}; password in {pgpass_path()}, mode 600)")
    if not pgpass_path().exists():
        raise ServiceError(f"{pgpass_path()} is missing, so the password of the cluster in {pg.data} is unknown; "
                           "`make postgres-stop`, delete that directory and run make postgres again")
    if _pg_ready(pg):
        log(f"[postgres] already running on 127.0.0.1:{pg.port}")
    else:
        pg.socket_dir.mkdir(parents=True, exist_ok=True)
        if pg.run_as:
            shutil.chown(pg.socket_dir, pg.run_as)
        opts = f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {pg.socket_dir}"
        # The log lives next to the data, where the server's user can write.
        out = _as_server_user(pg, [str(bindir / "pg_ctl"), "-D", str(pg.data), "-l", str(pg.log), "-o", opts,
                                   "-w", "-t", "60", "start"])
        if out.returncode != 0:
            tail = pg.log.read_text()[-2000:] if pg.log.exists() else ""
            raise ServiceError(f"PostgreSQL did not start on 127.0.0.1:{pg.port} (is the port taken? VAE_PG_PORT "
                               f"chooses another):\n{out.stderr[-1000:]}{tail}")
        log(f"[postgres] started on 127.0.0.1:{pg.port} (data {pg.data}, log {pg.log})")
    _create_databases(pg)
    return pg


def _write_pgpass(pg: Postgres, password: str) -> None:
    path = pgpass_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for host in ("127.0.0.1", "localhost"):  # any port: the cluster may be restarted on another
            f.write(f"{host}:*:*:{PG_USER}:{password}\n")


def _create_databases(pg: Postgres) -> None:
    import psycopg

    passfile = os.environ.get("PGPASSFILE") or str(pgpass_path())
    try:
        with psycopg.connect(host="127.0.0.1", port=pg.port, user=PG_USER, dbname="postgres", autocommit=True,
                             connect_timeout=10, passfile=passfile) as conn:
            have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            for db in PG_DATABASES:
                if db not in have:
                    conn.execute(f'CREATE DATABASE "{db}"')
    except psycopg.Error as e:
        raise ServiceError(f"cannot create the databases on 127.0.0.1:{pg.port} as {PG_USER}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}\n"
                           f"  is another PostgreSQL on that port? VAE_PG_PORT chooses another") from None


def stop_postgres(port: int | None = None, log=print) -> None:
    pg = postgres(port)
    if not (pg.data / "postmaster.pid").exists():
        log("[postgres] not running")
        return
    out = _as_server_user(pg, [str(pg_bindir() / "pg_ctl"), "-D", str(pg.data), "-m", "fast", "-w", "stop"])
    if out.returncode != 0:
        raise ServiceError(f"pg_ctl stop failed: {out.stderr[-1000:]}")
    log(f"[postgres] stopped (data kept in {pg.data})")


# --- MLflow tracking server ----------------------------------------------------------------------
def _server_pidfile() -> Path:
    return services_dir() / "mlflow-server.pid"


def server_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(port: int | None = None, host: str = "127.0.0.1", pg_port: int | None = None, log=print,
                 wait_s: float = 120) -> str:
    """An MLflow tracking server on host:port, PostgreSQL backend store, artifacts proxied to
    `services/mlflow-artifacts` (or $MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://bucket/prefix with
    the usual AWS_* / MLFLOW_S3_ENDPOINT_URL variables). Returns the tracking URI."""
    port = port or int(os.environ.get("VAE_MLFLOW_PORT", DEFAULT_MLFLOW_PORT))
    url = server_url(port)
    if _healthy(url):
        if _our_server_pid() is None:
            raise ServiceError(f"something else already answers on {url} (make ui?); stop it, or choose another "
                               "port with VAE_MLFLOW_PORT")
        log(f"[server] already running: {url}")
        return url
    pg = postgres(pg_port)
    if not _pg_ready(pg):
        raise ServiceError(f"PostgreSQL is not running on 127.0.0.1:{pg.port}: run make postgres first")
    artifacts = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or str(services_dir() / "mlflow-artifacts")
    log_path = services_dir() / "mlflow-server.log"
    env = dict(os.environ)
    env.setdefault("PGPASSFILE", str(pgpass_path()))
    env.pop("MLFLOW_TRACKING_URI", None)
    # MLflow's job runner (GenAI scorers, prompt optimization: nothing this pipeline uses) starts seven
    # processes that keep two cores busy for ~20 s after the server reports healthy, right when workers
    # start logging (bench/RESULTS.md, "Tracking server").
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", pg.url("mlflow"),
           "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", "2"]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    _server_pidfile().write_text(str(proc.pid))
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if _healthy(url):
            log(f"[server] MLflow tracking server on {url} (backend {pg.url('mlflow')}, artifacts {artifacts}, "
                f"log {log_path}); workers use MLFLOW_TRACKING_URI={url}")
            return url
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-3000:]
    stop_server(log=lambda *_: None)
    raise ServiceError(f"the MLflow server did not come up on {url} (port taken? VAE_MLFLOW_PORT chooses "
                       f"another); its log {log_path} ends:\n{tail}")


def _our_server_pid() -> int | None:
    """The pid in our pid file if that process is still our `mlflow server` (pids get reused)."""
    try:
        pid = int(_server_pidfile().read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"mlflow" in cmdline and b"server" in cmdline else None


def stop_server(log=print) -> None:
    pidfile = _server_pidfile()
    pid = _our_server_pid()
    if pid is None:
        pidfile.unlink(missing_ok=True)
        log("[server] not running")
        return
    try:
        os.killpg(pid, signal.SIGTERM)  # the server and its uvicorn/gunicorn workers
        for _ in range(100):
            try:
                os.waitpid(pid, os.WNOHANG)  # when we started it: reap it, or a zombie looks alive
            except ChildProcessError:
                pass
            os.killpg(pid, 0)
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pidfile.unlink(missing_ok=True)
    log("[server] stopped")
