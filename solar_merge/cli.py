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

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
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


@main.command()
@click.argument("model")
@click.option("--drop", "-m", type=int, required=True,
              help="Layers m dropped at the seam of each copy (SOLAR: 8 of 32).")
@click.option("-o", "--output", "config_out", type=click.Path(dir_okay=False),
              help="Write the mergekit config here (default: print it).")
@click.option("--run", "run_out", type=click.Path(file_okay=False),
              help="Also run the merge into this folder.")
def dus(model, drop, config_out, run_out):
    """Depth up-scale MODEL: a mergekit passthrough config with 2(n-m) layers."""
    from pathlib import Path

    from solar_merge.checkpoints import model_info
    from solar_merge.upscale import describe, dus_yaml, upscale

    info = model_info(model)
    text = dus_yaml(info.source, drop, info, out_name=Path(config_out or "dus.yaml").name)
    click.echo(describe(model, drop, info), err=True)
    if config_out:
        Path(config_out).write_text(text)
        click.echo(f"wrote {config_out}", err=True)
    elif not run_out:
        click.echo(text)
    if run_out:
        click.echo(f"up-scaled model in {upscale(model, drop, run_out)}", err=True)


@main.command()
@click.argument("model")
@click.option("--every", type=int, required=True,
              help="Insert one zero-output block after every N layers (LLaMA Pro: 4).")
@click.option("-o", "--output", "config_out", type=click.Path(dir_okay=False),
              help="Write the mergekit config here (default: print it).")
@click.option("--run", "run_out", type=click.Path(file_okay=False),
              help="Also run the merge into this folder.")
def expand(model, every, config_out, run_out):
    """LLaMA Pro block expansion of MODEL: new blocks that compute the identity until trained."""
    from pathlib import Path

    import yaml as pyyaml

    from solar_merge.checkpoints import model_info
    from solar_merge.upscale import expand as run_expand
    from solar_merge.upscale import expand_config, new_block_layers

    info = model_info(model)
    n = info.n_layers
    config = expand_config(info.source, every, n_layers=n, dtype=info.dtype)
    s = n + n // every
    text = (f"# mergekit-yaml {Path(config_out or 'expand.yaml').name} OUT --copy-tokenizer "
            f"--clone-tensors\n# LLaMA Pro block expansion of {model}: {n} -> {s} layers; new "
            f"blocks (o_proj, down_proj zeroed) at {new_block_layers(n, every)}\n"
            + pyyaml.safe_dump(config, sort_keys=False, default_flow_style=None))
    click.echo(f"{model}: {n} -> {s} layers; train the new blocks "
               f"{new_block_layers(n, every)} (e.g. cpt trainable_layers)", err=True)
    if config_out:
        Path(config_out).write_text(text)
    elif not run_out:
        click.echo(text)
    if run_out:
        click.echo(f"expanded model in {run_expand(model, every, run_out)}", err=True)


_FORWARD = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@main.command(context_settings=_FORWARD, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def yaml(ctx, args):
    """Run a mergekit YAML config with our methods and fixes (takes every mergekit-yaml option)."""
    from solar_merge.merging import yaml_command

    yaml_command().main(list(args), prog_name=ctx.command_path, standalone_mode=False)


@main.command(context_settings=_FORWARD, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def multi(ctx, args):
    """mergekit-multi with our methods registered, strict keys and absolute paths."""
    from solar_merge.merging import multi_command

    multi_command().main(list(args), prog_name=ctx.command_path, standalone_mode=False)


# -- commands are added below, one function each; keep them thin --


if __name__ == "__main__":
    sys.exit(main())
