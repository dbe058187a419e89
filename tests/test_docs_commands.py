"""Every command the README and docs/ show still runs as shown.

Each shell line in a fenced block (```bash, ```sh, ```console or plain ```) is taken apart and checked cheaply:
`python -m MODULE ARGS` and `torchrun ... -m MODULE ARGS` are parsed by MODULE's own argument parser (so every
flag shown exists), a training command's config is loaded with its overrides (so every key and preset shown
exists), `make TARGET` must be a Makefile target, and `python -m pytest PATH` must name files that exist. A line
that fits none of these fails, naming its file and line, so the docs cannot rot.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# other programs' commands, shown for context (copying shards to a bucket, installing wheels): not exercised
OTHER_PROGRAMS = {"aws", "pip"}
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class DocCommand:
    where: str  # file:line, what a failure names
    text: str
    output: list[str] = field(default_factory=list)  # a console block's lines after the command


def fenced_shell_lines(path: Path):
    """(line number, language, line) for every line inside a shell-like fenced block of `path`."""
    language = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence:
            language = fence.group(1) if language is None else None
        elif language in SHELL_FENCES:
            yield number, language, line


def doc_commands(path: Path) -> list[DocCommand]:
    """The commands of `path`: comments and blank lines dropped, `\\` continuations joined, a console block's
    `$ ` lines as commands and its other lines as their output."""
    commands, pending = [], None
    for number, language, line in fenced_shell_lines(path):
        text = line.strip()
        if pending is not None:  # the rest of a command continued with a backslash
            pending.text = f"{pending.text[:-1]} {text}"
        elif language == "console" and not text.startswith("$ "):
            if text and commands:
                commands[-1].output.append(text)
            continue
        elif text and not text.startswith("#"):
            pending = DocCommand(f"{path.relative_to(ROOT)}:{number}", text.removeprefix("$ "))
            commands.append(pending)
        if pending is not None and not pending.text.endswith("\\"):
            pending = None
    return commands


def program_words(text: str) -> list[str]:
    """The command's words without its trailing comment and leading `NAME=value` environment assignments."""
    words = shlex.split(text, comments=True)
    while words and ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    return words


ALL_COMMANDS = [command for path in DOC_FILES for command in doc_commands(path)
                if program_words(command.text)[0] not in OTHER_PROGRAMS]


def test_the_docs_show_commands_to_check():
    programs = {program_words(command.text)[0] for command in ALL_COMMANDS}
    assert {"python", "torchrun", "make"} <= programs and len(ALL_COMMANDS) > 40


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[command.where for command in ALL_COMMANDS])
def test_the_documented_command_still_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository root
    words = program_words(command.text)
    if words[0] == "make":
        check_make_target(command, words[1:])
    elif words[0] == "torchrun":
        check_module_command(command, *torchrun_module(command, words[1:]), monkeypatch)
    elif words[0] in ("python", "python3") and words[1:2] == ["-m"] and len(words) > 2:
        check_module_command(command, words[2], words[3:], monkeypatch)
    else:
        pytest.fail(f"{command.where}: cannot tell what `{command.text}` runs (python -m, torchrun or make?)")


def check_make_target(command: DocCommand, arguments: list[str]) -> None:
    result = subprocess.run(["make", "-n", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{command.where}: `make -n {' '.join(arguments)}` fails: {result.stderr}"


def torchrun_module(command: DocCommand, arguments: list[str]) -> tuple[str, list[str]]:
    """torchrun's own options parsed by torchrun's parser; the module it runs and that module's arguments."""
    from torch.distributed.run import parse_args as parse_torchrun_args

    try:
        launch = parse_torchrun_args(arguments)
    except SystemExit as exit:
        pytest.fail(f"{command.where}: torchrun rejects `{' '.join(arguments)}` (exit {exit.code}; see stderr)")
    assert launch.module, f"{command.where}: the docs launch modules with torchrun's -m"
    return launch.training_script, launch.training_script_args


def check_module_command(command: DocCommand, module_name: str, argv: list[str], monkeypatch) -> None:
    if module_name == "pytest":
        check_pytest_paths(command, argv)
        return
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        pytest.fail(f"{command.where}: cannot import {module_name}: {error}")
    try:
        options = parsed_arguments(cli_module(module), argv, monkeypatch)
    except SystemExit as exit:
        pytest.fail(f"{command.where}: {module_name} rejects `{' '.join(argv)}` (exit {exit.code}; see stderr)")
    if module_name == "engine.train":
        check_training_config(command, options, monkeypatch)


def check_pytest_paths(command: DocCommand, argv: list[str]) -> None:
    for word in argv:
        if not word.startswith("-") and ("/" in word or word.endswith(".py")):
            assert (ROOT / word.split("::")[0]).exists(), f"{command.where}: {word} does not exist"


def cli_module(module):
    """The module whose parser a `python -m` of `module` uses: a package's `cli` module where it has one."""
    if hasattr(module, "__path__"):
        try:
            return importlib.import_module(f"{module.__name__}.cli")
        except ModuleNotFoundError:
            pass
    return module


class _Parsed(BaseException):
    """Raised by the stand-in parser: the arguments were parsed, and the command must not run."""


def parsed_arguments(module, argv: list[str], monkeypatch) -> argparse.Namespace | None:
    """`module.parse_args(argv)`; for a CLI without one, its `main(argv)` stopped right after its parser ran."""
    if hasattr(module, "parse_args"):
        return module.parse_args(argv)
    if not inspect.signature(module.main).parameters:  # a CLI that takes no arguments at all
        assert not argv, f"python -m {module.__name__} takes no arguments"
        return None
    for name in ("parse_args", "parse_intermixed_args"):
        original = getattr(argparse.ArgumentParser, name)

        def stop_after_parsing(self, *args, _original=original, **kwargs):
            raise _Parsed(_original(self, *args, **kwargs))

        monkeypatch.setattr(argparse.ArgumentParser, name, stop_after_parsing)
    with pytest.raises(_Parsed) as parsed:
        module.main(argv)
    return parsed.value.args[0]


def check_training_config(command: DocCommand, options: argparse.Namespace, monkeypatch) -> None:
    """The `--dry-run` path's config loading, in this process: the preset, its overrides, their validation. A
    console block's `error: ...` line after the command is the error it must give."""
    import engine.config
    from engine.config import ConfigError, load_config

    # the commands' URLs need optional packages (s3fs, ...) that the docs tell users to install
    url_problem = engine.config.url_problem
    monkeypatch.setattr(engine.config, "url_problem",
                        lambda location: None if "pip install" in (url_problem(location) or "") else url_problem(location))
    expected_error = next((line.removeprefix("error: ") for line in command.output if line.startswith("error: ")), None)
    try:
        load_config(options.config, options.overrides)
    except ConfigError as error:
        assert str(error) == expected_error, f"{command.where}: {error}"
        return
    assert expected_error is None, f"{command.where}: loads without the error the docs show: {expected_error}"


def test_the_extractor_joins_continuations_and_reads_console_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text("```bash\n# a comment\nPYTHONPATH=. python -m a.b x \\\n    --flag  # why\nmake test\n```\n"
                    "```python\npython -m not.a.command\n```\n"
                    "```console\n$ python -m c.d\nerror: what it says\n```\n")
    found = doc_commands(page)
    assert [(command.where, program_words(command.text)) for command in found] == [
        ("page.md:3", ["python", "-m", "a.b", "x", "--flag"]), ("page.md:5", ["make", "test"]),
        ("page.md:11", ["python", "-m", "c.d"])]
    assert found[2].output == ["error: what it says"]
