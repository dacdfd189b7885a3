"""Entry point of `pdelta`: builds the Typer app and turns known errors into one line plus a hint.

Command modules import torch and transformers inside their functions, so `pdelta --help`
stays well under a second.
"""

from __future__ import annotations

import os
import sys

import typer

from ..plugins import register_cli as register_plugin_cli
from . import apply as apply_cmds
from . import eval as eval_cmds
from . import evallength as evallength_cmds
from . import hub as hub_cmds
from . import inspect as inspect_cmds
from . import plugins as plugin_cmds
from . import run as run_cmds
from . import train as train_cmds

app = typer.Typer(
    name="pdelta",
    help="ParamΔ weight arithmetic: Θ_out = Θ'_base + Σ α·(Θ_post − Θ_base), streamed over safetensors checkpoints.\n\n"
         "Example: pdelta apply --post ORG/Instruct --base ORG/Base --new-base ORG/Base-v2 --out merged/",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
apply_cmds.register(app)
eval_cmds.register(app)
evallength_cmds.register(app)
hub_cmds.register(app)
inspect_cmds.register(app)
plugin_cmds.register(app)
run_cmds.register(app)
train_cmds.register(app)
register_plugin_cli(app)  # plugin command groups (entry-point group paramdelta.cli), after the core ones


def main() -> None:
    """Run the app; a PdeltaError becomes `error: ...` on stderr and exit code 2 (traceback with PDELTA_DEBUG=1)."""
    from ..errors import PdeltaError

    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code instead of raising here
        sys.exit(code if isinstance(code, int) else 0)
    except PdeltaError as e:
        if os.environ.get("PDELTA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted; nothing was written at the target", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and friends
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
