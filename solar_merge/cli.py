"""The `solar-merge` command: thin click commands that parse, call one function, print.

Heavy libraries (torch, mergekit, trl) are imported inside commands, never at module level,
so that `--help`, `validate` and `dus -o` stay instant.
"""

import shlex
import sys

import click

from solar_merge.errors import UserError, described, failing_library


class _Group(click.Group):
    """Turns a user mistake into exit code 2 and one clear message (--debug shows the trace),
    and shows solar-merge's log messages on stderr while a command runs (solar_merge.console)."""

    def parse_args(self, ctx, args):
        ctx.meta["solar_merge.argv"] = list(args)  # what the user typed, for messages
        return super().parse_args(ctx, args)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            return super().main(*args, standalone_mode=standalone_mode, **kwargs)
        except UserError as e:
            if not standalone_mode:
                raise
            click.echo(f"Error: {e.message}", err=True)
            sys.exit(e.exit_code)

    def invoke(self, ctx):
        from solar_merge import console

        console.show()
        try:
            return super().invoke(ctx)
        except UserError:
            if ctx.obj and ctx.obj.get("debug"):  # --debug: where the user error came from
                import traceback

                traceback.print_exc()
            raise
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            error = _as_user_error(e) or _library_failure(e, ctx)
            if error is None:
                raise
            raise error from None
        finally:
            console.hide()


def _library_failure(e: Exception, ctx) -> UserError | None:
    """A failure raised inside a library we call (mergekit, TRL, transformers, safetensors,
    ...): which command, stage and input failed, the library's own words, and --debug.
    A failure of our own code returns None: its traceback stays (a bug to report)."""
    library = getattr(e, "solar_merge_library", None) or failing_library(e)
    if library is None:
        return None
    command = shlex.join(["solar-merge", *ctx.meta.get("solar_merge.argv", [])])
    doing = described(e)
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return UserError(f"`{command}` failed inside {library}"
                     + (f" during {doing}" if doing else "")
                     + f": {type(e).__name__}" + (f": {text}" if text else ""),
                     fix="check the input named above: a damaged or unsupported file is the "
                         "usual cause (re-download it, e.g. `hf download REPO --force`); "
                         "`solar-merge --debug ...` shows the full traceback")


def _as_user_error(e: Exception) -> UserError | None:
    """Errors raised by libraries on bad input, phrased for the user."""
    import errno
    import os
    import re

    full = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    # safetensors' Rust writer raises SafetensorError("... I/O error: ... (os error 27)")
    os_error = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == \
        "SafetensorError" else None
    if os_error and int(os_error.group(1)) in full:
        return UserError("the disk is full while writing the weights (safetensors: "
                         f"{os.strerror(int(os_error.group(1)))})",
                         fix="free space or choose another output folder, then re-run "
                             "(finished stages are kept)")
    if isinstance(e, OSError) and e.errno in full:
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


def _set_for_command(ctx, name: str, value: str) -> None:
    """Environment variable `name` = `value` for this command and the processes it starts
    (stages, accelerate ranks); restored when the command ends."""
    import os

    before = os.environ.get(name)
    os.environ[name] = value
    ctx.call_on_close(lambda: os.environ.pop(name, None) if before is None
                      else os.environ.__setitem__(name, before))


def _force_precision(ctx, param, value):
    """--precision X is SOLAR_MERGE_PRECISION=X for the command."""
    if value is not None:
        from solar_merge.precision import ENV

        _set_for_command(ctx, ENV, value)


def _show_everything(ctx, param, value):
    """--verbose is SOLAR_MERGE_VERBOSE=1 for the command: the libraries' warnings, logs and
    progress bars stay on the terminal (solar_merge.console)."""
    if value:
        from solar_merge.console import VERBOSE

        _set_for_command(ctx, VERBOSE, "1")


_VERBOSE = click.option(
    "--verbose", is_flag=True, expose_value=False, callback=_show_everything,
    help="Show the libraries' warnings, logs and progress bars (transformers, datasets, TRL, "
         "mergekit, lm-eval) here instead of in the log file.")


def _logged(folder):
    """Capture what the libraries print into FOLDER.log (solar_merge.console), named on the
    terminal first."""
    from solar_merge import console

    log = console.log_beside(folder)
    if not console.verbose() and console.current_log() is None:
        click.echo(f"libraries' output: {console.shown_path(log)}", err=True)
    argv = click.get_current_context().meta.get("solar_merge.argv", [])
    return console.capture(log, title=shlex.join(["solar-merge", *argv]))


