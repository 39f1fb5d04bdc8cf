"""The command line: options generated from `Settings` and complete; the training log as a terminal shows it."""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_k8s.cli import build_parser, command_fields, option_help
from mnist_k8s.config import Settings

from helpers import CLI, ROOT, SAMPLE, cli_env

PACKAGE = ROOT / "mnist_k8s"
# Modules that read `Settings` for training (the training notebook gets its parameters from the pipeline);
# every other module that reads a field serves.
TRAINING = {"pipeline.py"}
NOT_COMMANDS = {"cli.py", "config.py", "dev.py", "_modidx.py", "__init__.py"}


def help_text(command: str) -> str:
    "`mnist-k8s <command> --help`, with argparse's line wrapping undone."
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(out.getvalue().split())


def fields_read(module: Path) -> set[str]:
    "The `Settings` fields `module` reads (`settings.port`, `self.settings.port`, `s.epochs`)."
    source = module.read_text()
    return {name for name in Settings.model_fields if re.search(rf"\b(settings|s)\.{name}\b", source)}


def used_by(command: str) -> set[str]:
    modules = [p for p in PACKAGE.glob("*.py") if p.name not in NOT_COMMANDS]
    wanted = [p for p in modules if (p.name in TRAINING) == (command == "train")]
    return set().union(*map(fields_read, wanted))


@pytest.mark.parametrize("command", ["train", "serve", "up"])
def test_help_lists_every_setting_the_command_uses_with_its_default(command):
    text = help_text(command)
    uses = used_by("train") | used_by("serve") if command == "up" else used_by(command)
    assert uses, f"no module reads settings for {command}?"
    assert uses <= set(command_fields(command)), uses - set(command_fields(command))
    for name in command_fields(command):
        line = " ".join(option_help(name).replace("%%", "%").split())
        assert "--" + name.replace("_", "-") in text and line in text, (command, name)
        assert "[default: " in line or Settings.model_fields[name].default is None, line
    assert "[default: 12; env MNIST_K8S_EPOCHS]" in help_text("train")


def test_training_and_serving_options_do_not_leak_into_each_other():
    assert "--port" not in help_text("train") and "--epochs" not in help_text("serve")


def terminal_lines(raw: bytes) -> list[str]:
    "The lines a terminal would show for `raw` output: each carriage return starts its line over."
    return [line.split("\r")[-1] for line in raw.decode().split("\n")]


@pytest.mark.slow
def test_training_log_reads_as_one_story(tmp_path):
    "Epoch lines stand on their own, the final accuracy is the last epoch's, staged then published, no kernel noise."
    env = cli_env(data_root=SAMPLE, model_dir=tmp_path / "models", download="false", epochs=2, limit=400,
                  test_limit=200, torch_threads=1)
    proc = subprocess.run([sys.executable, "-c", CLI, "train"], env=env, cwd=ROOT, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert b"without encryption" not in proc.stdout + proc.stderr, proc.stderr.decode()
    assert b"[IPKernelApp]" not in proc.stdout + proc.stderr, proc.stderr.decode()
    lines = terminal_lines(proc.stdout)
    epochs = [line for line in lines if "epoch 1/2:" in line or "epoch 2/2:" in line]
    assert len(epochs) == 2 and all(line.startswith("epoch ") for line in epochs), epochs
    last = re.search(r"test accuracy (\d+\.\d+%)", epochs[-1]).group(1)
    (final,) = [line for line in lines if line.startswith("trained: test accuracy")]
    assert f"trained: test accuracy {last} " in final, (epochs[-1], final)
    staged = next(i for i, line in enumerate(lines) if line.startswith("staged version "))
    version = lines[staged].split()[2]
    assert "becomes latest once this report is stored" in lines[staged]
    assert lines[staged + 1].startswith(f"published version {version} as latest"), lines[staged:staged + 2]
