#!/usr/bin/env python
"""Run a sweep: what `ray submit deploy/cluster.yaml sweep.py -- ARGS` runs on the head node.

    python sweep.py --space search_spaces/demo.yaml                  # local Ray on 127.0.0.1
    ray submit deploy/cluster.yaml sweep.py -- --space search_spaces/moca_fastgan.yaml --data s3://bucket/obama

On a cluster node it joins the running cluster; elsewhere it starts a local Ray bound to loopback.
Same behaviour as `sweeper run`: re-running resumes the sweep, --restart starts afresh.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--data", default=None, help="override data.path (a folder or s3://bucket/prefix)")
    p.add_argument("--storage", default=None, help="override storage (a folder or s3://bucket/prefix)")
    p.add_argument("--tracking", default=None, help="override sweep.tracking (an MLflow tracking URI)")
    p.add_argument("--restart", action="store_true", help="discard an existing sweep of this name")
    p.add_argument("--address", default=None, help="Ray address (default: the running cluster, else local)")
    a = p.parse_args(argv)
    args = ["run", a.space]
    if a.restart:
        args.append("--restart")
    if a.address:
        args += ["--address", a.address]
    for flag, val in (("--data", a.data), ("--storage", a.storage), ("--tracking", a.tracking)):
        if val:
            args += [flag, val]
    from sweeper.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