_PRECISION = click.option(
    "--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), expose_value=False,
    callback=_force_precision,
    help="Train and evaluate in this float format, over every stage's `precision:` (the same "
         "as SOLAR_MERGE_PRECISION): auto (bf16 where the device computes it natively, fp16 on "
         "CUDA GPUs older than compute capability 8.0, else fp32), bf16, fp16 (autocast over "
         "fp32 weights; fp16 with loss scaling) or fp32.")


_CONFIG_OUT = click.option("-o", "--output", "config_out", type=click.Path(dir_okay=False),
                           help="Write the mergekit config here (default: print it).")
_RUN_OUT = click.option("--run", "run_out", type=click.Path(file_okay=False),
                        help="Also run the merge into this folder; any mergekit-yaml option "
                             "may follow (e.g. -j 2 --async-write --out-shard-size 1B).")
_NO_FAST = click.option("--no-fast", is_flag=True,
                        help="With --run: merge with mergekit even when the config only slices "
                             "and stacks layers (solar-merge copies those tensor bytes itself).")
# `dus`/`expand` pass options they do not know to mergekit's own parser (only with --run).
_MERGEKIT_OPTIONS = click.argument("mergekit_args", nargs=-1, type=click.UNPROCESSED)
_TAKES_MERGEKIT_OPTIONS = {"ignore_unknown_options": True}


def _may_overwrite(command):
    """`--overwrite`: the only way to replace an output folder that solar-merge did not write
    (outputs.check_replaceable refuses it otherwise)."""
    import functools

    @functools.wraps(command)
    def run(*args, overwrite=False, **kwargs):
        from solar_merge.outputs import overwriting

        with overwriting(overwrite):
            return command(*args, **kwargs)

    return click.option("--overwrite", is_flag=True,
                        help="Replace the output folder even if solar-merge did not write it "
                             "(its contents are deleted).")(run)


def _merge_options(ctx, mergekit_args, run_out) -> dict:
    if not mergekit_args:
        return {}
    if not run_out:
        raise UserError(f"{' '.join(mergekit_args)}: mergekit options only apply to a merge",
                        fix="add --run OUT, or pass them to `solar-merge yaml CONFIG OUT`")
    from solar_merge.merging import parse_merge_options

    try:
        return parse_merge_options(mergekit_args, prog=ctx.command_path)
    except click.UsageError as e:
        raise UserError(f"{ctx.command_path}: {e.format_message()}",
                        fix="`solar-merge yaml --help` lists mergekit's options") from None


def _write_file(path, text: str) -> None:
    """Write a small text output (a config, a recipe) whole or not at all: its folder is
    created, and a failed write leaves no half-written file."""
    import contextlib
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.parent / f".{path.name}.partial"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}",
                        fix="choose a writable path (and not an existing folder)") from None


def _emit_config(text: str, config_out, run_out) -> None:
    """Write the config to -o, else print it unless the merge is run right away."""
    from pathlib import Path

    if config_out:
        _write_file(Path(config_out), text)
        click.echo(f"wrote {config_out}", err=True)
    elif not run_out:
        click.echo(text)


def _upscale(planned, config_out, run_out, options, default_name: str,
             fast: bool = True) -> None:
    """Shared by `dus` and `expand`: describe, compute the new layers that need it (into
    CONFIG.layers or OUT.layers), write or print the config, run it."""
    from solar_merge.upscale import layers_dir_for

    if planned.job is not None:
        if not (config_out or run_out):
            raise UserError(f"--{'noise' if planned.job.init == 'noise' else 'init'} computes "
                            "new layers, which are written beside the config or the output",
                            fix="add -o CONFIG (layers in CONFIG.layers/) or --run OUT "
                                "(layers in OUT.layers/)")
        planned = planned.placed(layers_dir_for(config_out or run_out))
    click.echo(planned.describe(), err=True)
    if planned.job is not None:
        click.echo(f"new layers ({planned.job.init}) in {planned.write_layers()}", err=True)
    _emit_config(planned.yaml(config_out or default_name), config_out, run_out)
    if run_out:
        out = planned.run(run_out, options=options, fast=fast)
        click.echo(f"up-scaled model in {out}", err=True)


_NOISE = click.option("--noise", type=float, metavar="STD",
                      help="Add Gaussian noise to every weight matrix of each duplicated layer: "
                           "STD x the matrix's own standard deviation (off by default; the "
                           "copies then differ, symmetry breaking).")
_SEED = click.option("--seed", type=int, help="Seed of --noise and of LESA's predictor "
                                             "(default 0).")


@main.command(context_settings=_TAKES_MERGEKIT_OPTIONS)
@click.argument("model")
@click.option("--drop", "-m", type=int,
              help="Layers m dropped at the seam of each copy (SOLAR: 8 of 32).")
