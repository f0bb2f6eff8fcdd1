"""The fake ``kaggle`` command: ``kaggle kernels push -p DIR``, ``kaggle kernels status OWNER/SLUG``,
``kaggle kernels output OWNER/SLUG -p DIR``, with the real command's arguments and messages.

Anything else is refused (exit status 2), so a command added to the docs that this fake cannot play
makes tests/test_docs.py fail instead of passing unseen.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kaggle import server


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaggle")
    groups = parser.add_subparsers(dest="group", required=True)
    kernels = groups.add_parser("kernels", aliases=["k"]).add_subparsers(dest="command", required=True)
    push = kernels.add_parser("push", aliases=["update"])
    push.add_argument("-p", "--path", dest="folder", default=None)
    push.add_argument("-t", "--timeout", type=int)
    push.add_argument("--accelerator", dest="acc")
    push.add_argument("--no-run", dest="no_run", action="store_true")
    status = kernels.add_parser("status")
    status.add_argument("kernel")
    output = kernels.add_parser("output")
    output.add_argument("kernel")
    output.add_argument("-p", "--path", dest="path", default=None)
    output.add_argument("-w", "--wp", dest="path", action="store_const", const=".")
    output.add_argument("-o", "--force", action="store_true")
    output.add_argument("-q", "--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kaggle import api  # authenticates, as the real command does

    if api.authenticated_user is None:
        return 1
    try:
        if args.command in ("push", "update"):
            reply = api.kernels_push(args.folder or os.getcwd(), args.timeout, args.acc, args.no_run)
            if reply.error:
                print("Kernel push error: " + reply.error)
            else:
                print(f"Kernel version {reply.version_number} successfully pushed.  Please check progress at "
                      f"{reply.url}")
        elif args.command == "status":
            server.latest_version(args.kernel)
            print(f'{args.kernel} has status "KernelWorkerStatus.COMPLETE"')
        else:
            dest = Path(args.path or ".")
            dest.mkdir(parents=True, exist_ok=True)
            for path in server.run_output(args.kernel, dest):
                if not args.quiet:
                    print(f"Output file downloaded to {path}")
    except (ValueError, server.NotFound) as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
