"""What every ``sertune`` command shares: the help layout, the common options and how a search's
result is printed. The command modules import this, never their package."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines; every option with a default shows it (once)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or action.option_strings == []
        ):
            return text
        return f"{text} (default: {default})"


def command(sub, name: str, help: str, example: str, parents=(), **kw) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows what it does, an example and every default."""
    return sub.add_parser(
        name,
        help=help,
        description=help[:1].upper() + help[1:] + ".",
        epilog="example:\n" + "\n".join(f"  {line}" for line in example.strip().splitlines()),
        formatter_class=HelpFormatter,
        parents=[common(), *parents],
        **kw,
    )


def common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of a failure",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show Ray's and MLflow's own output too",
    )
    return p


def tracking_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///$SERTUNE_HOME/mlflow.db)",
    )
    return p


def print_result(result) -> None:
    """The leaderboard of a finished search, with where to look next."""
    from .. import settings
    from ..leaderboard import format_result

    print(format_result(result, settings.tracking_uri()))
