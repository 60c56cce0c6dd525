"""DeepSpeed hostfiles (`host slots=N`), checked before any GPU time is spent.

    # comment
    worker-0 slots=8
    worker-1 slots=8   # trailing comments are fine

The launch scripts run `python -m mosaicbert_ds.train.hostfile --check FILE` first. DeepSpeed's
own parser accepts `slots=0` and stops at the first bad line with the whole file in its message;
this one names the line. `--print vars` gives the scripts what they need in one call (importing
the package takes seconds) without parsing in shell: shell assignments of HOSTFILE_NODES,
HOSTFILE_SLOTS and HOSTFILE_FIRST_HOST (the default MASTER_ADDR); `--print mpich` writes the same
hosts as an MPICH (hydra) machinefile.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from mosaicbert_ds.errors import UserError


def parse_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """Hosts and their slots, in file order. Raises UserError naming the file and line."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read hostfile: {err.strerror or err}") from None
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        tokens = raw.split("#", 1)[0].split()
        if not tokens:
            continue
        where = f"{path}:{number}"
        host, rest = tokens[0], tokens[1:]
        if host.startswith("slots="):
            raise UserError(f"{where}: line starts with slots= but names no host: {raw.strip()!r}")
        if len(rest) != 1 or not rest[0].startswith("slots="):
            raise UserError(f"{where}: expected 'HOST slots=N', got {raw.strip()!r}")
        value = rest[0][len("slots=") :]
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"{where}: slots must be a positive integer, got {value!r} for host {host!r}")
        if host in hosts:
            raise UserError(f"{where}: duplicate host {host!r} (first on line {first_line[host]})")
        hosts[host], first_line[host] = int(value), number
    if not hosts:
        raise UserError(f"{path}: hostfile lists no hosts (only blank lines or comments)")
    return hosts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mosaicbert_ds.train.hostfile", description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE", required=True, help="hostfile to check")
    parser.add_argument(
        "--print",
        dest="what",
        choices=("summary", "vars", "mpich"),
        default="summary",
        help="what to print once the file is good (default: summary)",
    )
    args = parser.parse_args(argv)
    try:
        hosts = parse_hostfile(args.check)
    except UserError as err:
        print(f"hostfile: error: {err}", file=sys.stderr)
        return 2
    if args.what == "vars":
        print(
            f"HOSTFILE_NODES={len(hosts)} HOSTFILE_SLOTS={sum(hosts.values())} "
            f"HOSTFILE_FIRST_HOST={shlex.quote(next(iter(hosts)))}"
        )
    elif args.what == "mpich":  # hydra's machinefile syntax
        print("\n".join(f"{host}:{slots}" for host, slots in hosts.items()))
    else:
        listing = " ".join(f"{host}={slots}" for host, slots in hosts.items())
        print(f"{args.check}: {len(hosts)} hosts, {sum(hosts.values())} slots: {listing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
