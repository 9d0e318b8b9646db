"""Runs the real shardlogd for the tests: a fresh data directory under the cargo target
directory (not /tmp, which may be tmpfs without O_DIRECT), port 0, the listening address read
from its first stdout line, and a kill when the test ends.

The binary is ``$SHARDLOGD`` if set, else the newer of ``<target>/release/shardlogd`` and
``<target>/debug/shardlogd``, where ``<target>`` is ``$CARGO_TARGET_DIR`` or the repository's
``target/``. scripts/test.sh builds it before running these tests.
"""

import os
import select
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
#: A guard against hanging forever, not a measurement.
STARTUP_GUARD_S = 60.0


def shardlogd_binary() -> Path:
    if os.environ.get("SHARDLOGD"):
        return Path(os.environ["SHARDLOGD"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    found = [p for p in (target / "release" / "shardlogd", target / "debug" / "shardlogd") if p.exists()]
    if not found:
        pytest.fail(
            f"no shardlogd under {target}/{{release,debug}}: run `cargo build -p daemon --bin shardlogd` "
            "or set SHARDLOGD"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")


class Daemon:
    def __init__(self, shards: int, *extra: str):
        tmp_root = target_dir() / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self.data_dir = tempfile.mkdtemp(prefix="python-client-", dir=tmp_root)
        env = {k: v for k, v in os.environ.items() if k != "SHARDLOG_FAULTS"}
        self.proc = subprocess.Popen(
            [
                str(shardlogd_binary()),
                "--listen", "127.0.0.1:0",
                "--pin", "none",
                "--log", "warn",
                "--shards", str(shards),
                "--segment-bytes", str(2 << 20),
                "--data-dir", self.data_dir,
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], STARTUP_GUARD_S)
        line = self.proc.stdout.readline().decode() if ready else ""
        prefix = "shardlogd listening on "
        if not line.startswith(prefix):
            self.stop()
            pytest.fail(f"shardlogd did not print its address within {STARTUP_GUARD_S}s: {line!r}")
        self.addr = line[len(prefix):].strip()
        # Keep draining stdout so the daemon never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def daemon():
    d = Daemon(2)
    yield d
    d.stop()


@pytest.fixture
def daemon_factory():
    started = []

    def start(shards: int = 1, *extra: str) -> Daemon:
        d = Daemon(shards, *extra)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
