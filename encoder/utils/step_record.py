"""What a resumable step's folder was made with, so a re-run reuses it only for the same settings.

A step (an arm of a comparison, a stage of the main job) writes `settings.json` into its folder before it
starts and its result only when it succeeds. A re-run with the same settings continues or reuses the folder;
with other settings it stops with one line naming every setting that differs, instead of reporting old
numbers under new settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError

SETTINGS_FILE = "settings.json"


class SettingsChanged(UserError):
    """A folder holds the work of other settings than the ones asked for."""


def normalised(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as JSON gives them back (tuples become lists, keys strings), so records compare equal."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'name: recorded -> wanted' for every setting that differs (or exists on one side only)."""
    recorded, wanted = normalised(recorded), normalised(wanted)
    missing = object()
    return [f"{key}: {recorded.get(key, '(unset)')} -> {wanted.get(key, '(unset)')}"
            for key in sorted(set(recorded) | set(wanted)) if recorded.get(key, missing) != wanted.get(key, missing)]


def claim(folder: Path, settings: dict[str, Any], fix: str) -> bool:
    """Make `folder` the work of `settings`: True when it already was (resume or reuse), False when new.

    Raises SettingsChanged naming the differing settings, with `fix` (e.g. "use another --out") appended.
    """
    from .files import write_atomic

    record = folder / SETTINGS_FILE
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{record} is unreadable ({err}); delete {folder} to redo this step") from None
        changed = differences(recorded, settings)
        if changed:
            raise SettingsChanged(f"{folder} was made with other settings ({'; '.join(changed)}); {fix}")
        return True
    if folder.exists() and any(folder.iterdir()):
        raise SettingsChanged(f"{folder} holds work whose settings are not recorded; {fix}")
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(normalised(settings), indent=1, sort_keys=True) + "\n"
    write_atomic(record, lambda tmp: tmp.write_text(text))
    return False