@click.option("--repeat", metavar="A:B",
              help="Instead of --drop: repeat layers A..B-1 once (Yi-9B); end-exclusive.")
@click.option("--scale-overlap", type=float, metavar="ALPHA",
              help="Multiply o_proj and down_proj of every layer that occurs twice by ALPHA, "
                   "in both copies (0.5 keeps their summed contribution).")
@click.option("--preset", type=click.Choice(["midas", "gstack"]),
              help="Instead of --drop/--repeat, a growth preset to --layers S: midas "
                   "duplicates the middle block of S - n layers (MIDAS), gstack stacks the "
                   "whole model S/n times (G_stack; default S = 4n).")
@click.option("--layers", type=int, metavar="S", help="With --preset: the layers to grow to.")
@_NOISE
@_SEED
@_CONFIG_OUT
@_RUN_OUT
@_NO_FAST
@_MERGEKIT_OPTIONS
@click.pass_context
@_may_overwrite
def dus(ctx, model, drop, repeat, scale_overlap, preset, layers, noise, seed, config_out,
        run_out, no_fast, mergekit_args):
    """Depth up-scale MODEL: a mergekit passthrough config with 2(n-m) layers (--drop m),
    n + B - A layers (--repeat A:B), or S layers (--preset midas|gstack --layers S)."""
    from solar_merge.upscale import plan_upscale

    options = _merge_options(ctx, mergekit_args, run_out)
    planned = plan_upscale(model, "dus", drop=drop, repeat=repeat, scale_overlap=scale_overlap,
                           preset=preset, layers=layers, noise=noise, seed=seed)
    _upscale(planned, config_out, run_out, options, "dus.yaml", not no_fast)


@main.command(context_settings=_TAKES_MERGEKIT_OPTIONS)
@click.argument("model")
@click.option("--every", type=int,
              help="Insert one zero-output block after every N layers (LLaMA Pro: 4).")
@click.option("--blocks", type=int, metavar="K", help="Instead of --every: add K new blocks.")
@click.option("--where", type=click.Choice(["interleaved", "top"]),
              help="With --blocks: one after every n/K layers (default), or in the gaps "
                   "between the last K+1 layers (where OpT-DeUS found new layers train "
                   "faster).")
@click.option("--init", type=click.Choice(["identity", "average", "lesa", "aligned-average"]),
              help="With --blocks: a copy of the layer below with zeroed outputs (default, "
                   "LLaMA Pro), the mean of the two adjacent layers (Avg-DeUS), LESA's "
                   "prediction from them, or their mean after matching heads and neurons "
                   "(OpT-DeUS, outputs zeroed). lesa and aligned-average are computed into "
                   "CONFIG.layers/ or OUT.layers/.")
@_NOISE
@_SEED
@_CONFIG_OUT
@_RUN_OUT
@_NO_FAST
@_MERGEKIT_OPTIONS
@click.pass_context
@_may_overwrite
def expand(ctx, model, every, blocks, where, init, noise, seed, config_out, run_out,
           no_fast, mergekit_args):
    """Block expansion of MODEL: new blocks that compute the identity until trained (LLaMA Pro),
    or blocks made from their two neighbours (averaged, predicted or aligned)."""
    from solar_merge.upscale import plan_upscale

    options = _merge_options(ctx, mergekit_args, run_out)
    planned = plan_upscale(model, "expand", every=every, blocks=blocks, where=where, init=init,
                           noise=noise, seed=seed)
    _upscale(planned, config_out, run_out, options, "expand.yaml", not no_fast)


@main.command()
@click.option("--quick", is_flag=True, help="Fewer steps, smaller evaluations (~3 min).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output folder (default: runs/demo or runs/demo-quick).")
@click.option("--dry-run", is_flag=True,
              help="Prepare the output folder (model, data, recipe.yaml) and print the plan "
                   "of the stages; train nothing.")
@click.argument("overrides", nargs=-1)
@_PRECISION
@_VERBOSE
@_may_overwrite
def demo(quick, out_dir, dry_run, overrides):
    """The main job: SOLAR's whole pipeline on the embedded SmolLM2-135M, offline.

    DUS 30 -> 44 layers (and the naive 60-layer repeat), continued pretraining, two SFT
    candidates merged by solar_average and solar_slerp, DPO and stepwise DPO, a final merge,
    held-out evaluation of every stage, and a report (report.md, report.png). OVERRIDES are
    recipe `key=value` settings, e.g. stages.cpt.train.args.max_steps=40.
    """
    if dry_run:
        from solar_merge.demo import plan_demo
        from solar_merge.recipe import format_plan

        plan = plan_demo(out_dir, quick=quick, overrides=overrides)
        click.echo(format_plan(plan))
        click.echo(f"dry run: nothing trained; `solar-merge demo{' --quick' if quick else ''}"
                   f"{' --out ' + out_dir if out_dir else ''}` runs these stages", err=True)
        return
    from solar_merge.demo import run_demo
    from solar_merge.recipe.runner import RESULTS

    report = run_demo(out_dir, quick=quick, overrides=overrides)
    results = report.parent / RESULTS  # the run's results table, every eval stage's rows
    if results.is_file():
        click.echo(results.read_text().rstrip() + "\n")
    click.echo(f"report: {report}")


