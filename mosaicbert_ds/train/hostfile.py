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

`--master-addr ADDR` also checks that the address the ranks will meet at resolves (an empty ADDR:
the hostfile's first host, DeepSpeed's default), so that a name the launcher would hand to every
node as --master_addr fails here with one line naming it, not in torch's rendezvous on every node.
`--resolve-wait S` retries for up to S seconds (a Kubernetes pod's DNS name appears only once the
pod runs: the launch scripts wait on nodes other than node 0). A host with a `:PORT` is refused:
the port goes in MASTER_PORT (checked by launch/env.sh).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import time

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


def check_resolves(host: str, what: str, wait: float = 0.0) -> None:
    """`host` is a name or address that resolves (getaddrinfo, as torch's rendezvous does), retried
    every 2 s for up to `wait` seconds. UserError naming it, as `what` describes it, otherwise."""
    if host.count(":") == 1:
        raise UserError(f"{what} {host!r} includes a port: give the host alone and the port in MASTER_PORT")
    deadline = time.monotonic() + wait
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except (socket.gaierror, UnicodeError) as err:
            if time.monotonic() >= deadline:
                reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
                waited = f" (tried for {wait:.0f} s)" if wait else ""
                raise UserError(f"{what} {host!r} does not resolve: {reason}{waited}") from None
        time.sleep(2)


def check_master(hosts: dict[str, int], path: str | os.PathLike, master_addr: str, wait: float = 0.0) -> None:
    """The master address resolves: `master_addr`, or the hostfile's first host when it is empty."""
    if master_addr:
        check_resolves(master_addr, "MASTER_ADDR", wait)
    else:
        first = next(iter(hosts))
        check_resolves(first, f"{path}: the first host (the master address unless MASTER_ADDR is set)", wait)


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
    parser.add_argument(
        "--master-addr",
        default=None,
        metavar="ADDR",
        help="check that ADDR (empty: the first host) resolves before anything is launched",
    )
    parser.add_argument("--resolve-wait", type=float, default=0.0, metavar="S", help="retry resolving for S seconds")
    args = parser.parse_args(argv)
    try:
        hosts = parse_hostfile(args.check)
        if args.master_addr is not None:
            check_master(hosts, args.check, args.master_addr, args.resolve_wait)
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
