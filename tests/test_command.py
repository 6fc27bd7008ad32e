"""The `alexnet-jax` command: its subcommands, and `train`'s flags made from `TrainConfig`'s fields.

What each subcommand does is tested through the scripts that wrap it (test_cli, test_classify_cli,
test_lpips, test_train_loop, ...); here: the table of subcommands, usage errors, `python -m
alexnet_jax`, the `train` extra, and the flags' round trip. Nothing here compiles a model.
"""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from alexnet_jax import cli
from alexnet_jax.cli.flags import add_dataclass_flags, dataclass_from_flags, flag_name
from alexnet_jax.training.config import TrainConfig

from helpers import REPO, run_python

FIELDS = dataclasses.fields(TrainConfig)
# Two configs between which every field takes a value other than its library and CLI defaults
# (one config cannot: --arch 2012 allows only the two default conv algorithms).
PAPER = TrainConfig(
    data="train",
    val_data="val",
    epochs=7,
    batch_size=64,
    lr=0.005,
    image_size=240,
    init="paper",
    init_from="start.msgpack",
    num_classes=12,
    seed=3,
    recipe="torchvision",
    arch="2012",
    colour_pca="folder",
    eval_crops=10,
    decode="exact",
    allow_data_change=True,
    weight_decay=2e-4,
    lr_step_epochs=5,
    patience=2,
    freeze_features=True,
    workers=2,
    save_every=0,
    keep=1,
    progress=False,
    parallel="sharded",
    micro_batches=4,
    conv_algorithm="xla",
)
TORCHVISION = dataclasses.replace(
    PAPER, arch="torchvision", image_size=100, recipe="paper", colour_pca="none", conv_algorithm="winograd", init=None
)


def _flags(config: TrainConfig) -> list[str]:
    """The command line that asks for `config`: a flag per field that is not None."""
    argv = []
    for field in FIELDS:
        value = getattr(config, field.name)
        if isinstance(value, bool):
            argv.append(flag_name(field) if value else "--no-" + flag_name(field)[2:])
        elif value is not None:
            argv += [flag_name(field), str(value)]
    return argv


def _train_args(*argv: str):
    return cli.parse(["train", "--workdir", "runs/a", *argv])


def test_every_field_of_train_config_is_a_flag_with_help():
    _, parsers = cli.build_parser()
    usage = parsers["train"].format_help()
    for field in FIELDS:
        assert field.metadata["help"].strip(), field.name
        assert f"{flag_name(field)} " in usage or f"{flag_name(field)}," in usage, field.name


def test_the_two_configs_ask_for_every_field():
    for field in FIELDS:
        defaults = (field.default, field.metadata.get("cli_default", field.default))
        assert any(getattr(config, field.name) not in defaults for config in (PAPER, TORCHVISION)), field.name


@pytest.mark.parametrize("config", [PAPER, TORCHVISION], ids=["2012", "torchvision"])
def test_the_flags_give_back_the_config(config):
    args = _train_args(*_flags(config))
    assert args.config == config
    assert dataclass_from_flags(TrainConfig, args) == config


def test_left_out_flags_are_the_library_defaults_but_where_the_field_says():
    args = _train_args("--data", "train", "--val-data", "val")
    cli_defaults = {f.name: f.metadata["cli_default"] for f in FIELDS if "cli_default" in f.metadata}
    assert set(cli_defaults) == {"workers", "conv_algorithm"}
    assert args.config == TrainConfig(data="train", val_data="val", **cli_defaults)
    assert cli_defaults["conv_algorithm"] == "auto" and TrainConfig.conv_algorithm == "xla"


def test_train_config_checks_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        _train_args("--data", "t", "--val-data", "v", "--arch", "2012", "--image-size", "224")
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "alexnet-jax train: error: image-size must be 227 to 256 for --arch 2012 "
        "(a crop of its 256x256 images with a 6x6 conv5 map), got 224"
    )


def test_a_field_without_help_or_of_another_type_is_refused():
    import argparse

    @dataclasses.dataclass
    class Silent:
        size: int = 1

    @dataclasses.dataclass
    class Listy:
        sizes: list[int] = dataclasses.field(default_factory=list, metadata={"help": "sizes"})

    with pytest.raises(TypeError, match=r"Silent.size has no metadata\['help'\]"):
        add_dataclass_flags(argparse.ArgumentParser(), Silent)
    with pytest.raises(TypeError, match="Listy.sizes: a flag takes bool, int, float, str, not list"):
        add_dataclass_flags(argparse.ArgumentParser(), Listy)


@pytest.mark.parametrize("argv, message", [([], "required: COMMAND"), (["bogus"], "invalid choice: 'bogus'")])
def test_no_or_an_unknown_subcommand_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: alexnet-jax [-h] COMMAND ...") and message in err


def test_the_entry_point_is_cli_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"alexnet-jax": "alexnet_jax.cli:main"}


def test_help_lists_each_subcommand_in_one_line():
    run = run_python(["-m", "alexnet_jax", "--help"], env={"COLUMNS": "80"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for name, module in cli.SUBCOMMANDS.items():
        summary = module.__doc__.splitlines()[0].rstrip(".")
        assert [line.split(None, 1) for line in lines if line.strip().startswith(name + " ")] == [[name, summary]]


# `python -m alexnet_jax ARGS` (runpy is what -m runs) with Grain and Orbax made unimportable.
_WITHOUT_TRAIN_EXTRA = """
import runpy, sys
sys.modules.update(dict.fromkeys(["grain", "orbax", "orbax.checkpoint"]))
sys.argv = ["alexnet-jax", *sys.argv[1:]]
runpy.run_module("alexnet_jax", run_name="__main__", alter_sys=True)
"""


# Each subcommand up to its first failure: one line, exit 1.
_RUNS = {
    "convert": (["--checkpoint", "missing.pth", "--output", "o.msgpack"], "missing.pth: no such file"),
    "classify": (["--weights", "missing.msgpack", "a.jpg"], "missing.msgpack: no such file"),
    "lpips": (["--weights", "missing.msgpack", "a.png", "b.png"], "missing.msgpack: no such file"),
    "export": (
        ["--weights", "missing.msgpack", "--format", "onnx", "--output", "o.onnx"],
        "missing.msgpack: no such file",
    ),
    "train": (["--data", "t", "--val-data", "v", "--workdir", "w"], "training needs the train extra: pip install"),
    "pack": (["src", "--output", "o"], "pack needs the train extra: pip install"),
}


def test_every_subcommand_is_tried_below():
    assert set(_RUNS) == set(cli.SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(_RUNS))
def test_each_subcommand_runs_from_python_m_and_only_train_and_pack_need_the_train_extra(name, tmp_path):
    argv, error = _RUNS[name]
    run = run_python(["-c", _WITHOUT_TRAIN_EXTRA, name, *argv], cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and error in run.stderr, run.stderr
