"""The ``fedhello`` command. The only place that configures output and turns errors into exits:
a user error is one line on stderr and exit code 2, never a traceback.

``parser`` declares the commands and their flags; ``output`` sets up the process (logging,
offline hub, deterministic mode); the commands live by what they serve: ``federate`` (run,
compare, report: training and its tables), ``preview`` (validate, plan, calibrate, env: what a
config would do, here) and ``deliver`` (export, eval: a finished run as a model).
"""

from __future__ import annotations

import logging
import sys

from fedhello.cli.deliver import cmd_eval, cmd_export
from fedhello.cli.federate import cmd_compare, cmd_report, cmd_run
from fedhello.cli.parser import build_parser
from fedhello.cli.preview import cmd_calibrate, cmd_env, cmd_plan, cmd_validate
from fedhello.core.errors import UserError
from fedhello.environment import apply_offline_env

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_offline_env(allow_download=True)  # the hub variables: once the config is known
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedhello.cli").setLevel(logging.INFO)  # the command's own notes
    try:
        commands = {
            "run": cmd_run, "validate": cmd_validate, "plan": cmd_plan,
            "compare": cmd_compare, "report": cmd_report, "export": cmd_export,
            "env": cmd_env, "calibrate": cmd_calibrate, "eval": cmd_eval,
        }  # fmt: skip
        return commands[args.command](args)
    except UserError as err:
        print(f"fedhello: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedhello: interrupted", file=sys.stderr)
        return 130
