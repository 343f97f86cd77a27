"""Recipes compose and validate; schema errors name the key (and the closest valid key / the type)."""

from __future__ import annotations

import pytest
import yaml

from posttrain.cli import compose, list_recipes, main, recipes_dir
from posttrain.config import ModelConfig, OptimConfig
from posttrain.schema import ConfigError, parse


@pytest.mark.parametrize("name", sorted(p.stem for p in recipes_dir().glob("*.yaml")))
def test_every_recipe_composes_and_validates(name):
    recipe = compose(name, [])
    assert recipe.stages, name
    assert name in list_recipes()


@pytest.mark.parametrize("group", ["model", "deepspeed"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml")):
        recipe = compose("quickstart", [f"{group}={option}"])
        if group == "deepspeed":
            expected = yaml.safe_load((recipes_dir() / group / f"{option}.yaml").read_text())
            assert (
                recipe.deepspeed.zero_stage == expected["zero_stage"]
                and recipe.deepspeed.bf16 == expected["bf16"]
            )
        else:
            assert recipe.model.arch is not None or recipe.model.name_or_path is not None


def test_unknown_key_names_key_and_closest():
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'stages.warmup.max_step' \(did you mean 'stages.warmup.max_steps'\?\)",
    ):
        compose("quickstart", ["stages.warmup.max_step=5"])


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown key 'trakcing' \(did you mean 'tracking'\?\)"):
        compose("quickstart", ["trakcing.log_every=5"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"'stages.warmup.max_steps' must be int, got 'ten'"):
        compose("quickstart", ["stages.warmup.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"'optim.lr' must be float"):
        parse(OptimConfig, {"lr": "fast"}, "optim")


def test_literal_and_stage_type_errors():
    with pytest.raises(ConfigError, match=r"'deepspeed.zero_stage' must be one of 0 \| 1 \| 2 \| 3, got 5"):
        compose("quickstart", ["deepspeed.zero_stage=5"])
    with pytest.raises(ConfigError, match=r"'stages.warmup.type' is 'sftt' \(did you mean 'sft'\?\)"):
        compose("quickstart", ["stages.warmup.type=sftt"])


def test_unknown_recipe_lists_available():
    with pytest.raises(
        ConfigError,
        match=r"unknown recipe 'quickstrat' \(did you mean 'quickstart'\?\); available: .*quickstart",
    ):
        compose("quickstrat", [])


def test_model_needs_a_source():
    with pytest.raises(ConfigError, match="needs either name_or_path"):
        parse(ModelConfig, {"tokenizer": "char"}, "model")


def test_overrides_reach_the_schema():
    recipe = compose("quickstart", ["stages.warmup.max_steps=7", "model=tiny_llama", "run.seed=3"])
    assert recipe.stages["warmup"].max_steps == 7
    assert recipe.model.arch == "llama" and recipe.run.seed == 3


def test_user_recipe_file_uses_shipped_groups(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("defaults:\n  - model: tiny_llama\n  - _self_\nstages:\n  a: {type: sft, max_steps: 3}\n")
    recipe = compose(str(f), [])
    assert recipe.model.arch == "llama" and recipe.stages["a"].max_steps == 3


def test_cli_validate_and_recipes(capsys):
    assert main(["validate", "recipe=quickstart", "stages.warmup.max_steps=3"]) == 0
    assert "is valid" in capsys.readouterr().out
    assert main(["recipes"]) == 0
    assert "quickstart" in capsys.readouterr().out
    assert main(["validate", "recipe=quickstart", "stages.warmup.lr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("posttrain: error: unknown key 'stages.warmup.lr'")


def test_partial_section_keeps_the_fields_own_defaults():
    """RL's optimizer defaults (lr 1e-4, constant) differ from OptimConfig's; setting only lr keeps the rest."""
    from posttrain.config import RLConfig

    rl = parse(RLConfig, {"optim": {"lr": 2e-4}}, "stages.rl")
    assert rl.optim.lr == 2e-4 and rl.optim.schedule == "constant" and rl.optim.betas == (0.9, 0.99)


def test_recipe_without_model_is_an_error(tmp_path):
    f = tmp_path / "nomodel.yaml"
    f.write_text("stages:\n  a: {type: sft}\n")
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        compose(str(f), [])


def test_unresolvable_interpolation_is_one_config_error():
    with pytest.raises(ConfigError, match=r"recipe 'quickstart': .*no_such_key"):
        compose("quickstart", ["run.name=${no_such_key}"])


REAL_SCALE = ["llama3_8b_student", "qwen3_30b_a3b_student"]


@pytest.mark.parametrize("name", REAL_SCALE)
def test_real_scale_recipes_name_their_hardware_and_fit_it(name, tmp_path, capsys):
    """Each real-scale recipe states its GPUs and passes the memory floor (posttrain.preflight); with
    data files of the right columns (the recipe's own are the user's) it validates."""
    sft, rl, held = tmp_path / "sft.jsonl", tmp_path / "rl.jsonl", tmp_path / "held.jsonl"
    sft.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    held.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    # the RL rewards' columns: math_verify reads answer, code_exec test and entry_point
    rl.write_text('{"prompt": "1+1=", "answer": "2", "test": "", "entry_point": "f"}\n')
    overrides = [f"stages.sft.data.source={sft}", f"stages.rl.data.source={rl}", f"eval.data.source={held}",
                 f"eval.data.eval_source={held}"]  # fmt: skip
    assert main(["validate", f"recipe={name}", *overrides]) == 0
    out = capsys.readouterr().out
    assert "hardware: 8 GPUs x" in out and "fits:" in out


def test_a_recipe_that_cannot_fit_its_gpus_is_refused():
    with pytest.raises(ConfigError, match=r"do not fit its share of a 80 GiB GPU"):
        from posttrain.preflight import check_hardware

        check_hardware(compose("qwen3_30b_a3b_student", ["hardware.gpu_memory_gib=80"]))
    with pytest.raises(ConfigError, match=r"hardware.gpus=8 but the launcher starts 4 ranks"):
        check_hardware(compose("llama3_8b_student", ["launcher.nproc_per_node=4"]))
    # Llama 4 Scout (109B) on one 8 x 80 GiB node: the training state alone is ~200 GiB per GPU
    with pytest.raises(ConfigError, match=r"exceed a 80 GiB GPU|do not fit"):
        check_hardware(
            compose("llama3_8b_student", ["model=llama4_scout", "stages.rl.engine.tensor_parallel_size=8"])
        )
