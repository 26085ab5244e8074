"""A throwaway team registry: PostgreSQL + `mlflow server` with proxied artifacts, on loopback.

    python scripts/team_server.py start DIR   # prints {"tracking_uri": ..., ...}; writes DIR/team.json
    python scripts/team_server.py stop DIR    # stops both, keeps DIR (add --remove to delete it)

DIR gets a fresh PostgreSQL cluster (`DIR/pg`, superuser `lmctl` with a random password,
listening on 127.0.0.1 only) and the artifact store (`DIR/artifacts`) that the MLflow
server proxies, so clients upload and download artifacts over HTTP and never need the
server's filesystem: the same layout a team runs, minus TLS and auth in front of it.
It is what CI and `tests/test_team_server.py` use; docs/registry.md "Team registry" shows the
long-lived set-up. PostgreSQL refuses to run as root, so as root the cluster runs as the
`postgres` user (created by the Debian package) or a system user created here.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from http_wait import ServerNotUp, free_port, wait_for_http

PG_USER_FALLBACK = "lmctl-pg"
DB_NAME = "mlflow"
DB_USER = "lmctl"
START_TIMEOUT_S = 120.0


class TeamServerError(RuntimeError):
    pass


def pg_bindir() -> Path | None:
    """PostgreSQL's server binaries: Debian's /usr/lib/postgresql/<newest>/bin, else initdb's directory on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


def _pg_user() -> str | None:
    """The unprivileged account that owns the cluster when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", PG_USER_FALLBACK):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER_FALLBACK],
                   check=True)
    return PG_USER_FALLBACK


def _as_pg(user: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise TeamServerError(f"{what} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")


def _start_postgres(root: Path, bindir: Path) -> tuple[int, str]:
    """initdb + pg_ctl start on 127.0.0.1, then create the database; returns (port, password)."""
    user = _pg_user()
    pg = root / "pg"
    pg.mkdir(mode=0o700)
    password = secrets.token_hex(16)
    pwfile = pg / "pwfile"
    pwfile.write_text(password + "\n")
    if user:
        os.chmod(root, 0o755)  # the cluster's owner must reach DIR/pg; DIR itself stays ours
        shutil.chown(pg, user, user)
        shutil.chown(pwfile, user, user)
    # --no-sync and fsync=off: a throwaway cluster trades crash safety for speed (never do this for a real one).
    _run(_as_pg(user, [str(bindir / "initdb"), "-D", str(pg / "data"), "-U", DB_USER, f"--pwfile={pwfile}",
                       "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"]),
         f"initdb (as {user or 'this user'}; every directory above {pg} must be reachable by that user)")
    pwfile.unlink()
    port = free_port()
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={pg} -c fsync=off"
    _run(_as_pg(user, [str(bindir / "pg_ctl"), "-D", str(pg / "data"), "-l", str(pg / "postgres.log"),
                       "-w", "-t", "60", "-o", opts, "start"]), "pg_ctl start")
    _run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME], "createdb",
         env={"PGPASSWORD": password})
    return port, password


def start(root: Path, workers: int = 2) -> dict[str, object]:
    """Start PostgreSQL and the MLflow server under an empty or new DIR; returns (and saves) their coordinates."""
    bindir = pg_bindir()
    if bindir is None:
        raise TeamServerError("PostgreSQL server binaries not found (apt-get install -y postgresql)")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise TeamServerError(f"{root} is not empty; give a new directory")
    info: dict[str, object] = {"pg_bindir": str(bindir)}
    _save(root, info)  # saved first, so stop() can clean up a half-started pair
    try:
        return _start_both(root, bindir, info, workers)
    except BaseException:
        stop(root)
        raise


def _start_both(root: Path, bindir: Path, info: dict[str, object], workers: int) -> dict[str, object]:
    pg_port, password = _start_postgres(root, bindir)
    backend = f"postgresql://{DB_USER}:{password}@127.0.0.1:{pg_port}/{DB_NAME}"
    info.update(pg_port=pg_port, backend_store_uri=backend, artifacts=str(root / "artifacts"))
    _save(root, info)
    port = free_port()
    log = root / "mlflow.log"
    with log.open("wb") as out:
        # Its own session, so stop() can end the server and its workers as one process group.
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            # No job runner: it serves GenAI features lmctl never uses and costs ~1 GB and 7 processes.
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    info.update(mlflow_pid=proc.pid, port=port, tracking_uri=f"http://127.0.0.1:{port}")
    _save(root, info)
    wait_for_http(f"{info['tracking_uri']}/health", START_TIMEOUT_S, proc=proc, log=log)
    return info


def _save(root: Path, info: dict[str, object]) -> None:
    tmp = root / "team.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.chmod(tmp, 0o600)  # it holds the database password
    tmp.replace(root / "team.json")


def _stop_mlflow(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child (the test fixture's case)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def stop(root: Path, remove: bool = False) -> None:
    """Stop the MLflow server, then PostgreSQL; with remove, delete DIR."""
    root = root.resolve()
    info = json.loads((root / "team.json").read_text())
    if "mlflow_pid" in info:
        _stop_mlflow(int(info["mlflow_pid"]))
    data = root / "pg" / "data"
    if (data / "postmaster.pid").exists():
        _run(_as_pg(_pg_user(), [str(Path(info["pg_bindir"]) / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
             "pg_ctl stop")
    if remove:
        shutil.rmtree(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--workers", type=int, default=2, help="MLflow server worker processes (start)")
    parser.add_argument("--remove", action="store_true", help="delete DIR after stopping (stop)")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            info = start(args.dir, workers=args.workers)
            print(json.dumps({k: info[k] for k in ("tracking_uri", "pg_port", "artifacts")}))
        else:
            stop(args.dir, remove=args.remove)
    except (TeamServerError, ServerNotUp) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
