"""The typed run config: built once from the ConfigDict, naming the key of any unknown or mistyped value."""

import dataclasses

import ml_collections
import pytest

from lima_jax.config import run_config, validate
from lima_jax.errors import ConfigError
from tests.tiny_run import tiny_config


def test_typed_config_holds_the_configdict_values():
    c = tiny_config(epochs=3, keep_epochs=[1, 2])  # a list where the default is a tuple
    c.lora.update(rank=4, targets=["q", "v"])
    run = validate(c, 8)
    for section in ("mesh", "data", "optimizer", "train"):
        typed = dataclasses.asdict(getattr(run, section))
        assert typed == {k: tuple(v) if isinstance(v, list) else v for k, v in c[section].to_dict().items()}
    assert run.train.keep_epochs == (1, 2) and run.lora.targets == ("q", "v") and run.lora.rank == 4
    assert (run.model.dim, run.seed, run.init_checkpoint) == (c.model.dim, c.seed, "")
    c.lora.rank = 0
    assert run_config(c).lora is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.epochs = 4


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "max_step", 5, r"config\.train\.max_step: unknown key; config\.train has epochs, max_steps"),
    ("model", "n_layer", 2, r"config\.model\.n_layer: unknown key"),
    ("lora", "ranks", 2, r"config\.lora\.ranks: unknown key"),
    ("data", "dev_path", 3, r"config\.data\.dev_path=3: must be str, not int"),
    ("train", "async_checkpointing", "no", r"config\.train\.async_checkpointing='no': must be bool, not str"),
    ("model", "scan_layers", 1, r"config\.model\.scan_layers=1: must be bool, not int"),
    ("train", "keep_epochs", 5, r"config\.train\.keep_epochs=5: must be tuple, not int"),
])
def test_unknown_or_mistyped_keys_are_named(section, key, value, message):
    c = tiny_config()
    # a config file can build a section by hand (overrides are type-checked by ml_collections already)
    c[section] = ml_collections.ConfigDict({**c[section].to_dict(), key: value})
    with pytest.raises(ConfigError, match=message):
        validate(c, 8)


def test_unknown_top_level_key_is_named():
    c = tiny_config()
    c.init_checkpiont = "x"
    with pytest.raises(ConfigError, match=r"config\.init_checkpiont: unknown key"):
        run_config(c)


@pytest.mark.parametrize("train, data, message", [
    (dict(select=True, judge_model="m"), {}, r"config\.train\.select=True needs config\.train\.judge_url"),
    (dict(select=True, judge_url="http://x", judge_model="m", eval_every_epoch=False), {},
     r"needs config\.train\.eval_every_epoch=True"),
    (dict(select=True, judge_url="http://x", judge_model="m", keep_epochs=(20,), epochs=3), {},
     r"compares the kept epochs .* keep at least two"),
    (dict(select=True, judge_url="http://x", judge_model="m"), dict(dev_size=0), r"needs dev prompts"),
])
def test_epoch_selection_is_checked_before_the_run(train, data, message):
    c = tiny_config(**{"eval_every_epoch": True, **train})
    c.data.update(data)
    with pytest.raises(ConfigError, match=message):
        run_config(c)
    ok = run_config(tiny_config(select=True, judge_url="http://x", judge_model="m", eval_every_epoch=True,
                                keep_epochs=(14, 20)))
    assert ok.train.selected_epochs() == [14, 15]  # the kept epochs within the run, and the last
