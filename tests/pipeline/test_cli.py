"""The command line reads every choice and default from the code that implements it: a CLI
list that differs from its registry, or a default that differs from its config, fails here."""

from __future__ import annotations

import dataclasses

import click
import pytest

from kdcache.pipeline.cli import COMMANDS, main
from kdcache.pipeline.executors import EXECUTORS
from kdcache.stages.capture.config import (
    HEAD_KERNELS,
    HEAD_PRECISIONS,
    TARGETS_ON_OPTIONS,
    CaptureConfig,
)
from kdcache.stages.models.adapters import DTYPES
from kdcache.stages.train.config import TrainConfig
from kdcache.stages.train.distributed import PARALLEL
from kdcache.stages.train.losses import LOSSES
from kdcache.storage.backends import BACKENDS
from kdcache.storage.codecs import CODECS
from kdcache.storage.schema import LOGPROB_DTYPES, TARGET_KINDS

REGISTRIES = {  # (command, option) -> the values its implementation accepts
    ("cache", "backend"): list(BACKENDS),
    ("cache", "codec"): list(CODECS),
    ("cache", "targets"): list(TARGET_KINDS),
    ("cache", "targets_on"): list(TARGETS_ON_OPTIONS),
    ("cache", "logprob_dtype"): list(LOGPROB_DTYPES),
    ("cache", "head_precision"): list(HEAD_PRECISIONS),
    ("cache", "head_kernel"): list(HEAD_KERNELS),
    ("cache", "dtype"): list(DTYPES),
    ("cache", "executor"): list(EXECUTORS),
    ("train", "loss"): list(LOSSES),
    ("train", "parallel"): list(PARALLEL),
    ("convert", "backend"): list(BACKENDS),
    ("convert", "codec"): list(CODECS),
}
CONFIGS = {"cache": CaptureConfig, "train": TrainConfig}
DEFAULT_EXCEPTIONS = {  # (command, option): why its CLI default differs from the config's
    ("cache", "shard_index"): "None: 0 for one process, and an error with --executor dask",
    ("train", "tokenizer_check"): '"on"/"off" on the command line, a bool in the config',
}


def command(name: str) -> click.Command:
    return main.get_command(click.Context(main), name)


def test_every_command_loads_and_is_listed():
    assert set(main.list_commands(click.Context(main))) == set(COMMANDS)
    for name in COMMANDS:
        assert isinstance(command(name), click.Command), name


@pytest.mark.parametrize("name", sorted({c for c, _ in REGISTRIES}))
def test_every_choice_list_is_its_registry(name):
    choices = {
        p.name: list(p.type.choices)
        for p in command(name).params
        if isinstance(p.type, click.Choice)
    }
    for (cmd, option), values in REGISTRIES.items():
        if cmd == name:
            assert choices.pop(option) == values, (name, option)
    assert all(c in (["on", "off"],) for c in choices.values()), f"unchecked choices: {choices}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_default_is_its_configs(name):
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(CONFIGS[name])
        if f.default is not dataclasses.MISSING
    }
    checked = 0
    for p in command(name).params:
        if p.name in defaults and not p.required and not isinstance(p, click.Argument):
            if (name, p.name) in DEFAULT_EXCEPTIONS:
                continue
            assert p.default == defaults[p.name], (name, p.name, p.default, defaults[p.name])
            checked += 1
    assert checked >= 10
