"""A real PostgreSQL server (Debian's package) on loopback, for the tests of the storage that
runs on it: a throwaway cluster made by `initdb` in its work directory and run by `pg_ctl`,
never the system's service. Real because SQL dialect, locking and transactions are what
the tests are about; durability is turned off (fsync, synchronous commit) for speed,
unless `durable` (the benchmarks)."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["Postgres", "postgres_binaries"]

_SERVER = ("initdb", "pg_ctl", "postgres")


def postgres_binaries() -> Path | None:
    """The directory holding `initdb`, `pg_ctl` and `postgres`: the one `initdb` on PATH
    resolves to, else /usr/lib/postgresql/<version>/bin, newest version first."""
    candidates = []
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).resolve().parent)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: _version(p.parent.name), reverse=True)
    return next((d for d in candidates if all((d / b).is_file() for b in _SERVER)), None)


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


class Postgres:
    """A cluster in `workdir/data` listening on 127.0.0.1:`port` (and a socket in
    `workdir/sock`), user `postgres` with trust authentication. As root, PostgreSQL refuses
    to run, so the cluster is owned and run by the `postgres` user (via `runuser`)."""

    def __init__(self, workdir: Path, port: int, *, durable: bool = False):
        """`durable`: fsync and synchronous commits as in production (the benchmarks);
        off by default, for the tests' speed."""
        self.workdir = Path(workdir).resolve()
        self.port = port
        self.durable = durable
        self.data = self.workdir / "data"
        self.bindir = postgres_binaries()
        self._as_root = os.geteuid() == 0
        # PG* variables of the caller (PGHOST, PGUSER, ...) must not redirect the clients.
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def binary(self, name: str) -> str:
        """A PostgreSQL program (`psql`, `createdb`, ...) of the same version as the server."""
        if self.bindir and (self.bindir / name).is_file():
            return str(self.bindir / name)
        if found := shutil.which(name):
            return found
        raise RuntimeError(f"{name} not found (Debian: apt-get install postgresql)")

    def url(self, name: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, *argv: str, server: bool = False) -> subprocess.CompletedProcess[str]:
        """Runs a program; `server` ones (initdb, pg_ctl) as the postgres user when root."""
        command = list(argv)
        if server and self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, cwd=self.workdir, env=self._env, capture_output=True, text=True, timeout=120
        )

    def _prepare_as_root(self) -> None:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root needs a postgres user (Debian's package)") from None
        for path in (self.workdir, self.workdir / "sock"):
            os.chown(path, user.pw_uid, user.pw_gid)
        # The postgres user must be able to reach the work directory: pytest's are 0700.
        for parent in self.workdir.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)

    def _initdb(self) -> None:
        initdb = [self.binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust"]
        initdb += ["-E", "UTF8"]
        done = self._run(*initdb, "--locale=C.UTF-8", server=True)
        if done.returncode != 0 and "locale" in done.stdout + done.stderr:
            shutil.rmtree(self.data, ignore_errors=True)  # C.UTF-8 is missing: no locale
            done = self._run(*initdb, "--no-locale", server=True)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}{done.stderr}"[-3000:])

    def start(self, timeout: float = 60) -> Postgres:
        if self.bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        (self.workdir / "sock").mkdir(parents=True, exist_ok=True)
        if self._as_root:
            self._prepare_as_root()
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        options = [
            *("-k", str(self.workdir / "sock"), "-p", str(self.port)),
            *("-c", "listen_addresses=127.0.0.1"),
            # A database per test, each with its writer and a pool of readers.
            *("-c", "max_connections=400"),
        ]
        if not self.durable:
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            options += ["-c", "full_page_writes=off"]
        done = self._run(
            self.binary("pg_ctl"),
            *("-D", str(self.data), "-o", shlex.join(options)),
            *("-l", str(self.workdir / "postgres.log"), "-w", "-t", str(int(timeout)), "start"),
            server=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start:\n{done.stdout}{done.stderr}{self.log()}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"PostgreSQL is not listening on 127.0.0.1:{self.port}:\n{self.log()}")

    def create_database(self, name: str, *, c_locale: bool = False) -> str:
        """A new database; `c_locale`: collation and ctype C, from template0, as Synapse
        requires of its database."""
        locale = ["-E", "UTF8", "--locale=C", "-T", "template0"] if c_locale else []
        done = self._run(
            self.binary("createdb"),
            *("-h", "127.0.0.1", "-p", str(self.port)),
            "-U",
            "postgres",
            *locale,
            name,
        )
        if done.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {done.stderr.strip()}")
        return self.url(name)

    def log(self) -> str:
        path = self.workdir / "postgres.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        """Stops the server at once (no checkpoint: the data is thrown away); a no-op when
        it is not running."""
        if self.bindir is None or not (self.data / "postmaster.pid").exists():
            return
        self._run(
            self.binary("pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            "immediate",
            "-w",
            "stop",
            server=True,
        )
        # pg_ctl waits for the postmaster; its children, sent SIGQUIT, may take a moment
        # longer on a loaded machine. Stopped means gone.
        deadline = time.monotonic() + 15
        while processes_in(self.data) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def processes_in(directory: Path) -> list[int]:
    """The processes whose working directory is `directory`: a postmaster and its children
    (whose command lines no longer name the data directory) all run in it."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "cwd")) == directory:
                    found.append(int(proc.name))
            except OSError:
                continue  # gone, or not ours to see
    return found
