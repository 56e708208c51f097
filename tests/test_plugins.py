"""Plugin discovery: entry points of installed distributions, broken plugins, BIWM_DISABLE_PLUGINS."""

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import biwm_cmd, subprocess_env, tiny_recipe


def make_distribution(site: Path, dist: str, module: str, body: str, version: str = "9.9.1") -> None:
    """Install a minimal distribution into ``site``: a module plus dist-info with an entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[biwm]\n{module} = {module}\n")
    (info / "RECORD").write_text("")


GOOD = """
    from pydantic import BaseModel
    from biwm.core import hookimpl

    class Opts(BaseModel):
        gain: float = 1.0

    class Echo:
        def __init__(self, options, backbone=None):
            self.options = options

    @hookimpl
    def register_controls(register):
        register("echo", Echo, options=Opts, description="test control from a third-party distribution")
"""
BROKEN = """
    raise RuntimeError("this plugin is broken on purpose")
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "biwm-echo", "biwm_echo_plugin", GOOD)
    make_distribution(site, "biwm-broken", "biwm_broken_plugin", BROKEN, version="0.0.1")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_builtins_and_backbones_are_listed():
    from biwm.core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    assert pm.get("backbone", "wan").distribution == "biwm-backbones"
    for name in ("plucker", "actions"):
        spec = pm.get("control", name)
        assert spec.distribution == "biwm-core" and spec.version != "unknown"
    assert pm.get("compressor", "none").distribution == "biwm-core"


def test_third_party_distribution_is_discovered_and_broken_one_reported(site):
    from biwm.core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    spec = pm.get("control", "echo")
    assert (spec.distribution, spec.version, spec.plugin) == ("biwm-echo", "9.9.1", "biwm_echo_plugin")
    made = spec.create({"gain": 2})
    assert made.options.gain == 2.0
    statuses = {s.name: s for s in pm.statuses()}
    assert statuses["biwm_broken_plugin"].status == "broken"
    assert "broken on purpose" in statuses["biwm_broken_plugin"].error
    assert statuses["biwm_echo_plugin"].status == "ok"
    assert pm.get("backbone", "wan")  # the rest keep working


def test_disable_plugins_env(site, monkeypatch):
    from biwm.core.plugins import UnknownPluginError, get_plugin_manager

    monkeypatch.setenv("BIWM_DISABLE_PLUGINS", "biwm_echo_plugin, backbones")
    pm = get_plugin_manager()
    with pytest.raises(UnknownPluginError, match="unknown control 'echo'; allowed: actions, plucker"):
        pm.get("control", "echo")
    with pytest.raises(UnknownPluginError, match=r"unknown backbone 'wan'; allowed: \(none installed\)"):
        pm.get("backbone", "wan")
    assert {s.name: s.status for s in pm.statuses()}["biwm_echo_plugin"] == "disabled"


def test_list_plugins_json_cli(site):
    out = subprocess.run(biwm_cmd() + ["list-plugins", "--json"], capture_output=True, text=True,
                         env=subprocess_env(PYTHONPATH=str(site)), check=True)
    rows = json.loads(out.stdout)
    by_name = {(r["kind"], r["name"]): r for r in rows}
    assert by_name[("backbone", "wan")]["distribution"] == "biwm-backbones"
    assert by_name[("control", "echo")]["version"] == "9.9.1"
    broken = [r for r in rows if r["status"] == "broken"]
    assert [r["name"] for r in broken] == ["biwm_broken_plugin"]
    assert broken[0]["distribution"] == "biwm-broken"


def test_broken_plugin_does_not_stop_run(site, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", finetune={"steps": 1})
    recipe["stages"] = recipe["stages"][:1]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(biwm_cmd() + ["run", str(path)], capture_output=True, text=True,
                          env=subprocess_env(PYTHONPATH=str(site), COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    assert "biwm_broken_plugin" in proc.stderr and "broken" in proc.stderr
    assert (tmp_path / "run" / "finetune" / "model.safetensors").is_file()


COMMANDS = """
    import typer
    from biwm.core import hookimpl

    def hello(name: str = typer.Argument(..., help="who"), times: int = typer.Option(1, help="how often")):
        for _ in range(times):
            print(f"hello {name}")

    group = typer.Typer()

    @group.command()
    def ping():
        print("pong")

    def run():
        print("a plugin must not replace biwm run")

    @hookimpl
    def register_commands(register):
        register("hello", hello, description="greets from a third-party distribution")
        register("tool", group, description="a group of subcommands")
        register("run", run)
"""


def test_a_distribution_adds_cli_commands_and_cannot_replace_built_in_ones(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "biwm-hello", "biwm_hello_plugin", COMMANDS)
    env = subprocess_env(PYTHONPATH=str(site), COLUMNS="200")

    def cli(*args):
        return subprocess.run(biwm_cmd() + list(args), capture_output=True, text=True, env=env)

    out = cli("hello", "world", "--times", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["hello world", "hello world"]
    assert cli("tool", "ping").stdout.strip() == "pong"
    shown = cli("--help")
    assert "greets from a third-party distribution" in shown.stdout and "tool" in shown.stdout
    assert "registers command 'run', which BiWM already has; left out" in shown.stderr
    assert "must not replace" not in cli("run", "--help").stdout  # the built-in run
    rows = json.loads(cli("list-plugins", "--json").stdout)
    assert {"kind": "command", "name": "hello", "distribution": "biwm-hello"}.items() <= \
        next(r for r in rows if r["name"] == "hello").items()
    missing = cli("hello")
    assert missing.returncode != 0 and "Missing argument 'name'" in missing.stderr


GROUP_A = """
    import typer
    from biwm.core import hookimpl

    group = typer.Typer()

    @group.command()
    def ping():
        print("pong")

    @group.command()
    def shared():
        print("a")

    @hookimpl
    def register_commands(register):
        register("tool", group, description="A's tools")
"""
GROUP_B = GROUP_A.replace('print("pong")', 'print("pang")').replace("def ping", "def pang").replace(
    'print("a")', 'print("b")').replace("A's tools", "B's tools")


def test_two_plugins_share_a_command_group(tmp_path):
    """Two distributions that both register a ``tool`` group (as biwm-toyworld and biwm-data both add
    ``biwm data`` subcommands) get one group with the subcommands of both; a subcommand both define
    stays the first's, with a warning naming both plugins."""
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "biwm-tool-a", "biwm_tool_a", GROUP_A)
    make_distribution(site, "biwm-tool-b", "biwm_tool_b", GROUP_B)
    env = subprocess_env(PYTHONPATH=str(site), COLUMNS="200")

    def cli(*args):
        return subprocess.run(biwm_cmd() + list(args), capture_output=True, text=True, env=env)

    rows = json.loads(cli("list-plugins", "--json").stdout)
    row = next(r for r in rows if r["name"] == "tool")
    first, second = row["plugin"].split(", ")  # in the order the entry points loaded
    assert {first, second} == {"biwm_tool_a", "biwm_tool_b"}
    assert row["description"] == "; ".join(f"{n[-1].upper()}'s tools" for n in (first, second))
    assert cli("tool", "ping").stdout.strip() == "pong"
    assert cli("tool", "pang").stdout.strip() == "pang"
    out = cli("tool", "shared")
    assert out.stdout.strip() == first[-1], out.stderr
    assert (f"plugin {second!r} (biwm-tool-{second[-1]}) registers command 'tool shared', which plugin {first!r} "
            "already has; left out") in " ".join(out.stderr.split())
    assert not any(r["status"] == "broken" for r in rows), rows