_FORWARD = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@main.command(context_settings=_FORWARD, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def yaml(ctx, args):
    """Run a mergekit YAML config with our methods and fixes (takes every mergekit-yaml option)."""
    from solar_merge.merging import yaml_command

    args = list(args)
    # CONFIG OUT and our own flags only: mergekit's option parser (seconds to import) is not
    # needed, and a config that only slices and stacks runs without mergekit at all.
    plain = all(not a.startswith("-") or a in ("--allow-pickle", "--overwrite", "--no-fast")
                for a in args)
    yaml_command(mergekit_options=not plain).main(args, prog_name=ctx.command_path,
                                                  standalone_mode=False)


@main.command(context_settings=_FORWARD, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def multi(ctx, args):
    """mergekit-multi with our methods registered, strict keys and absolute paths."""
    from solar_merge.merging import multi_command

    multi_command().main(list(args), prog_name=ctx.command_path, standalone_mode=False)


# -- commands are added below, one function each; keep them thin --


@main.command("run", context_settings=_TAKES_MERGEKIT_OPTIONS)
@click.argument("recipe")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output root (default: the recipe's `out:`, else runs/<name>).")
@_PRECISION
@_VERBOSE
@click.pass_context
@_may_overwrite
def run_command(ctx, recipe, overrides, out_dir):
    """Run RECIPE (a file, an output folder, a URL, a Hub repo id, or the name of a recipe
    shipped with solar-merge when no such file exists, e.g. `solar_10.7b`: see `solar-merge
    recipes`) stage by stage. A shipped recipe runs as its copy here would (`solar-merge
    recipes copy NAME .`): outputs and data paths relative to the current folder.
    KEY=VALUE overrides address the recipe, e.g. stages.cpt.train.args.max_steps=5.
    Re-running skips finished stages whose config is unchanged. mergekit-yaml options
    (--cuda, -j 2, ...) apply to every merge stage; train stages run as their `launch:` says.
    Each stage runs in a fresh process, so that no stage's memory outlives it."""
    import re

    from solar_merge.recipe import run
    from solar_merge.stages.launch import LaunchFailed

    # key=value or a dotted key (a malformed override, reported as one); the rest is mergekit's
    is_override = re.compile(r"^[A-Za-z_][\w\-]*(=|\.)")
    mergekit_args = [o for o in overrides if not is_override.match(o)]
    options = _merge_options(ctx, mergekit_args, True)
    try:
        source, base_dir = _recipe_source(recipe)
        result = run(source, out_dir, [o for o in overrides if is_override.match(o)],
                     merge_options=options, isolate=True, base_dir=base_dir)
    except LaunchFailed as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(e.returncode)
    click.echo(f"ran {len(result.ran)} stage(s), skipped {len(result.skipped)} finished; "
               f"outputs in {result.out}" + (f"; final model {result.final}"
                                              if result.final else "")
               + ("; results table in " + str(result.out / "results.md")
                  if result.table is not None else ""), err=True)
    click.echo(result.summary())


@main.command("validate")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output root to plan for (as `run --out`).")
def validate_command(recipe, overrides, out_dir):
    """Check RECIPE (as `run` takes it: a file, ..., a shipped recipe's name) without running
    anything (no weights downloaded) and print the plan: stage graph, layer and parameter
    counts, memory estimates."""
    from solar_merge.recipe import format_plan, plan

    source, base_dir = _recipe_source(recipe)
    click.echo(format_plan(plan(source, out_dir, list(overrides), base_dir=base_dir)))


def _recipe_source(recipe: str):
    """(source, base folder) for `run`/`validate`: RECIPE as given, or, when it names no file
    or folder but a shipped recipe, that recipe as its copy in the current folder would run."""
    import os

    from solar_merge import recipes

    if os.path.exists(os.path.expanduser(recipe)) or \
            recipe.removesuffix(".yaml") not in {item.name for item in recipes.shipped()}:
        return recipe, None
    return recipes.runnable(recipe)


@main.command("train")
@click.argument("stage_config", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              help="Output folder (default: the config's `output:`, else out/<config name>).")
@click.option("--accelerate-config", metavar="NAME|PATH",
              help="Start `accelerate launch` with this TRL preset (zero1, zero2, zero3, fsdp1, "
                   "fsdp2, multi_gpu, single_gpu) or accelerate config file.")
@click.option("--num-processes", type=int, help="Processes in all, over every machine.")
@click.option("--num-machines", type=int, help="Machines (run the command on each one).")
@click.option("--machine-rank", type=int, help="This machine's rank (0 .. machines-1).")
@click.option("--main-process-ip", help="Address of machine 0.")
@click.option("--main-process-port", type=int, help="Port of machine 0.")
@click.option("--device-memory", metavar="SIZE",
              help="Memory of one device, e.g. 80GB: refuse what the estimate says cannot fit.")
@click.option("--dry-run", is_flag=True, help="Check, print the memory estimate, train nothing.")
@click.option("--digest", hidden=True,
              help="Key of the output's completion record (a recipe's stage hash), handed to "
                   "the processes accelerate launch starts.")
@_PRECISION
@_VERBOSE
@_may_overwrite
def train_command(stage_config, overrides, out_dir, dry_run, digest, **launch):
    """Run one training stage (cpt, sft, dpo, stepwise_dpo); KEY=VALUE overrides the YAML,
    e.g. args.learning_rate=1e-4 seq_len=256. Re-running resumes or skips a finished stage.
    The launch options (also `launch:` in the YAML) start accelerate launch for you."""
    import os
    from pathlib import Path

    from solar_merge.stages import load_stage_config
    from solar_merge.stages.launch import LaunchFailed, prepare, start
    from solar_merge.stages.launch import dry_run as describe
    from solar_merge.stages.schema import command_line_overrides

    path = Path(stage_config)
    config = load_stage_config(path)
    overrides = command_line_overrides(overrides)  # paths typed here are relative to here
    if not out_dir and not any(o.startswith("output=") for o in overrides) \
            and not config.get("output"):
        out_dir = Path("out") / path.stem
    overrides = list(overrides) + [f"launch.{k}={v}" for k, v in launch.items() if v is not None]
    if dry_run:
        click.echo(describe(config, out_dir, overrides=overrides, base_dir=path.parent),
                   err=True)
        return
    try:
        resolved, out = prepare(config, out_dir, overrides, path.parent)
        with _logged(out):
            done = start(resolved, out, digest=digest)
    except LaunchFailed as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(e.returncode)
    if os.environ.get("RANK", "0") == "0":  # once, not by every rank
        click.echo(f"trained model in {done}", err=True)


@main.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; no network.")
def push_command(folder, repo_id, private, dry_run):
    """Upload an output FOLDER (weights, card, recipe) to the Hub model repo REPO_ID (a
    synth-math data folder goes to the dataset repo REPO_ID)."""
    from solar_merge import hub
    from solar_merge.checkpoints import human

    files = hub.push(folder, repo_id, private=private, dry_run=dry_run)
    for path, size in files:
        click.echo(f"{size:>12}  {path}")
    total = human(sum(size for _, size in files), "B")
    verb = "would upload" if dry_run else "uploaded"
    kind = "datasets/" if hub.repo_type(folder) == "dataset" else ""
    click.echo(f"{verb} {len(files)} files ({total}) to https://huggingface.co/{kind}{repo_id}",
               err=True)


@main.group("recipes", invoke_without_command=True)
@click.pass_context
def recipes_group(ctx):
    """The recipes, stage configs and merge configs shipped with solar-merge (listed when no
    command follows); `copy` one out to edit it, `extract` the recipe of an output folder or
    a Hub repo."""
    if ctx.invoked_subcommand is not None:
        return
    from solar_merge import recipes

    items = recipes.shipped()
    width = max(len(item.name) for item in items) + 2
    kinds = max(len(item.kind) for item in items) + 2
    for item in items:
        click.echo(f"{item.name:<{width}}{item.kind:<{kinds}}{item.description}")
        click.echo(f"{'':<{width + kinds}}$ {item.command}")
    click.echo(f"\nshipped in {recipes.root()}; `solar-merge recipes copy NAME DIR` copies one "
               "(and the files it names) into DIR/training or DIR/merge_configs, where the "
               "commands above run; `solar-merge run NAME` runs a recipe by name.")


@recipes_group.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path(file_okay=False), default=".")
def recipes_copy(name, dest):
    """Copy the shipped recipe or config NAME, with the files it names (a merge config, a chat
    template), into DEST (default: here) as a checkout lays them out: DEST/training/NAME.yaml
    or DEST/merge_configs/NAME.yaml. Its header's command then runs in DEST."""
    from solar_merge import recipes

    item = recipes.find(name)
    for path in recipes.copy(name, dest):
        click.echo(str(path))
    click.echo(f"run it from {dest}: {item.command}", err=True)


@recipes_group.command("extract")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the recipe here (default: print it).")
def recipe_extract(source, output):
    """Write out the recipe that produced SOURCE (a folder, a Hub repo id or a URL)."""
    from pathlib import Path

    from solar_merge import hub

    text, label = hub.recipe_for(source, Path(output).absolute().parent if output else Path.cwd())
    if output:
        _write_file(Path(output), text)
        click.echo(f"wrote the recipe of {label} to {output}", err=True)
    else:
        click.echo(text, nl=not text.endswith("\n"))


# -- decide from data: seam, plan, sweep --


@main.command("seam")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_file", type=click.Path(dir_okay=False), required=True,
              help="Text to run the model on (.txt, or .jsonl/.json/.parquet with `text`).")
@click.option("--samples", type=int, default=8, show_default=True,
              help="Number of non-overlapping samples taken from the start of the text.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens a sample.")
@click.option("--layers", type=int, help="Target layer count S to recommend a seam for.")
@click.option("--budget", help="Or a parameter budget, e.g. 10B: the largest SOLAR stack "
                               "within it (default: SOLAR's m = n/4).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for seam.csv, seam.png, candidates.csv, seam.json.")
@_VERBOSE
@_may_overwrite
def seam_command(model, data_file, samples, seq_len, layers, budget, out_dir):
    """Where to cut MODEL for depth up-scaling, from its hidden states on a text sample.

    For every layer l and offset k: the angular distance between the hidden states entering
    layers l and l+k, the mean over all tokens of arccos(cos(h_l, h_l+k))/pi, with h the
    model's transformers `output_hidden_states` (h_0: embeddings; h_n: after the final norm).
    Scores every SOLAR seam (--drop m: copy A's layer n-m-1 feeds copy B's layer m, which was
    trained on h_m: distance d(h_m, h_n-m)) and recommends --drop M and the range repeat
    --repeat A:B of the target size whose seam joins the most similar states.
    """
    from solar_merge.analysis import seam

    with _logged(out_dir):
        result = seam(model, data_file, out_dir, samples=samples, seq_len=seq_len,
                      layers=layers, budget=budget)
    click.echo(result.summary())


@main.command("plan")
@click.argument("model")
@click.option("--drop", "-m", type=int, help="SOLAR's DUS dropping m layers per copy.")
@click.option("--layers", type=int, help="Any up-scaling to S layers.")
@click.option("--every", type=int, help="LLaMA Pro: a new block after every K layers.")
@click.option("--launch", help="An accelerate preset (zero1, zero2, zero3, fsdp1, fsdp2, "
                               "multi_gpu) or config file: its strategy only (default: all).")
@click.option("--num-processes", "devices", type=int, default=8, show_default=True,
              help="Devices the sharded strategies spread over.")
@click.option("--stage", type=click.Choice(["cpt", "sft", "dpo"]), default="sft",
              show_default=True)
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32", "bf16-weights"]),
              default="bf16", show_default=True,
              help="A train stage's precision: bf16 / fp16 (autocast over fp32 weights, as "
                   "TRL's bf16 / fp16), fp32, or bf16-weights (args.model_init_kwargs.dtype "
                   "bfloat16: weights, gradients and moments in bf16).")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences per device.")
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--checkpointing/--no-checkpointing", default=True, show_default=True,
              help="Activation (gradient) checkpointing.")
