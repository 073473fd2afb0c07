"""The plugin's HTTP API under malformed requests, its unix socket's life, and `zeroline keygen`:
a real plugin on a unix socket in a temp dir (as test_docker_plugin does), the CLI in a subprocess."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest
import zmq
import zmq.auth
from test_docker_plugin import TIMEOUT_S, Daemon, PluginThread, wait_listening

from zeroline import docker_plugin, keys
from zeroline.errors import ConfigError

CID = "c" * 64
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture
def api(capfd):
    work = tempfile.mkdtemp(prefix="zla")
    sock_path = os.path.join(work, "zeroline.sock")
    plugin = PluginThread(sock_path, os.path.join(work, "state"))
    daemon = Daemon(sock_path, work, None)
    daemon.plugin = plugin
    daemon.endpoint = "ipc://%s/c.ipc" % work
    yield daemon
    for fd in daemon.fds.values():
        os.close(fd)
    plugin.close()
    shutil.rmtree(work, ignore_errors=True)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err


def info(**fields):
    base = {"ContainerID": CID, "ContainerName": "/web", "ContainerEnv": ["A=1"],
            "ContainerLabels": {"team": "ops"}, "Config": {"zmq-address": "ipc:///nonexistent/x",
                                                           "zmq-socket": "push"}}
    base.update(fields)
    return base


def start_body(daemon, **fields):
    return {"File": daemon.new_fifo(), "Info": info(**fields)}


def read_body(**config):
    body = {"Since": "0001-01-01T00:00:00Z", "Until": "0001-01-01T00:00:00Z", "Tail": -1,
            "Follow": False}
    body.update(config)
    return {"Info": info(), "Config": body}


BAD_START_INFO = [
    ("integer ContainerID", {"ContainerID": 5}, "Info.ContainerID must be a string"),
    ("empty ContainerID", {"ContainerID": ""}, "Info.ContainerID is empty"),
    ("env of integers", {"ContainerEnv": [1, 2]}, "Info.ContainerEnv must be an array"),
    ("env as a string", {"ContainerEnv": "A=1"}, "Info.ContainerEnv must be an array"),
    ("labels as a list", {"ContainerLabels": ["team"]}, "Info.ContainerLabels must be an object"),
    ("label of a number", {"ContainerLabels": {"a": 1}}, "Info.ContainerLabels must be an object"),
    ("config as a list", {"Config": ["zmq-address"]}, "Info.Config must be an object"),
    ("config value a number", {"Config": {"zmq-hwm": 10}}, "Info.Config must be an object"),
    ("args of null items", {"ContainerArgs": [None]}, "Info.ContainerArgs must be an array"),
    ("name a boolean", {"ContainerName": True}, "Info.ContainerName must be a string"),
    ("created a number", {"ContainerCreated": 1.5}, "Info.ContainerCreated must be a string"),
    ("env over 10,000 entries", {"ContainerEnv": ["A=1"] * 10_001}, "more than 10000 items"),
    ("name over 1 MiB", {"ContainerName": "n" * (1024 * 1024 + 1)}, "longer than"),
    ("nesting in an unknown key", {"Future": [[[[[[[[[[1]]]]]]]]]]}, "nested deeper than"),
]


@pytest.mark.parametrize("case,fields,expected", BAD_START_INFO,
                         ids=[case for case, _, _ in BAD_START_INFO])
def test_start_logging_with_a_wrong_field_gets_an_err_not_a_500(api, case, fields, expected):
    body = start_body(api, **fields)
    status, answer = api.call_json("LogDriver.StartLogging", body)
    assert status == 200
    assert answer["Err"].startswith("StartLogging: ") and expected in answer["Err"]
    assert not api.plugin.plugin.instances
    assert not os.path.exists(api.plugin.state_dir) or os.listdir(api.plugin.state_dir) == []


BAD_START_BODIES = [
    ("File missing", lambda d: {"Info": info()}, "File is missing"),
    ("File a number", lambda d: {"File": 7, "Info": info()}, "File must be a string"),
    ("File with NUL", lambda d: {"File": d.new_fifo() + "\0x", "Info": info()}, "File must be"),
    ("File empty", lambda d: {"File": "", "Info": info()}, "File must be a path"),
    ("Info missing", lambda d: {"File": d.new_fifo()}, "Info is missing"),
    ("Info a list", lambda d: {"File": d.new_fifo(), "Info": [info()]}, "Info must be an object"),
    ("Info null", lambda d: {"File": d.new_fifo(), "Info": None}, "Info must be an object"),
    ("ContainerID missing",
     lambda d: {"File": d.new_fifo(), "Info": {"Config": {}}}, "Info.ContainerID is missing"),
]


@pytest.mark.parametrize("case,make,expected", BAD_START_BODIES,
                         ids=[case for case, _, _ in BAD_START_BODIES])
def test_start_logging_with_a_wrong_or_missing_key_gets_an_err(api, case, make, expected):
    status, answer = api.call_json("LogDriver.StartLogging", make(api))
    assert status == 200 and expected in answer["Err"], answer


@pytest.mark.parametrize("raw,expected", [
    (b"[" * 100_000, "nested deeper than"),
    (b'{"File": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", "nested deeper than"),
    (b'{"File": "/x", "Info": {"ContainerID": "\\ud800"}}', "not valid Unicode"),
], ids=["100k brackets", "deep File", "lone surrogate"])
def test_hostile_json_gets_an_err_not_a_500(api, raw, expected):
    for method in ("LogDriver.StartLogging", "LogDriver.StopLogging"):
        status, payload = api.call(method, None, raw=raw)
        assert status == 200 and expected in json.loads(payload)["Err"], payload
    status, payload = api.call("LogDriver.ReadLogs", None, raw=raw)
    assert status == 400 and expected in json.loads(payload)["Err"], payload


def test_stop_logging_with_a_wrong_file_gets_an_err(api):
    for body, expected in [({"File": 1}, "File must be a string"), ({}, "File is missing"),
                           ({"File": ["x"]}, "File must be a string")]:
        status, answer = api.call_json("LogDriver.StopLogging", body)
        assert status == 200 and expected in answer["Err"]


@pytest.mark.parametrize("config,expected", [
    ({"Tail": "10"}, "Config.Tail must be an integer"),
    ({"Tail": True}, "Config.Tail must be an integer"),
    ({"Tail": 2**70}, "Config.Tail must be an integer"),
    ({"Tail": 1.5}, "Config.Tail must be an integer"),
    ({"Follow": "yes"}, "Config.Follow must be a boolean"),
    ({"Since": 0}, "Config.Since must be a string"),
    ({"Until": "x" * 100}, "Config.Until is not an RFC 3339 time"),
    ({"Since": "yesterday"}, "bad Config"),
    ({"Until": "2026-13-45T99:99:99Z"}, "bad Config"),
])
def test_read_logs_with_a_wrong_config_is_refused_with_400(api, config, expected):
    # 400, not 200: the daemon reads a 200 body as LogEntry frames.
    status, payload = api.call("LogDriver.ReadLogs", read_body(**config))
    assert status == 400 and expected in json.loads(payload)["Err"], payload


def test_read_logs_with_a_wrong_info_is_refused_with_400(api):
    for body in [{"Config": {}}, {"Info": "x"}, {"Info": {"ContainerID": 1}},
                 {"Info": info(), "Config": [1]}]:
        status, payload = api.call("LogDriver.ReadLogs", body)
        assert status == 400 and json.loads(payload)["Err"].startswith("ReadLogs: "), payload


def test_read_logs_with_null_config_is_served(api):
    status, payload = api.call("LogDriver.ReadLogs", {"Info": info(), "Config": None})
    assert (status, payload) == (200, b"")


@pytest.mark.parametrize("method", ["LogDriver.StartLogging", "LogDriver.Capabilities",
                                    "Plugin.Activate"])
def test_body_over_the_size_limit_is_refused_before_parsing(api, method):
    status, payload = api.call(method, None, raw=b"[" * (docker_plugin.MAX_BODY_BYTES + 1))
    assert status == 413
    assert "over %d bytes" % docker_plugin.MAX_BODY_BYTES in json.loads(payload)["Err"]
    assert api.call_json("LogDriver.Capabilities", None)[0] == 200


def test_capabilities_and_activate_take_any_body(api):
    for raw in [b"", b"{}", b"\xff\xfe garbage", b"[" * 1000]:
        assert api.call("LogDriver.Capabilities", None, raw=raw)[0] == 200
        assert api.call("Plugin.Activate", None, raw=raw)[0] == 200


def open_fds_to(path):
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            # A rejected FIFO is unlinked; the daemon's fd then reads "PATH (deleted)".
            if os.readlink("/proc/self/fd/" + fd) in (path, path + " (deleted)"):
                found.append(fd)
        except OSError:
            pass
    return found


def assert_nothing_left(api, path):
    assert not api.plugin.plugin.instances
    assert not api.plugin.plugin.by_container
    assert not os.path.exists(os.path.join(api.plugin.state_dir, CID))
    # The daemon's own read-write fd is the only one left on the FIFO.
    assert len(open_fds_to(path)) == (1 if path in api.fds else 0)


def test_failed_start_for_a_missing_fifo_leaves_nothing(api):
    path = os.path.join(api.work_dir, "gone")
    status, answer = api.call_json("LogDriver.StartLogging", {"File": path, "Info": info()})
    assert status == 200 and "cannot open the log FIFO" in answer["Err"]
    assert_nothing_left(api, path)


def test_failed_start_for_a_regular_file_leaves_nothing(api):
    path = os.path.join(api.work_dir, "regular")
    open(path, "wb").close()
    status, answer = api.call_json("LogDriver.StartLogging", {"File": path, "Info": info()})
    assert status == 200 and "is not a FIFO" in answer["Err"]
    assert_nothing_left(api, path)


def test_failed_start_for_a_bad_cache_option_leaves_nothing(api):
    body = start_body(api, Config={"zmq-address": api.endpoint, "zmq-socket": "push",
                                   "cache-max-file": "0"})
    status, answer = api.call_json("LogDriver.StartLogging", body)
    assert status == 200 and "cache-max-file" in answer["Err"]
    assert_nothing_left(api, body["File"])


def test_start_failing_after_the_local_copy_was_made_removes_it(api, monkeypatch):
    class Failing(docker_plugin.LoggingInstance):
        def start(self):
            raise ConfigError("refused by the test")

    monkeypatch.setattr(docker_plugin, "LoggingInstance", Failing)
    body = start_body(api, Config={"zmq-address": api.endpoint, "zmq-socket": "push"})
    status, answer = api.call_json("LogDriver.StartLogging", body)
    assert (status, answer) == (200, {"Err": "refused by the test"})
    assert_nothing_left(api, body["File"])
    # A later start for the same container works and makes its copy.
    monkeypatch.undo()
    body = start_body(api, Config={"zmq-address": api.endpoint, "zmq-socket": "push"})
    assert api.call_json("LogDriver.StartLogging", body) == (200, {"Err": ""})
    assert os.path.isdir(os.path.join(api.plugin.state_dir, CID, "local-logs"))
    api.stop(body["File"])


# ---------------------------------------------------------------------------------------------
# The unix socket

def test_bound_socket_has_its_mode_before_anyone_can_connect(tmp_path):
    path = str(tmp_path / "p.sock")
    old = os.umask(0)
    try:
        sock = docker_plugin.bind_socket(path)
    finally:
        os.umask(old)
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert os.stat(path).st_mode & 0o777 == 0o660
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with pytest.raises(ConnectionRefusedError):
            probe.connect(path)          # not listening yet: nobody gets in under the umask
        probe.close()
    finally:
        sock.close()


def _with_umask(argv, umask):
    # Through a shell rather than preexec_fn, which is unsafe while other threads run.
    if umask is None:
        return argv
    return ["sh", "-c", 'umask %03o && exec "$@"' % umask, "sh"] + argv


def start_plugin_command(work, sock_path, umask=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        _with_umask([sys.executable, "-m", "zeroline", "plugin", "--socket", sock_path,
                     "--state-dir", os.path.join(work, "state")], umask),
        stderr=subprocess.PIPE, env=env)


@pytest.fixture
def work():
    directory = tempfile.mkdtemp(prefix="zls")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_plugin_socket_is_0660_under_umask_000_and_removed_at_exit(work, signum):
    sock_path = os.path.join(work, "zeroline.sock")
    proc = start_plugin_command(work, sock_path, umask=0)
    try:
        assert wait_listening(sock_path)
        assert os.stat(sock_path).st_mode & 0o777 == 0o660
        proc.send_signal(signum)
        assert proc.wait(TIMEOUT_S) == 0
        assert not os.path.exists(sock_path)
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_existing_regular_file_at_socket_path_is_refused_and_left_alone(work):
    sock_path = os.path.join(work, "not-a-socket")
    with open(sock_path, "w") as f:
        f.write("precious")
    proc = start_plugin_command(work, sock_path)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 2
    assert err.decode().strip().splitlines() == [
        "zeroline: error: socket path %s exists and is not a socket; refusing to replace it"
        % sock_path]
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_stale_socket_is_replaced(work):
    sock_path = os.path.join(work, "zeroline.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)            # a socket file left by a run that died: nobody listens
    dead.close()
    proc = start_plugin_command(work, sock_path)
    try:
        assert wait_listening(sock_path)
        assert Daemon(sock_path, work, None).call_json("LogDriver.Capabilities", None)[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0
    finally:
        proc.kill()
        proc.wait()


def test_live_socket_is_refused_and_keeps_serving(work):
    sock_path = os.path.join(work, "zeroline.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(sock_path)
    live.listen(8)
    try:
        proc = start_plugin_command(work, sock_path)
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 1
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "another process is listening on %s" % sock_path in lines[0]
        # Still the first listener's socket.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(sock_path)
        probe.close()
    finally:
        live.close()


# ---------------------------------------------------------------------------------------------
# keygen

def run_cli(*args, umask=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(_with_umask([sys.executable, "-m", "zeroline", *args], umask),
                          check=False, capture_output=True, env=env, timeout=TIMEOUT_S)


def test_keygen_writes_a_pair_pyzmq_reads_with_a_0600_secret(work):
    keydir = os.path.join(work, "keys")
    done = run_cli("keygen", "collector", "--dir", keydir, umask=0)
    assert done.returncode == 0, done.stderr
    public_path = os.path.join(keydir, "collector.key")
    secret_path = os.path.join(keydir, "collector.key_secret")
    assert os.stat(secret_path).st_mode & 0o777 == 0o600
    assert os.stat(public_path).st_mode & 0o777 == 0o644
    public, none = zmq.auth.load_certificate(public_path)
    public_again, secret = zmq.auth.load_certificate(secret_path)
    assert none is None and public == public_again and zmq.curve_public(secret) == public
    assert done.stdout.decode().strip() == public.decode()
    assert keys.load_public_key(public_path) == public
    assert keys.load_secret_key(secret_path) == (public, secret)


def test_keygen_refuses_to_overwrite_unless_forced(work):
    assert run_cli("keygen", "fw", "--dir", work).returncode == 0
    with open(os.path.join(work, "fw.key_secret"), "rb") as f:
        before = f.read()
    done = run_cli("keygen", "fw", "--dir", work)
    assert done.returncode == 2
    assert done.stderr.decode().count("\n") == 1 and "not overwriting" in done.stderr.decode()
    with open(os.path.join(work, "fw.key_secret"), "rb") as f:
        assert f.read() == before
    # One of the two files is enough to refuse: nothing half-replaced.
    os.unlink(os.path.join(work, "fw.key"))
    assert run_cli("keygen", "fw", "--dir", work).returncode == 2
    assert not os.path.exists(os.path.join(work, "fw.key"))
    forced = run_cli("keygen", "fw", "--dir", work, "--force")
    assert forced.returncode == 0
    with open(os.path.join(work, "fw.key_secret"), "rb") as f:
        assert f.read() != before
    assert os.stat(os.path.join(work, "fw.key_secret")).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(work)) == ["fw.key", "fw.key_secret"]


def test_keygen_help_and_bad_names(work):
    done = run_cli("keygen", "--help")
    assert done.returncode == 0
    text = done.stdout.decode()
    assert "NAME.key_secret" in text and "0600" in text and "--force" in text
    bad = run_cli("keygen", "a/b", "--dir", work)
    assert bad.returncode == 2 and b"invalid key name" in bad.stderr
    assert os.listdir(work) == []


def test_load_public_key_takes_z85_text_or_a_file(tmp_path):
    public, _ = zmq.curve_keypair()
    assert keys.load_public_key(public.decode()) == public
    assert keys.load_public_key(public) == public
    _, secret_path = keys.create_keypair(str(tmp_path), "k")
    assert keys.load_public_key(secret_path) == keys.load_secret_key(secret_path)[0]
    for bad in ["", "short", "x" * 41, str(tmp_path / "missing")]:
        with pytest.raises(ConfigError, match="neither 40 Z85 characters nor an existing file"):
            keys.load_public_key(bad)
    junk = tmp_path / "junk"
    junk.write_text("nothing here\n")
    with pytest.raises(ConfigError, match="has no public-key"):
        keys.load_public_key(str(junk))


def test_load_secret_key_refuses_what_is_not_a_private_secret(tmp_path):
    public_path, secret_path = keys.create_keypair(str(tmp_path), "k")
    with pytest.raises(ConfigError, match="cannot read secret key"):
        keys.load_secret_key(str(tmp_path / "missing"))
    os.chmod(public_path, 0o600)
    with pytest.raises(ConfigError, match="has no secret-key"):
        keys.load_secret_key(public_path)
    os.chmod(secret_path, 0o640)
    with pytest.raises(ConfigError, match=r"accessible by group or others \(mode 0640\)"):
        keys.load_secret_key(secret_path)
    os.chmod(secret_path, 0o600)
    other_public, _ = zmq.curve_keypair()
    with open(secret_path) as f:
        text = f.read()
    mine = keys.load_secret_key(secret_path)[0].decode()
    with open(secret_path, "w") as f:
        f.write(text.replace(mine, other_public.decode()))
    with pytest.raises(ConfigError, match="does not belong"):
        keys.load_secret_key(secret_path)
