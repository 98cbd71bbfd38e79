"""The README works as written: its Python snippets run, every so3lib command line in it and in the command
guide parses with the options it names, and its config-file examples load."""

import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from so3lib.cli import parse

README = (ROOT / "README.md").read_text()
GUIDE = (ROOT / "docs" / "commands.md").read_text()
CLUSTER = (ROOT / "docs" / "cluster.md").read_text()


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def command_lines(text: str) -> list[list[str]]:
    """Every `so3lib ...` line of the bash blocks, without its comment (and without a leading `srun`)."""
    out = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
            line = line.split("  #")[0].strip().removeprefix("srun ")
            if line.startswith("so3lib "):
                out.append(shlex.split(line)[1:])
    return out


def test_readme_opens_with_the_two_set_up_commands():
    first = blocks(README, "bash")[0].strip().splitlines()
    assert len(first) == 2
    assert first[0].startswith("pip install -e . && python -m experiments.spice")
    assert first[1].startswith('pip install -e ".[test]" && python -m pytest')


@pytest.mark.parametrize(
    "argv", command_lines(README) + command_lines(GUIDE) + command_lines(CLUSTER), ids=lambda a: " ".join(a[:3])
)
def test_every_documented_command_line_parses(argv):
    p = parse(argv)
    assert p.command.name == argv[0]


def test_config_examples_load(tmp_path):
    (yaml_readme,) = blocks(README, "yaml")
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml_readme)
    p = parse(["train", "--config", str(f)])
    assert p.model.name == "so3krates" and p.model.l_max == 2 and p.training.max_steps == 2000
    assert p.options.energy_key == "REF_energy" and p.options.e0s == "average"
    from so3lib.workflows.sweeps import SweepOptions, build_sweep

    (yaml_guide,) = blocks(GUIDE, "yaml")
    f.write_text(yaml_guide)
    sweep = build_sweep(SweepOptions(sweep=str(f)))
    assert sweep.model == "so3krates" and len(sweep.points()) == 6 and sweep.seeds == [0, 1]


@pytest.mark.parametrize("snippet", blocks(README, "python"), ids=lambda s: s.splitlines()[1][:40])
def test_python_snippets_run(snippet, tmp_path):
    r = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "validation force MAE" in r.stdout and "(9, 3)" in r.stdout