def plan_command(model, drop, layers, every, launch, devices, stage, precision, batch,
                 seq_len, checkpointing):
    """Size MODEL up-scaled (one of --drop, --layers, --every; none: as is) from its
    config.json alone: parameters, weight bytes per dtype, and training memory per device for
    each strategy (solar_merge.memory's formula). Loads no weights and imports neither torch
    nor mergekit."""
    from solar_merge.analysis import plan

    click.echo(plan(model, drop=drop, layers=layers, every=every, launch=launch,
                    devices=devices, stage=stage, precision=precision, batch=batch,
                    seq_len=seq_len, checkpointing=checkpointing).format())


@main.command("sweep")
@click.argument("candidates", nargs=-1, required=True)
@click.option("--method", type=click.Choice(["solar_average", "solar_slerp"]), required=True,
              help="solar_slerp: t in [0, 1] between two models; solar_average: t is the "
                   "second model's weight (three or more: every grid combination summing "
                   "to 1).")
@click.option("--grid", default="0,0.25,0.5,0.75,1", show_default=True,
              help="Comma-separated grid values.")
@click.option("--tasks", required=True, help="lm-eval tasks scoring each merge, e.g. "
                                             "solar_manual_ppl,solar_arith.")
@click.option("--include-path", multiple=True, type=click.Path(file_okay=False),
              help="Folder of extra lm-eval task YAMLs (repeatable).")
