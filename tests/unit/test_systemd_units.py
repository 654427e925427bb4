"""The systemd units in deploy/systemd run the same commands as `manage.py up` (llmhub.processes), restart
whatever exits and never stop trying."""

import configparser
import shlex
from pathlib import Path

from llmhub import processes

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(UNITS / f"llmhub-{name}.service")
    return parser


def test_each_platform_process_has_a_unit_with_the_same_command(settings, tmp_path):
    settings.CELERY_TASK_DEFAULT_QUEUE, settings.OUTBOUND_QUEUE = "${LLMHUB_QUEUE}", "${LLMHUB_QUEUE}-outbound"
    commands = processes.platform_commands(port=8000, schedule=Path("/var/lib/llmhub/celerybeat-schedule"))
    assert {p.name for p in UNITS.glob("*.service")} == {f"llmhub-{name}.service" for name in commands}
    for name, argv in commands.items():
        exec_start = shlex.split(unit(name)["Service"]["ExecStart"].replace("%%", "%"))
        # Same program (in the installation's virtual environment) and the same arguments.
        assert Path(exec_start[0]).name == Path(argv[0]).name and exec_start[0].startswith("/opt/llmhub/.venv/bin/")
        assert exec_start[1:] == argv[1:], name


def test_units_restart_whatever_exits_and_never_give_up():
    for path in UNITS.glob("*.service"):
        parsed = unit(path.stem.removeprefix("llmhub-"))
        assert parsed["Service"]["Restart"] == "always", path.name
        assert parsed["Unit"]["StartLimitIntervalSec"] == "0", path.name
        assert parsed["Service"]["EnvironmentFile"] == "/etc/llmhub/env", path.name
