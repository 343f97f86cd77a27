"""``posttrain`` command line: a small argparse front over Hydra's compose API.

    posttrain run recipe=NAME [key=value …]       compose, check, run (or resume) the pipeline
    posttrain validate recipe=NAME [key=value …]  compose and check (schema, EP layout, model dirs, plugins,
                                                  data files); loads no model
    posttrain teacher-targets recipe=NAME stage=S write a distill stage's offline teacher targets
    posttrain recipes                             list shipped recipes with their descriptions
    posttrain report RUN_DIR [--out DIR]          an HTML page of a run: curves per stage, the accuracy table
    posttrain rewards [check NAME --data F]       list / try reward plugins
    posttrain filters [check NAME --data F]       list / try data filters (difficulty judges)

``recipe=`` takes a shipped recipe name (``recipes/NAME.yaml`` inside the package) or a path to your
own YAML file (its ``defaults`` may use the shipped groups: ``model/``, ``deepspeed/``).
Overrides are Hydra's: ``model=tiny_llama`` picks a group option, ``stages.warmup.max_steps=50`` sets
a value. Unknown keys and wrong types fail before anything loads, naming the key.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from importlib.resources import files
from pathlib import Path

import yaml

from posttrain.config import Recipe, parse_recipe
from posttrain.errors import UserError
from posttrain.preflight import check_hardware, preflight
from posttrain.schema import ConfigError, to_dict


def recipes_dir() -> Path:
    return Path(str(files("posttrain") / "recipes"))


def list_recipes() -> dict[str, str]:
    out = {}
    for path in sorted(recipes_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[path.stem] = (
            str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
        )
    return out


def _groups(config_dir: Path) -> set[str]:
    return {p.name for p in config_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}


def compose(recipe: str, overrides: list[str]) -> Recipe:
    """Hydra-compose a recipe with overrides and check it against the schema."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    shipped = recipes_dir()
    as_path = Path(recipe).expanduser()
    if recipe.endswith((".yaml", ".yml")):
        if not as_path.exists():
            raise ConfigError(f"recipe file '{recipe}' does not exist")
        config_dir, name = as_path.resolve().parent, as_path.stem
        extra = [f"hydra.searchpath=[file://{shipped}]"]
    else:
        known = list_recipes()
        if recipe not in known:
            import difflib

            close = difflib.get_close_matches(recipe, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown recipe '{recipe}'{hint}; available: {', '.join(known)} — or pass a path to a .yaml file"
            )
        config_dir, name, extra = shipped, recipe, []

    groups = _groups(shipped) | _groups(config_dir)
    hydra_overrides = []
    for ov in overrides:
        if "=" not in ov and not ov.startswith("~"):
            raise ConfigError(f"override '{ov}' is not key=value")
        key = ov.split("=", 1)[0].lstrip("+~")
        if key in groups or ov.startswith(("+", "~")):
            hydra_overrides.append(ov)  # group choice or explicit Hydra syntax
        else:
            hydra_overrides.append("++" + ov)  # set or add; the schema check reports unknown keys
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = hydra_compose(config_name=name, overrides=hydra_overrides + extra)
    except (HydraException, yaml.YAMLError) as e:  # a bad override, or a recipe file that is not YAML
        first = " ".join(str(e).split())[:400] or type(e).__name__
        raise ConfigError(f"recipe '{recipe}': {first}") from None
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"recipe '{recipe}': {first}") from None
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return parse_recipe(data)  # type: ignore[arg-type]


def _split_recipe_arg(args: list[str]) -> tuple[str, list[str]]:
    recipe = None
    rest = []
    for a in args:
        if a.startswith("recipe="):
            recipe = a.split("=", 1)[1]
        else:
            rest.append(a)
    if not recipe:
        raise ConfigError("name a recipe: posttrain run recipe=NAME [key=value …] (see `posttrain recipes`)")
    return recipe, rest


