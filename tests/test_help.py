"""Every `--help` text and the README's option tables name the same options with the same defaults."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from zeroline.config import OPTIONS, ZmqOptions, parse_binary_size, validate_log_opts

TIMEOUT_S = 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("forward", "run", "plugin", "keygen", "collect")
#: Where a log-opt sits in ZmqOptions, for the defaults that the options table states.
ATTRIBUTES = {"zmq-socket": "socket", "zmq-hwm": "hwm", "zmq-framing": "framing",
              "zmq-container-id": "container_id_format", "zmq-line-buffer": "line_buffer",
              "zmq-linger": "linger_s", "zmq-peer-wait": "peer_wait_s", "zmq-window": "window",
              "spool-max-size": "spool_max_size", "mode": "mode",
              "max-buffer-size": "max_buffer_size"}


def help_text(command):
    # Wide, so that argparse does not wrap a default such as ./zeroline-logs at its hyphen.
    proc = subprocess.run([sys.executable, "-m", "zeroline", command, "--help"],
                          capture_output=True, timeout=TIMEOUT_S, check=False,
                          env=dict(os.environ, COLUMNS="400"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()


@pytest.fixture(scope="module")
def helps():
    return {command: help_text(command) for command in COMMANDS}


@pytest.fixture(scope="module")
def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _entries(lines, start):
    """Join each entry (a line matching ``start``) with its continuation lines."""
    out = []
    for line in lines:
        if start.match(line):
            out.append(line.strip())
        elif out and line.startswith("    ") and line.strip():
            out[-1] += " " + line.strip()
        elif not line.strip():
            out.append(None)
    return [entry for entry in out if entry]


def help_options(text):
    """``{--option: default or ""}`` of the options section of one --help text."""
    section = text.split("options:", 1)[1].split("\nlog-opts", 1)[0]
    out = {}
    for entry in _entries(section.splitlines(), re.compile(r"^  (-\w, )?--[a-z]")):
        name = re.match(r"(?:-\w, )?(--[a-z-]+)", entry).group(1)
        if name == "--help":
            continue
        defaults = re.findall(r"\(default: ([^)]*)\)", entry)
        out[name] = defaults[-1] if defaults else ""
    return out


def help_log_opts(text):
    """``{key: default or ""}`` of the log-opts a --help text lists."""
    section = text.split("\nlog-opts", 1)[1]
    out = {}
    for entry in _entries(section.splitlines()[1:], re.compile(r"^  [a-z]")):
        key = entry.split()[0]
        found = re.search(r"\[default: ([^\]]*)\]", entry)
        out[key] = found.group(1) if found else ""
    return out


def readme_table(text, heading):
    """The rows of the first table under ``heading``, as lists of cells without backticks."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("## "):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip().replace("`", "") for cell in line.strip("|").split("|")])
    return rows[1:]     # without the header


def test_every_command_option_is_in_the_readme_with_the_same_default(helps, readme):
    table = {}
    for option, commands, default, _ in readme_table(readme, "## Command options"):
        for command in commands.split(", "):
            table[(command, option.split()[0])] = default
    in_help = {(command, option): default for command, text in helps.items()
               for option, default in help_options(text).items()}
    assert set(in_help) == set(table), (set(in_help) ^ set(table))
    for key, default in in_help.items():
        assert table[key] == default, (key, default, table[key])


def test_every_log_opt_is_in_each_help_and_the_readme_with_the_same_default(helps, readme):
    readme_opts = {row[0]: row[1] for row in readme_table(readme, "## Options (")}
    assert set(readme_opts) == set(OPTIONS)
    listed = {command: help_log_opts(helps[command]) for command in ("forward", "run", "plugin")}
    assert set(listed["plugin"]) == set(OPTIONS)        # the plugin uses cache-* too
    for command in ("forward", "run"):
        assert set(listed[command]) == {k for k in OPTIONS if not k.startswith("cache-")} | {
            "cache-*"}
    for key, opt in OPTIONS.items():
        default = opt.default or ""
        assert readme_opts[key] == default, (key, readme_opts[key], default)
        for opts in listed.values():
            if key in opts:
                assert opts[key] == default, (key, opts[key], default)


def test_stated_defaults_are_what_the_code_uses():
    parsed = validate_log_opts({"zmq-address": "tcp://127.0.0.1:1"})
    fields = {f.name: f.default for f in dataclasses.fields(ZmqOptions)}
    for key, attribute in ATTRIBUTES.items():
        assert getattr(parsed, attribute) == fields[attribute], key
    # max-buffer-size: the default is 1,000,000 bytes and "1m" means binary units.
    assert parsed.max_buffer_size == 1_000_000 == int(OPTIONS["max-buffer-size"].default)
    assert parse_binary_size("1m") == 1_048_576


def test_max_buffer_size_is_described_once_and_correctly(helps, readme):
    assert "1,000,000 bytes)" not in readme and "1m` = 1 MiB" not in readme
    assert "`1m` = 1,048,576" in readme
    assert "1m = 1,048,576" in " ".join(helps["forward"].split())


def test_plugin_help_does_not_offer_log_opt_flags(helps):
    text = helps["plugin"]
    assert "--log-opt" not in help_options(text)
    assert "--log-opt KEY=VALUE, repeatable" not in text
    assert "docker run" in text.split("\nlog-opts", 1)[1]
    assert "[--log-opt" not in text.split("\n\n", 1)[0]         # not in the usage line


def test_zmq_hwm_help_and_readme_agree_that_pub_never_drops(helps, readme):
    hwm = help_log_opts(helps["run"])
    assert "drop" not in OPTIONS["zmq-hwm"].help
    assert "never drops" in next(row for row in readme_table(readme, "## Options (")
                                 if row[0] == "zmq-hwm")[2]
    assert hwm["zmq-hwm"] == "1000"
