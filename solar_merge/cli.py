"""The `solar-merge` command: thin click commands that parse, call one function, print.

Heavy libraries (torch, mergekit, trl) are imported inside commands, never at module level,
so that `--help`, `validate` and `dus -o` stay instant.
"""

import sys

import click

from solar_merge.errors import UserError


class _Group(click.Group):
    """Turns a user mistake into exit code 2 and one clear message; --debug shows the trace."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - last line of defence, see below
            if ctx.obj and ctx.obj.get("debug"):
                raise
            error = _as_user_error(e)
            if error is None:
                raise
            raise error from None


def _as_user_error(e: Exception) -> UserError | None:
    """Errors raised by libraries on bad input, phrased for the user."""
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return UserError(f"the disk is full while writing {e.filename or 'output'}",
                         fix="free space or choose another output folder, then re-run "
                             "(finished stages are kept)")
    if isinstance(e, (PermissionError,)):
        return UserError(f"permission denied: {e.filename}",
                         fix="choose a writable folder or fix its permissions")
    return None


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="solar-merge")
@click.pass_context
def main(ctx, debug):
    """SOLAR-style depth up-scaling, training and merging on mergekit + TRL."""
    ctx.obj = {"debug": debug}


# -- commands are added below, one function each; keep them thin --


if __name__ == "__main__":
    sys.exit(main())
