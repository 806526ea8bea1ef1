"""Every command line the documentation shows still parses, and the ones that can run here run.

Sources: the shell code blocks of README.md (fenced `bash` blocks and indented blocks), the `--help` text of
every command, and the code blocks of the model card `upcycle sparse` writes. Each command is resolved to
the Python entry point it ends in (through `bash scripts/X.sh`'s exec line, `accelerate launch` / `torchrun`
launchers) and its arguments go through that entry point's real parser, and for LLaVA training through its
validation too. Commands that need no GPU, hub or hours also run, in a scratch folder, with hub ids and
data paths mapped to tiny local stand-ins (`STAND_INS`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

ROOT = REPO_ROOT
README = ROOT / "README.md"
PLACEHOLDERS = {"...", "\\"}
LAUNCHER_FLAGS_WITH_VALUE = {"--num_processes", "--nproc_per_node", "--deepspeed_config_file", "--config_file",
                             "--main_process_port", "--num_machines", "--mixed_precision", "--nnodes"}


def shell_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced bash/sh block and each indented block outside fences."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if fence.group(1) in ("bash", "sh", "shell", "console"):
                blocks.append((i + 2, "\n".join(lines[i + 1 : j])))
            i = j + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            blocks.append((i + 1, "\n".join(l[4:] for l in lines[i:j])))
            i = j
            continue
        i += 1
    return blocks


def commands_in(text: str, first_line: int = 1) -> list[tuple[int, str]]:
    """Shell commands of a block: continuation lines joined, comments and `# -> output` notes dropped."""
    out, current, start = [], "", first_line
    for offset, raw in enumerate(text.splitlines()):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not current:
            start = first_line + offset
        if not line.strip():
            if current:
                out.append((start, current.strip()))
                current = ""
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        out.append((start, current.strip()))
        current = ""
    if current:
        out.append((start, current.strip()))
    return [(n, c) for n, c in out if re.match(r"^(bash|python|accelerate|torchrun|deepspeed)\b", c)]


def script_entry(script: Path) -> list[str]:
    """The `python -m MODULE [COMMAND]` a thin shell script execs (read from its exec line)."""
    match = re.search(r'^exec .*?/bin/python" (-m \S+(?: \w[\w-]*)?|\S+\.py) "\$@"', script.read_text(), re.M)
    assert match, f"{script} has no `exec .../bin/python -m MODULE \"$@\"` line"
    words = match.group(1).split()
    return words[1:] if words[0] == "-m" else ["script:" + words[0]]


def resolve(command: str) -> tuple[str, list[str]]:
    """(entry point, argv): 'upcycle', 'mllm_bridge', 'mllm_bridge.train', 'lmms_eval', 'script:PATH', 'pytest'.

    Launchers (accelerate launch, torchrun, the deepspeed launcher) are skipped up to the module they start."""
    words = [w for w in shlex.split(command) if w not in PLACEHOLDERS]
    if ">" in words:
        words = words[: words.index(">")]
    words = [w.strip("[]") for w in words]
    if words[0] == "bash":
        script = ROOT / words[1]
        assert script.is_file(), f"{words[1]} does not exist"
        if script.name == "test.sh":
            return "pytest", words[2:]
        entry = script_entry(script)
        module, rest = entry[0], entry[1:]
        return module, rest + words[2:]
    if words[0] == "deepspeed":  # deepspeed [--num_gpus N ...] --module MODULE ARGS
        assert "--module" in words, f"no --module MODULE in {command!r}"
        i = words.index("--module")
        return words[i + 1], words[i + 2 :]
    if words[0] in ("accelerate", "torchrun"):
        i = 2 if words[0] == "accelerate" else 1
        while i < len(words) and words[i] != "-m":
            i += 2 if words[i] in LAUNCHER_FLAGS_WITH_VALUE else 1
        assert i < len(words), f"no -m MODULE in {command!r}"
        return words[i + 1], words[i + 2 :]
    assert words[0] == "python", command
    if words[1] == "-m":
        return words[2], words[3:]
    assert (ROOT / words[1]).is_file(), f"{words[1]} does not exist"
    return "script:" + words[1], words[2:]


def check_parses(entry: str, argv: list[str], monkeypatch) -> None:
    """Run argv through the entry point's own parser (and LLaVA training's validation); fail on any error."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if entry in ("upcycle", "mllm_bridge", "encoder"):
                cli = __import__(f"{entry}.cli", fromlist=["build_parser"])
                cli.build_parser().parse_args(argv)
            elif entry == "mllm_bridge.train":
                from mllm_bridge.train.arguments import split_arguments
                from mllm_bridge.train.cli import _is_embedded, build_parser

                namespace = build_parser(argv=argv).parse_args(argv)
                if not _is_embedded(namespace):
                    split_arguments(namespace)
            elif entry == "lmms_eval":
                from lmms_eval.__main__ import parse_eval_args

                monkeypatch.setattr(sys, "argv", ["lmms_eval", *argv])
                parse_eval_args()
            elif entry == "pytest":
                assert not argv or argv[0].startswith("-"), argv
            elif entry.startswith("script:"):
                result = subprocess.run([sys.executable, str(ROOT / entry[7:]), *argv, "--help"],
                                        capture_output=True, text=True, timeout=120)
                assert result.returncode == 0, result.stderr
            else:
                raise AssertionError(f"unknown entry point {entry!r}")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise AssertionError(f"{entry} {shlex.join(argv)}: {stderr.getvalue().strip()}") from None


