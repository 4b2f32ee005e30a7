"""A throwaway PostgreSQL cluster in a temporary directory, on a unix socket (tests and benchmarks).

PostgreSQL refuses to run as root: as root the cluster is created and run as the unprivileged `nobody` user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

# where Debian's postgresql package puts the server binaries (not on PATH)
DEBIAN_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
PORT = 5432  # only names the socket file (no TCP): every cluster has its own directory


class ClusterError(RuntimeError):
    """The cluster could not be created or started (the message holds PostgreSQL's own words)."""


def server_bin_dir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres (PATH first, then Debian's), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    return next((d for d in DEBIAN_BIN_DIRS if (d / "initdb").exists()), None)


class TempCluster:
    """initdb + pg_ctl in a fresh temporary directory; `url(db)` connects over its unix socket as `postgres`."""

    def __init__(self, bin_dir: Path | None = None, settings: dict[str, str] | None = None):
        self.bin_dir = bin_dir or server_bin_dir()
        if self.bin_dir is None:
            raise ClusterError("PostgreSQL server binaries not found (initdb on PATH or under /usr/lib/postgresql)")
        self.dir = Path(tempfile.mkdtemp(prefix="tinyml-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.settings = {"listen_addresses": "''", "unix_socket_directories": "'%s'" % self.dir, "port": str(PORT),
                         "shared_buffers": "32MB", "max_connections": "100", **(settings or {})}
        self._user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.dir, 0o755)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.writelines("%s = %s\n" % kv for kv in self.settings.items())

    def _run(self, tool: str, *args: str) -> None:
        preexec = None
        if self._user is not None:
            uid, gid = self._user.pw_uid, self._user.pw_gid

            def preexec():
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
        p = subprocess.run([str(self.bin_dir / tool), *args], cwd=self.dir, capture_output=True, text=True,
                           preexec_fn=preexec, timeout=120)
        if p.returncode:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise ClusterError("%s %s failed (%d): %s%s" % (tool, " ".join(args), p.returncode,
                                                            (p.stderr or p.stdout).strip(), "\n" + log))

    def start(self) -> "TempCluster":
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode immediate: as a crash, recovered from the WAL at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return "postgresql://postgres@/%s?host=%s&port=%d" % (dbname, self.dir, PORT)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or "kb_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute('CREATE DATABASE "%s"' % name)
        return self.url(name)

    def destroy(self) -> None:
        """Stop the server (if running) and remove the directory."""
        try:
            self.stop("immediate")
        except ClusterError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "TempCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()