@click.option("--num-fewshot", type=int, help="lm-eval's num_fewshot.")
@click.option("--limit", type=float, help="lm-eval's limit (documents per task).")
@click.option("--batch-size", default="8", show_default=True, help="lm-eval's batch size.")
@click.option("--metric", help="The metric that picks the best: a `task metric,filter` column "
                               "of `solar-merge eval`'s table, or an unambiguous part of one "
                               "(default: the first task's main metric).")
@click.option("--dtype", help="dtype of the merges (default: the candidates').")
@click.option("--keep-all", is_flag=True, help="Keep every merge under DIR/points.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for sweep.csv, sweep.png, scores/, evals/ and best/.")
@_VERBOSE
@_may_overwrite
def sweep_command(candidates, method, grid, tasks, include_path, num_fewshot, limit,
                  batch_size, metric, dtype, keep_all, out_dir):
    """Merge CANDIDATES at every grid point, score each merge with lm-eval, keep the best in
    DIR/best (with its card); the others are deleted unless --keep-all. Resumable: a re-run
    never merges a scored point again."""
    from solar_merge.sweep import sweep

    batch = int(batch_size) if batch_size.isdigit() else batch_size
    with _logged(out_dir):
        result = sweep(list(candidates), out_dir, method=method, grid=grid, tasks=tasks,
                       include_path=list(include_path) or None, num_fewshot=num_fewshot,
                       limit=limit, batch_size=batch, metric=metric, keep_all=keep_all,
                       dtype=dtype)
    click.echo(result.summary())


