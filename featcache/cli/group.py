"""The ``featcache`` click group: known errors as one line and an exit code, a nearest-name answer for an unknown
command, how each long command continues after Ctrl-C, and the ``--config`` file's sections."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from featcache import __version__
from featcache.config import load_yaml
from featcache.errors import ConfigError, FeatcacheError, one_line
from featcache.registry import nearest

logger = logging.getLogger(__name__)

#: commands of later versions: a clear answer instead of "No such command"
PLANNED: dict[str, str] = {}


#: commands without a stage config: their --config keys are checked against their options
_CONFIGLESS = ("info", "verify", "backbones", "profile", "export")


class FeatcacheGroup(click.Group):
    """Known errors end with one message and an exit code (2 usage, 1 failure); ``--debug`` shows the traceback."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            if name in PLANNED:
                raise click.UsageError(f"`featcache {name}` ({PLANNED[name]}) is not in featcache {__version__} yet; "
                                       f"available commands: {', '.join(self.list_commands(ctx))}")
            raise click.UsageError(f"no command {name!r}{nearest(name, self.list_commands(ctx))}; "
                                   f"available commands: {', '.join(self.list_commands(ctx))}")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FeatcacheError as exc:
            if ctx.meta.get("featcache.debug"):
                raise
            click.echo(f"Error: {one_line(exc)}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # a file the system refused (permissions, a full disk): name it, no traceback
            if ctx.meta.get("featcache.debug") or not exc.filename:
                raise
            click.echo(f"Error: {exc.filename}: {exc.strerror or exc} (errno {exc.errno})", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say how to go on, then click's "Aborted!"
            if ctx.invoked_subcommand in CONTINUE:
                click.echo(f"Stopped: {CONTINUE[ctx.invoked_subcommand]}", err=True)
            raise


#: how each long command continues after Ctrl-C (or SIGTERM): what is done stays done
CONTINUE = {
    "extract": "the images written so far are kept; rerun the same command to extract the rest.",
    "embed": "the images written so far are kept; rerun the same command to embed the rest.",
    "train-gate": "rerun the same command with --resume to continue from the last finished epoch.",
    "distill": "rerun the same command with --resume to continue from the last finished epoch.",
    "pretrain-standins": "rerun the same command: stand-ins already trained are kept, and the stopped one starts again.",
    "run": "rerun the same command: finished stages are skipped, and a stopped one resumes.",
    "demo": "rerun the same command: finished stages are skipped, and a stopped one resumes.",
}


@click.group(cls=FeatcacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featcache")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML with a section per command (extract:, eval:, train-gate:, ...); the command line overrides it.")
@click.option("-v", "--verbose", count=True, help="-v: progress logs (INFO); -vv: debug.")
@click.option("--debug", is_flag=True, help="Show the traceback of errors instead of their one-line message.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbose: int, debug: bool) -> None:
    """featcache: run foundation backbones once, cache their features, train and evaluate re-ID from the cache.

    Exit codes: 0 success; 2 a usage or configuration error (bad option, key or value); 1 a failure (missing or
    mismatched inputs, errors while running).
    """
    from featcache.progress import setup_logging

    setup_logging(verbose)
    ctx.meta["featcache.debug"] = debug
    if config is not None:
        data = load_yaml(config)
        for name, section in data.items():
            if name not in main.commands:
                raise ConfigError(f"--config {config}: unknown section {name!r}{nearest(name, main.commands)}; "
                                  f"sections are command names: {', '.join(sorted(main.commands))}")
            params = {p.name: p for p in main.commands[name].params if p.name}
            for key, value in list(section.items()):
                if key not in params and name in _CONFIGLESS:
                    raise ConfigError(f"--config {config} [{name}]: unknown key {key!r}{nearest(key, params)}; "
                                      f"valid keys: {', '.join(params)}")
                if key in params and getattr(params[key], "multiple", False) and not isinstance(value, (list, tuple)):
                    section[key] = [value]  # `backbones: clip-tiny` means a list of one
        ctx.default_map = data
