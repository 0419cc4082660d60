"""A throwaway PostgreSQL server on loopback, for tests and single-host demos of the shared registry.

    with LocalPostgres.start() as pg:        # initdb into a temp dir, pg_ctl start on a free port
        uri = pg.create_database("t1")       # postgresql://memguard@127.0.0.1:PORT/t1

It uses the PostgreSQL server binaries of Debian's `postgresql` package (/usr/lib/postgresql/*/bin,
or initdb on PATH; `scripts/pg.sh` installs them). PostgreSQL refuses to run as root, so as root
the cluster belongs to a system user `memguard-pg`, created if missing. Authentication is `trust`
on 127.0.0.1 only: a test fixture, not a deployment.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memguard.errors import MissingResource

PG_USER = "memguard-pg"
DB_USER = "memguard"


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres (the newest Debian version first)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(os.path.realpath(on_path)).parent))
    for c in candidates:
        if all((Path(c) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    raise MissingResource("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
                          "/usr/lib/postgresql/*/bin or on PATH: run `bash scripts/pg.sh` "
                          "(apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> dict:
    """subprocess kwargs that run a command as the cluster's owner (root: memguard-pg)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
    entry = pwd.getpwnam(PG_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@dataclass
class LocalPostgres:
    root: Path
    port: int
    bindir: Path
    version: str

    @property
    def data(self) -> Path:
        return self.root / "data"

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls, root: Path | None = None) -> "LocalPostgres":
        bindir = find_bindir()
        root = Path(root or tempfile.mkdtemp(prefix="memguard-pg-"))
        as_owner = _run_as()
        if as_owner:
            os.chown(root, as_owner["user"], as_owner["group"])
        env = {"PATH": f"{bindir}:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        subprocess.run([str(bindir / "initdb"), "-D", str(root / "data"), "-U", DB_USER, "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, env=env, cwd=root, **as_owner)
        version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                                 env=env).stdout.strip()
        pg = cls(root, _free_port(), bindir, version)
        with open(pg.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {pg.port}\nunix_socket_directories = '{root}'\n"
                       "max_connections = 200\nshared_buffers = 32MB\n")
        pg.restart()
        return pg

    def pg_ctl(self, *args: str) -> None:
        env = {"PATH": f"{self.bindir}:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
        done = subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.data), *args], capture_output=True,
                              text=True, env=env, cwd=self.root, **_run_as())
        if done.returncode != 0:
            log = (self.root / "server.log").read_text()[-2000:] if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl {args[0]} failed: {done.stdout}{done.stderr}{log}")

    def restart(self) -> None:
        self.pg_ctl("start", "-w", "-t", "60", "-l", str(self.root / "server.log"))

    def kill(self) -> None:
        """Stop at once, as a crash would (no shutdown checkpoint)."""
        self.pg_ctl("stop", "-m", "immediate", "-w")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.uri(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.pg_ctl("stop", "-m", "immediate", "-w")   # throwaway data: no shutdown checkpoint
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalPostgres":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
