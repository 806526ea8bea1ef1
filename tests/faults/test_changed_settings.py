"""Fault tier, changed settings: a step folder is reused only for the settings that made it."""

import json

import pytest

from encoder.errors import UserError
from encoder.step_record import SETTINGS_FILE, SettingsChanged, claim, differences


def test_a_folder_is_claimed_once_and_reused_only_for_equal_settings(tmp_path):
    folder = tmp_path / "arm"
    settings = {"lr": 1e-4, "layers": (0, 2), "arm": "dense"}
    assert claim(folder, settings, "use another --out") is False
    assert json.loads((folder / SETTINGS_FILE).read_text())["layers"] == [0, 2]
    assert claim(folder, dict(settings), "use another --out") is True  # tuples and lists compare equal
    with pytest.raises(SettingsChanged, match=r"other settings \(lr: 0.0001 -> 0.1\); use another --out"):
        claim(folder, {**settings, "lr": 0.1}, "use another --out")
    with pytest.raises(SettingsChanged, match=r"extra: \(unset\) -> 1"):
        claim(folder, {**settings, "extra": 1}, "fix")


def test_a_folder_with_work_but_no_record_is_not_taken_for_ours(tmp_path):
    folder = tmp_path / "arm"
    folder.mkdir()
    (folder / "checkpoint-1").mkdir()
    with pytest.raises(SettingsChanged, match="settings are not recorded"):
        claim(folder, {"lr": 1}, "delete it")
    (folder / "checkpoint-1").rmdir()
    assert claim(folder, {"lr": 1}, "delete it") is False  # an empty folder is free


def test_an_unreadable_record_is_one_line(tmp_path):
    folder = tmp_path / "arm"
    folder.mkdir()
    (folder / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(UserError, match="is unreadable"):
        claim(folder, {"lr": 1}, "fix")


def test_differences_name_every_changed_setting_in_order():
    assert differences({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}) == [
        "b: 2 -> 5", "c: 3 -> (unset)", "d: (unset) -> 4"]