def _launch_ranks(recipe: Recipe, argv: list[str]) -> int:
    """Re-run this command under torchrun with launcher.nproc_per_node ranks on this node.

    ``--standalone``: torchrun's own rendezvous on a port the kernel assigns, which the ranks then
    share (no port is picked here and released, so none can be taken in between)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={recipe.launcher.nproc_per_node}",
        "-m", "posttrain.cli", *argv,
    ]  # fmt: skip
    return subprocess.call(cmd)


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    recipe = compose(*_split_recipe_arg(args.overrides))
    if "LOCAL_RANK" not in os.environ:  # posttrain starts the ranks: check everything before they start
        preflight(recipe)
    if recipe.launcher.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_ranks(recipe, argv)
    if recipe.launcher.nnodes > 1 and "LOCAL_RANK" not in os.environ:
        raise ConfigError(
            "launcher.nnodes > 1: start `posttrain run …` on every node with torchrun or the DeepSpeed launcher "
            "(see docs/expert_parallel.md)"
        )
    from posttrain.pipeline import run_pipeline
    from posttrain.strategy import shutdown

    try:
        run_pipeline(recipe)
    finally:
        shutdown()
    return 0


def cmd_validate(args: argparse.Namespace, argv: list[str]) -> int:
    recipe_name, overrides = _split_recipe_arg(args.overrides)
    recipe = compose(recipe_name, overrides)
    # EP layout, model dirs, plugins, data files, hardware: everything that loads no model (hub ids are
    # not looked up here, so a cluster recipe validates on a laptop)
    print("\n".join(check_hardware(recipe)))  # first: what the recipe needs, even when a data file is missing
    preflight(recipe, hub=False)
    print(yaml.safe_dump(to_dict(recipe), sort_keys=False).rstrip())
    print(
        f"recipe '{recipe_name}' is valid: {len(recipe.stages)} stage(s): {', '.join(f'{n} ({s.type})' for n, s in recipe.stages.items())}"
    )
    return 0


def cmd_teacher_targets(args: argparse.Namespace, argv: list[str]) -> int:
    """Write the offline teacher targets of one distill stage (the stage also writes them itself when
    its ``codistill.targets`` dir does not exist)."""
    stage = next((a.split("=", 1)[1] for a in args.overrides if a.startswith("stage=")), None)
    if not stage:
        raise ConfigError("name the stage: posttrain teacher-targets recipe=NAME stage=STAGE [key=value …]")
    recipe = compose(*_split_recipe_arg([a for a in args.overrides if not a.startswith("stage=")]))
    preflight(recipe)
    from posttrain.teacher import write_stage_targets

    print(f"wrote teacher targets to {write_stage_targets(recipe, stage)}")
    return 0


def cmd_recipes(args: argparse.Namespace, argv: list[str]) -> int:
    items = list_recipes()
    width = max(map(len, items), default=0)
    for name, desc in items.items():
        print(f"{name.ljust(width)}  {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Llama 4-style post-training: SFT, online RL, DPO, codistillation. "
        "Add --debug (or POSTTRAIN_DEBUG=1) to any command to see the traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in [
        ("run", cmd_run, "run (or resume) a recipe: posttrain run recipe=NAME [key=value …]"),
        ("validate", cmd_validate, "compose and check a recipe without loading a model"),
        (
            "teacher-targets",
            cmd_teacher_targets,
            "write a distill stage's offline teacher targets: recipe=NAME stage=STAGE [key=value …]",
        ),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("overrides", nargs="*", help="recipe=NAME, then Hydra overrides key=value")
        p.set_defaults(func=fn)
    sub.add_parser("recipes", help="list shipped recipes").set_defaults(func=cmd_recipes)
    from posttrain import report

    report.add_subparser(sub)
    from posttrain import cli_filters, cli_rewards

    cli_rewards.add_subparser(sub)
    cli_filters.add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The one error boundary: bad input (``UserError``) is one line and exit 2; any other failure is one
    line naming the exception and exit 1. ``--debug`` (or ``POSTTRAIN_DEBUG=1``) shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("POSTTRAIN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ["POSTTRAIN_DEBUG"] = "1"  # ranks re-launched under torchrun show theirs too
    args = build_parser().parse_args(argv)
    try:
        result = (
            args.func(args, argv)
            if args.command in ("run", "validate", "recipes", "teacher-targets")
            else args.func(args)
        )
        return int(result or 0)
    except KeyboardInterrupt:
        print("posttrain: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        message = _one_line(e)
        if isinstance(e, UserError):
            print(f"posttrain: error: {message}", file=sys.stderr)
            return 2
        print(
            f"posttrain: error: {type(e).__name__}: {message} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:600] + " …"


if __name__ == "__main__":
    sys.exit(main())
