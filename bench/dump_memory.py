"""What `pbkv dump FILE` holds and takes: the client's peak resident size and its
time, for this checkout's CLI and, with ``--checkout``, another checkout's, dumping
the same standalone primary in alternating rounds.

The primary is loaded first with ``--keys`` pairs (bench/bulk.py's data set: 16-byte
keys, 100-byte values) by `pbkv load`. Each round runs one CLI's `pbkv dump FILE`
from its checkout's folder (``python -m`` imports the package found there) and
reads the child's own rusage (``os.wait4``): peak RSS and wall time. The report also
says whether every CLI wrote the same bytes.

    python -m bench.dump_memory --keys 1000000
    python -m bench.dump_memory --keys 1000000 --checkout ../before --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import servers
from bench.bulk import key_of, value_of
from pbkv.bulk import json_line

REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.dump_memory", description=__doc__)
    ap.add_argument("--keys", type=int, default=1_000_000, help="pairs (default 1,000,000)")
    ap.add_argument("--rounds", type=int, default=2, help="dumps per CLI (default 2)")
    ap.add_argument("--checkout", type=Path, help="another checkout's CLI, measured beside")
    return ap


def _digest(path: Path) -> str:
    """A file's SHA-256, read a block at a time: a child's peak RSS counts what it
    shared with this process when it was forked, so this one stays small."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def run_measured(command: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``command``; its peak RSS (MiB) and wall seconds, from its own rusage."""
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{command} exited {child.returncode}")
    return usage.ru_maxrss / 1024, seconds  # Linux: kilobytes


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    checkouts = {"this": REPO}
    if args.checkout is not None:
        checkouts["other"] = args.checkout.resolve()
    with tempfile.TemporaryDirectory(prefix="pbkv-dump-") as tmp:
        workdir = Path(tmp)
        source = workdir / "pairs.jsonl"
        with source.open("wb") as out:
            for i in range(args.keys):
                out.write(json_line(key_of(i), value_of(i)))
        pair = servers.Pbkv(workdir, "dump", standalone=True)
        pair.start_all()
        try:
            host, port = pair.address["primary"]
            cli = ["-m", "pbkv", "--host", host, "--port", str(port), "--timeout", "120"]
            subprocess.run([sys.executable, *cli, "load", str(source)], cwd=REPO, check=True)
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in checkouts}
            digests: dict[str, set[str]] = {name: set() for name in checkouts}
            for round_ in range(args.rounds):
                order = list(checkouts) if round_ % 2 == 0 else list(checkouts)[::-1]
                for name in order:
                    target = workdir / f"dump-{name}.jsonl"
                    command = [sys.executable, *cli, "dump", str(target)]
                    results[name].append(run_measured(command, checkouts[name]))
                    digests[name].add(_digest(target))
                    target.unlink()
        finally:
            pair.stop("primary")
    print(f"pbkv dump of {args.keys:,} pairs to a file, {args.rounds} round(s) per CLI")
    for name, rounds in results.items():
        rss = " ".join(f"{mib:.0f}" for mib, _ in rounds)
        seconds = " ".join(f"{s:.2f}" for _, s in rounds)
        print(f"  {name:<6} {str(checkouts[name]):<40} peak RSS MiB {rss}  seconds {seconds}")
    same = len(set().union(*digests.values())) == 1
    print(f"  every dump wrote the same bytes: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
