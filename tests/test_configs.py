"""Every shipped config in configs/ parses with today's `TrainConfig`, keeping each value as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loopfit.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _subset(written, printed) -> bool:
    if isinstance(written, dict):
        return isinstance(printed, dict) and all(k in printed and _subset(v, printed[k]) for k, v in written.items())
    return written == printed


def _print_config(path, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(path), "--print_config"])
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def test_configs_exist():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_keeps_its_values(path, capsys):
    code, out = _print_config(path, capsys)
    assert code == 0, out
    assert _subset(yaml.safe_load(path.read_text()), yaml.safe_load(out))


def test_a_stale_key_fails(tmp_path, capsys):
    """The check above can fail: a key `TrainConfig` no longer has is refused with one line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIGS[0].read_text() + "mean_recurrence_shedule: 3\n")
    code, out = _print_config(bad, capsys)
    assert code != 0 and "mean_recurrence_shedule" in out


def test_the_mix_config_is_the_heal_config_on_other_data():
    """configs/heal-smol-mix.yaml is a whole config (it runs alone), so nothing but this keeps it the recipe of
    configs/heal-smol.yaml: the two may differ only in the data they read and where they write."""
    configs = {p.name: yaml.safe_load(p.read_text()) for p in CONFIGS}
    base, mix = configs["heal-smol.yaml"], configs["heal-smol-mix.yaml"]
    assert base.keys() == mix.keys()
    differ = {k for k in base if base[k] != mix[k]}
    assert differ == {"out", "data", "chat", "assistant_only"}
