"""The ``ckptmgr`` command line.

This module only wires command groups and holds the one error boundary:
known errors become one line on stderr and a distinct exit code; unknown
exceptions propagate (a traceback means a bug).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import CkptMgrError, UsageError, from_os_error
from . import diag_commands, export_command, store_commands
from .output import Output

EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        raise UsageError(None, message, hint=f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser = _Parser(prog="ckptmgr", description="Atomic, checksummed checkpoints: verify, inspect, resolve, seal.",
                     epilog="Exit codes: 0 ok, 1 invalid/none valid, 2 usage or not found, 3 not a checkpoint "
                            "or run directory, 4 permission denied, 5 run locked by another writer, 6 save failed, "
                            "7 config mismatch, 8 storage error, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"ckptmgr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    store_commands.add_parsers(sub, common)
    export_command.add_parser(sub, common)
    diag_commands.add_parsers(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    as_json = "--json" in (argv if argv is not None else sys.argv[1:])
    out = Output(as_json=as_json)
    try:
        args = build_parser().parse_args(argv)
        out = Output(as_json=args.json)
        return args.func(args, out)
    except CkptMgrError as exc:
        _report(out, exc)
        return exc.exit_code
    except OSError as exc:  # an OS error that no layer converted: still one line
        converted = from_os_error(exc.filename or "?", "access", exc)
        _report(out, converted)
        return converted.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("ckptmgr: interrupted\n")
        return EXIT_INTERRUPTED


def _report(out: Output, exc: CkptMgrError) -> None:
    if out.as_json:
        import json

        sys.stdout.write(json.dumps({"error": {"type": type(exc).__name__, "path": exc.path,
                                               "message": exc.message, "hint": exc.hint}}) + "\n")
    sys.stderr.write(f"ckptmgr: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