@main.command("search")
@click.argument("space", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for study.db, trials/, best/, best.yaml, report.md.")
@click.option("--trials", type=click.IntRange(min=1),
              help="Finished trials the study should hold, over all workers (default: the "
                   "space's `trials:`, else 20).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Start no trial after this many seconds.")
@click.option("--storage", metavar="URL",
              help="The study's database (default: sqlite:///OUT/study.db), e.g. "
                   "postgresql+psycopg2://USER:PASSWORD@HOST/DB for workers on many "
                   "machines.")
@click.option("--keep-all", is_flag=True, default=None,
              help="Keep every trial's model under OUT/trials (default: only the best).")
@_VERBOSE
@_may_overwrite
def search_command(space, out_dir, trials, timeout, storage, keep_all):
    """Search the up-scaling layouts and/or merge weights of SPACE (a YAML search space) with
    Optuna: each trial is built by mergekit and scored (lm-eval tasks or held-out perplexity);
    the best goes to OUT/best with its stock mergekit config OUT/best.yaml. Resumable; several
    processes or machines on one --storage share the study."""
    from pathlib import Path

    from solar_merge.search import load_space, run

    with _logged(out_dir):
        result = run(load_space(space), out_dir, base_dir=Path(space).absolute().parent,
                     trials=trials, timeout=timeout, storage=storage, keep_all=keep_all)
    click.echo(result.summary())


@main.command("synth-math")
@click.argument("seed_data", metavar="SEED")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for math_instruct.jsonl, math_alignment.jsonl, the card, the report.")
@click.option("--model", help="Chat model folder or Hub id that rephrases (default: the "
                              "embedded SmolLM2-135M-Instruct).")
@click.option("--limit", type=int, help="Use the first N seed records only.")
@click.option("--samples-per-problem", type=int, default=1, show_default=True,
              help="Rephrasings tried per problem (more than 1 needs --temperature > 0).")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Problems per generation batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0: greedy; MetaMath sampled at 0.7.")
@click.option("--max-new-tokens", type=int, default=384, show_default=True,
              help="Cap on the tokens of each generated text.")
@click.option("--split", default="train", show_default=True, help="Split of a Hub dataset.")
@click.option("--subset", help="Config of a Hub dataset (GSM8K: main).")
@click.option("--engine", type=click.Choice(["auto", "transformers", "vllm"]), default="auto",
              show_default=True, help="auto: vLLM when installed and a GPU is present.")
@click.option("--threads", type=int, help="CPU threads for generation (default: torch's; 1 is "
                                         "faster on a machine whose cores are busy).")
@click.option("--license", "license_", help="License for the dataset card (e.g. mit).")
@_PRECISION
@_VERBOSE
@_may_overwrite
def synth_math_command(seed_data, out_dir, model, limit, samples_per_problem, batch_size, seed,
                       temperature, max_new_tokens, split, subset, engine, threads, license_):
    """Rephrase the math problems of SEED (GSM8K, MetaMathQA or our math format; a file,
    folder or Hub dataset) with a chat model, MetaMath-style, keeping only pairs that pass the
    checks; writes the paper's Synth. Math-Instruct and Math-Alignment sets. Resumable."""
    from solar_merge.synth_math import Options, synth_math

    options = Options(model=model, limit=limit, samples_per_problem=samples_per_problem,
                      batch_size=batch_size, seed=seed, temperature=temperature,
                      max_new_tokens=max_new_tokens, split=split, subset=subset,
                      engine=engine, threads=threads, license=license_)
    with _logged(out_dir):
        result = synth_math(seed_data, out_dir, options)
    click.echo(result.summary())


# -- evaluation through lm-eval: eval, contamination --

_TASKS = click.option("--tasks", required=True,
                      help="Comma-separated lm-eval tasks or groups: ours (solar_manual_ppl, "
                           "solar_manual_qa, solar_arith; tag `solar`), `h6` (the paper's Open "
                           "LLM Leaderboard set), any lm-eval task.")
_INCLUDE = click.option("--include-path", multiple=True, type=click.Path(),
                        help="Folder of extra lm-eval task YAMLs (repeatable); its tasks sit "
                             "beside ours.")


@main.command("eval")
@click.argument("models", nargs=-1)
@_TASKS
@_INCLUDE
@click.option("--num-fewshot", type=int, help="Shots for every task (lm-eval's override).")
@click.option("--limit", type=float, help="First N documents of each task (< 1: a share).")
@click.option("--batch-size", default="8", show_default=True, help="lm-eval's batch size.")
@click.option("--device", help="cpu, cuda, cuda:0, ... (default: cuda if available).")
@click.option("--apply-chat-template", is_flag=True,
              help="Render prompts with the model's chat template (lm-eval's option).")
@click.option("--model-args", help="More arguments of lm-eval's `hf` model, "
                                   "e.g. dtype=bfloat16,max_length=2048.")
@click.option("--prefetch", is_flag=True,
              help="Only read the tasks' data into the datasets cache (no model): run once "
                   "online, then evaluate offline.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              default="runs/eval", show_default=True,
              help="Folder for each model's lm-eval results.json and results.md/.csv/.png.")
@_PRECISION
@_VERBOSE
@_may_overwrite
def eval_command(models, tasks, include_path, num_fewshot, limit, batch_size, device,
                 apply_chat_template, model_args, prefetch, out_dir):
    """Evaluate MODELS (folders or Hub ids) with lm-evaluation-harness: lm-eval's own JSON per
    model, one table of models x metrics, a plot."""
    from solar_merge import eval as lm

    if prefetch:
        click.echo(lm.prefetch(tasks, include_path=list(include_path) or None))
        return
    if not models:
        raise UserError("no model given", fix="solar-merge eval MODEL [MODEL ...] --tasks ...")
    with _logged(out_dir):
        lm.evaluate(list(models), tasks, out=out_dir, include_path=list(include_path) or None,
                    num_fewshot=num_fewshot,
                    limit=int(limit) if limit and limit >= 1 else limit,
                    batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
                    device=device, apply_chat_template=apply_chat_template,
                    model_args=lm.parse_model_args(model_args))
    click.echo(f"lm-eval results per model and the table (results.md) in {out_dir}",
               err=True)
    click.echo(lm.read_table(out_dir).text())


@main.command("contamination")
@click.option("--train", "train", multiple=True, required=True,
              help="A training set: data file (.jsonl/.json/.parquet/.txt), folder or Hub data "
                   "set (repeatable).")
@_TASKS
@_INCLUDE
@click.option("-n", "ngram", type=int, default=13, show_default=True,
              help="n-gram length in words (lm-eval's decontamination uses 13).")
@click.option("--fail-above", type=float,
              help="Exit with code 1 when a (training set, task) pair has more than PCT "
                   "percent of the task's documents contaminated.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              default="runs/contamination", show_default=True,
              help="Folder for contamination.md/.csv/.json and the offending examples.")
@_may_overwrite
def contamination_command(train, tasks, include_path, ngram, fail_above, out_dir):
    """n-gram overlap between each training set and each task's evaluation documents."""
    from solar_merge import contamination

    report = contamination.run(list(train), tasks, include_path=list(include_path) or None,
                               n=ngram, out=out_dir)
    click.echo("\n".join(contamination.markdown(report)))
    contamination.enforce(report, fail_above, where=out_dir)


if __name__ == "__main__":
    sys.exit(main())