def readme_commands() -> list[tuple[int, str]]:
    found = []
    for first, block in shell_blocks(README.read_text()):
        found += commands_in(block, first)
    return found


README_COMMANDS = readme_commands()


def test_the_readme_shows_its_two_fresh_machine_commands_and_the_gpu_recipes():
    shown = [c for _, c in README_COMMANDS]
    assert shown[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert len(shown) >= 25 and any(c.startswith("accelerate launch") for c in shown)


@pytest.mark.parametrize("line, command", README_COMMANDS, ids=[f"README:{n}" for n, _ in README_COMMANDS])
def test_readme_command_parses(line, command, monkeypatch):
    entry, argv = resolve(command)
    check_parses(entry, argv, monkeypatch)


def help_texts() -> list[tuple[str, str]]:
    """(command, prose) for every command of every entry point: description, epilog and each option's help,
    unwrapped (the usage line is generated from the parser itself, so it is left out)."""
    import argparse

    from encoder.cli import build_parser as encoder_parser
    from mllm_bridge.cli import build_parser as bridge_parser
    from mllm_bridge.train.cli import build_parser as train_parser
    from upcycle.cli import build_parser as upcycle_parser

    def prose(parser) -> str:
        parts = [parser.description or "", parser.epilog or ""]
        parts += [action.help or "" for action in parser._actions if isinstance(action.help, str)]
        return "\n".join(parts)

    texts = []
    pending = [upcycle_parser(), bridge_parser(), train_parser(), encoder_parser()]
    while pending:
        parser = pending.pop()
        texts.append((parser.prog, prose(parser)))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += list(action.choices.values())
    return texts


def commands_in_prose(text: str) -> list[str]:
    """Command lines inside prose: from `python -m` / `bash scripts/` / `accelerate launch` up to a backtick,
    a semicolon, a bracket or a sentence end."""
    flat = re.sub(r"\s*\n\s*", " ", text)
    found = re.findall(r"((?:python -m|bash scripts/|accelerate launch)[^`;()]*?)(?=`|;|\)|\.\s+[A-Z]|\.$|$)", flat)
    return [c.strip().rstrip(".,:") for c in found if c.strip()]


def test_every_command_line_in_help_texts_parses(monkeypatch):
    checked = []
    for prog, text in help_texts():
        for command in commands_in_prose(text):
            if command.startswith("accelerate launch") and " -m " not in command:
                continue  # launcher flags quoted on their own ("started by `accelerate launch --use_deepspeed ...`")
            entry, argv = resolve(command)
            # A bare reference ("write it with `python -m upcycle make-digit-grids`") names a command: it must exist.
            check_parses(entry, argv if "--" in command else [*argv, "--help"], monkeypatch)
            checked.append(command)
    assert len(checked) >= 5, checked


# Commands that run here, as written, once their hub ids and data paths are mapped to tiny stand-ins.
RUNNABLE = ("upcycle sparse --base openai", "upcycle make-digit-grids", "mllm_bridge make-lmms-task",
            "mllm_bridge check", "mllm_bridge swap-tower", "upcycle eval --model clip-moe-dmu --data coco_test.json",
            "upcycle routing")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, dense_clip_dir, clip_moe_dir, llava_moe_dir, grids_dir, base_clip_dir):
    from upcycle.cli import main as upcycle_main

    scratch = tmp_path_factory.mktemp("readme")
    checkpoint = scratch / "checkpoints" / "llava-v1.5-7b"
    shutil.copytree(llava_moe_dir, checkpoint)
    with_tokenizer = scratch / "stand-in-clip-moe"  # eval and routing encode captions: a base with a tokenizer
    assert upcycle_main(["sparse", "--base", str(base_clip_dir), "--out", str(with_tokenizer), "--num-experts", "2",
                         "--top-k", "1"]) == 0
    return scratch, {
        "openai/clip-vit-large-patch14-336": str(dense_clip_dir),
        "openai/clip-vit-base-patch16": str(dense_clip_dir),
        "checkpoints/llava-v1.5-7b": str(checkpoint),
        "clip-moe-l14-336": str(clip_moe_dir),
        "clip-moe-dmu": str(with_tokenizer),
        "coco_test.json": str(grids_dir / "test.json"),
    }


def runnable_readme_commands() -> list[tuple[int, str]]:
    return [(n, c) for n, c in README_COMMANDS if any(key in c for key in RUNNABLE)]


@pytest.mark.slow
@pytest.mark.parametrize("line, command", runnable_readme_commands(),
                         ids=[f"README:{n}" for n, _ in runnable_readme_commands()])
@pytest.mark.end_to_end
def test_readme_command_runs_with_stand_ins(line, command, stand_ins):
    scratch, mapping = stand_ins
    words = [mapping.get(w, w).strip("[]") for w in shlex.split(command) if w not in PLACEHOLDERS]
    entry, argv = resolve(shlex.join(words))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", entry, *argv], cwd=scratch, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


@pytest.mark.end_to_end
def test_model_card_command_lines_parse(tmp_path, dense_clip_dir, monkeypatch):
    out = tmp_path / "card-moe"
    result = subprocess.run([sys.executable, "-m", "upcycle", "sparse", "--base", str(dense_clip_dir), "--out",
                             str(out), "--num-experts", "2", "--top-k", "1"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    card = (out / "README.md").read_text()
    commands = [c for first, block in shell_blocks(card) for _, c in commands_in(block, first)]
    commands += [c for c in commands_in_prose(card) if "--" in c]
    for command in commands:
        entry, argv = resolve(command)
        check_parses(entry, argv, monkeypatch)
