"""Tests of zeroline.config: parsers, the log-opts table and validation, registry, tags, attributes."""

import re
import socket

import pytest

from zeroline import config
from zeroline.config import (
    OPTIONS,
    ContainerInfo,
    LogOpt,
    ZmqOptions,
    drivers,
    extra_attributes,
    get_driver,
    parse_binary_size,
    parse_bool,
    parse_decimal_size,
    parse_duration,
    register_driver,
    render_tag,
    tenant_service,
    validate_log_opts,
)
from zeroline.errors import ConfigError, ZerolineError

ADDRESS = {"zmq-address": "tcp://collector:5555"}


def opts(**extra):
    """Log-opts with a valid address; keyword names use _ for -."""
    return {**ADDRESS, **{key.replace("_", "-"): value for key, value in extra.items()}}


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", 0),
        ("1024", 1024),
        ("1b", 1),
        ("1k", 1024),
        ("1kb", 1024),
        ("1KiB", 1024),
        ("1m", 1048576),
        ("1mb", 1048576),
        ("1MB", 1048576),
        ("1mib", 1048576),
        ("1g", 1024**3),
        ("1p", 1024**5),
        ("1.5k", 1536),
        ("10 kb", 10240),
        ("0.1k", 102),
        (".5m", 524288),
        ("1.", 1),
    ],
)
def test_binary_size_uses_base_1024_whatever_the_suffix(text, expected):
    assert parse_binary_size(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("1k", 1000), ("1m", 1000000), ("1mib", 1000000), ("1.5k", 1500), ("2 GB", 2 * 10**9), ("7", 7)],
)
def test_decimal_size_uses_base_1000_whatever_the_suffix(text, expected):
    assert parse_decimal_size(text) == expected


def test_same_text_differs_between_binary_and_decimal_size():
    assert parse_binary_size("1m") == 1048576
    assert parse_decimal_size("1m") == 1000000


@pytest.mark.parametrize(
    "text",
    ["", "-1", "-1k", "abc", "1x", "1kbb", "1 k b", "1  k", " 1k", "1k ", "k", "1bk", "1e3", "1,5k", "1ki"],
)
@pytest.mark.parametrize("parse", [parse_binary_size, parse_decimal_size])
def test_bad_size_is_a_config_error_naming_the_text(parse, text):
    with pytest.raises(ConfigError) as exc:
        parse(text)
    assert repr(text) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_negative_size_says_so():
    with pytest.raises(ConfigError, match="negative"):
        parse_binary_size("-5m")


def test_config_error_is_a_value_error_and_a_zeroline_error():
    with pytest.raises(ValueError):
        parse_binary_size("nope")
    with pytest.raises(ZerolineError):
        parse_binary_size("nope")


# --- durations and booleans -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("0", 0.0),
        ("5s", 5.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("1.5s", 1.5),
        ("1h2m3s4ms", 3723.004),
        ("250us", 0.00025),
        ("250\u00b5s", 0.00025),
        ("10ns", 1e-8),
        ("5", 5.0),
        ("2.5", 2.5),
        ("+1s", 1.0),
        (".5s", 0.5),
    ],
)
def test_duration_accepts_go_durations_and_bare_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-1s", "-5", "s", "5x", "5 s", "1m 30s", "5S", "1.2.3s", "abc", "1h-5m"])
def test_bad_duration_is_a_config_error_naming_the_text(text):
    with pytest.raises(ConfigError) as exc:
        parse_duration(text)
    assert repr(text) in str(exc.value)


def test_negative_duration_says_so():
    with pytest.raises(ConfigError, match="negative"):
        parse_duration("-1s")


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_bool_true_spellings_match_go(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_bool_false_spellings_match_go(text):
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["yes", "no", "tRUE", " true", "", "2"])
def test_bool_rejects_what_go_rejects(text):
    with pytest.raises(ConfigError, match=re.escape(repr(text))):
        parse_bool(text)


# --- the options table ----------------------------------------------------------------------


def test_options_table_lists_every_log_opt_of_the_driver():
    assert set(OPTIONS) == {
        "zmq-address", "zmq-socket", "zmq-hwm", "zmq-framing", "zmq-container-id",
        "zmq-line-buffer", "zmq-linger", "zmq-peer-wait", "zmq-window", "spool-dir",
        "spool-max-size", "mode", "max-buffer-size", "labels", "labels-regex", "env", "env-regex",
        "tag", "zmq-curve-server-key", "zmq-curve-key",
        "cache-disabled", "cache-max-file", "cache-max-size", "cache-compress",
    }  # fmt: skip
    for name, opt in OPTIONS.items():
        assert isinstance(opt, LogOpt) and opt.name == name
        assert opt.help.endswith(".") and "\n" not in opt.help and len(opt.help) < 100
        assert (opt.choices is not None) == (opt.kind == "choice")
        if opt.choices:
            assert opt.default in opt.choices


def test_options_table_is_read_only_per_entry():
    with pytest.raises(AttributeError):
        OPTIONS["zmq-hwm"].default = "5"


def test_defaults_of_the_table_match_the_dataclass_defaults():
    assert validate_log_opts({}, require_address=False) == ZmqOptions(address=None, raw={})


def test_valid_opts_are_parsed_into_snake_case_attributes():
    raw = opts(
        zmq_socket="push", zmq_hwm="0", zmq_framing="msgpack", zmq_container_id="full",
        zmq_line_buffer="1m", zmq_linger="250ms", zmq_peer_wait="0", mode="non-blocking",
        max_buffer_size="4m", labels="a, b,,c", labels_regex="^com\\.", env="TENANT_ID",
        env_regex="^X_", tag="{{.Name}}", cache_disabled="true", cache_max_file="5",
        cache_max_size="20m", cache_compress="false",
    )  # fmt: skip
    got = validate_log_opts(raw)
    assert got.address == "tcp://collector:5555"
    assert (got.socket, got.hwm, got.framing, got.container_id_format) == ("push", 0, "msgpack", "full")
    assert got.line_buffer == 1048576
    assert got.linger_s == 0.25 and got.peer_wait_s == 0.0
    assert got.mode == "non-blocking" and got.max_buffer_size == 4 * 1048576
    assert got.labels == ("a", "b", "c") and got.env == ("TENANT_ID",)
    assert got.labels_regex.pattern == "^com\\." and got.env_regex.pattern == "^X_"
    assert got.tag == "{{.Name}}"
    assert got.raw == raw and got.raw is not raw


def test_defaults_fill_in_missing_opts():
    got = validate_log_opts(ADDRESS)
    assert (got.socket, got.hwm, got.framing, got.container_id_format) == ("pub", 1000, "seed", "short")
    assert (got.line_buffer, got.linger_s, got.peer_wait_s) == (16384, 5.0, 5.0)
    assert (got.mode, got.max_buffer_size) == ("blocking", 1000000)
    assert (got.labels, got.labels_regex, got.env, got.env_regex, got.tag) == ((), None, (), None, None)


def test_zmq_options_are_frozen():
    with pytest.raises(AttributeError):
        validate_log_opts(ADDRESS).hwm = 1


def test_empty_mode_means_blocking_as_in_docker():
    assert validate_log_opts(opts(mode="")).mode == "blocking"


def test_empty_tag_and_regexes_mean_none():
    got = validate_log_opts(opts(tag="", labels_regex="", env_regex=""))
    assert (got.tag, got.labels_regex, got.env_regex) == (None, None, None)


# --- validation errors ----------------------------------------------------------------------


def test_unknown_key_is_named_exactly_with_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        validate_log_opts(opts(zmq_adress="x", bogus="1"))
    message = str(exc.value)
    assert message.startswith("unknown log opt 'bogus' for zmq log driver")  # first in sorted order
    assert "(valid: cache-compress, cache-disabled, " in message and message.endswith("zmq-window)")


def test_unknown_key_message_names_the_driver():
    with pytest.raises(ConfigError, match="^unknown log opt 'max-size' for zeroline log driver"):
        validate_log_opts(opts(max_size="10m"), driver="zeroline")


def test_missing_address_is_an_error():
    with pytest.raises(ConfigError) as exc:
        validate_log_opts({"zmq-hwm": "5"})
    assert str(exc.value) == "missing required log opt 'zmq-address' for zmq log driver"


def test_missing_address_is_none_when_not_required():
    assert validate_log_opts({"zmq-hwm": "5"}, require_address=False).address is None


def test_unknown_key_is_reported_before_missing_address():
    with pytest.raises(ConfigError, match="^unknown log opt 'nope'"):
        validate_log_opts({"nope": "1"})


def test_max_buffer_size_without_non_blocking_is_an_error():
    for raw in (opts(max_buffer_size="1m"), opts(max_buffer_size="1m", mode="blocking")):
        with pytest.raises(ConfigError) as exc:
            validate_log_opts(raw)
        assert str(exc.value) == (
            "invalid max-buffer-size '1m': only allowed with mode=non-blocking (mode is blocking)"
        )


def test_docker_checks_come_before_unknown_keys_and_address():
    with pytest.raises(ConfigError, match="^invalid mode 'fast'"):
        validate_log_opts({"mode": "fast", "bogus": "1"})
    with pytest.raises(ConfigError, match="^invalid max-buffer-size"):
        validate_log_opts({"max-buffer-size": "1m", "bogus": "1"})
    with pytest.raises(ConfigError, match="^invalid cache-disabled 'maybe'"):
        validate_log_opts({"cache-disabled": "maybe", "bogus": "1"})


def test_max_buffer_size_is_a_binary_size():
    assert validate_log_opts(opts(mode="non-blocking", max_buffer_size="1m")).max_buffer_size == 1048576
    with pytest.raises(ConfigError, match="^invalid max-buffer-size '-1'"):
        validate_log_opts(opts(mode="non-blocking", max_buffer_size="-1"))


def test_cache_options_are_accepted_and_kept():
    raw = opts(cache_disabled="1", cache_max_file="3", cache_max_size="1m", cache_compress="true")
    assert validate_log_opts(raw).raw == raw


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("zmq-socket", "sub", "expected pub or push"),
        ("zmq-framing", "json", "expected seed or msgpack"),
        ("zmq-container-id", "long", "expected short or full"),
        ("mode", "async", "expected blocking or non-blocking"),
        ("zmq-hwm", "-1", "expected an integer"),
        ("zmq-hwm", "1k", "expected an integer"),
        ("zmq-hwm", "", "expected an integer"),
        ("zmq-line-buffer", "0", "from 1 byte to 16 MiB"),
        ("zmq-line-buffer", "17m", "from 1 byte to 16 MiB"),
        ("zmq-line-buffer", "lots", "expected a number"),
        ("zmq-linger", "-1s", "negative"),
        ("zmq-peer-wait", "soon", "expected a duration"),
        ("cache-disabled", "yes", "expected a boolean"),
    ],
)
def test_bad_value_error_names_option_and_value_in_one_line(key, value, why):
    with pytest.raises(ConfigError) as exc:
        validate_log_opts({**ADDRESS, key: value})
    message = str(exc.value)
    assert message.startswith(f"invalid {key} {value!r}: ") and why in message
    assert "\n" not in message


def test_line_buffer_accepts_its_bounds():
    assert validate_log_opts(opts(zmq_line_buffer="1")).line_buffer == 1
    assert validate_log_opts(opts(zmq_line_buffer="16m")).line_buffer == 16 * 1024 * 1024


@pytest.mark.parametrize(
    "address",
    [
        "tcp://collector:5555",
        "tcp://127.0.0.1:1",
        "tcp://logs.example.com:65535",
        "tcp://[::1]:5555",
        "tcp://[fe80::1]:5555",
        "ipc:///run/zeroline/logs.sock",
        "ipc://relative.sock",
        "ipc://@abstract",
        "ipc:///" + "x" * 106,
        "inproc://logs",
    ],
)
def test_valid_endpoints_are_accepted(address):
    assert validate_log_opts({"zmq-address": address}).address == address


def test_unknown_scheme_gets_the_generic_endpoint_message():
    with pytest.raises(ConfigError) as exc:
        validate_log_opts({"zmq-address": "foo"})
    assert str(exc.value) == (
        "invalid zmq-address 'foo': expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"
    )


@pytest.mark.parametrize(
    "address, why",
    [
        ("", "expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"),
        ("udp://host:5555", "expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"),
        ("TCP://host:5555", "expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"),
        ("host:5555", "expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"),
        ("tcp://host", "expected tcp://HOST:PORT"),
        ("tcp://:5555", "expected tcp://HOST:PORT"),
        ("tcp://host:", "port"),
        ("tcp://host:0", "port"),
        ("tcp://host:65536", "port"),
        ("tcp://host:http", "port"),
        ("tcp://host:-1", "port"),
        ("tcp://host:5555/x", "port"),
        ("tcp://*:5555", "binding"),
        ("tcp://::1:5555", "brackets"),
        ("tcp://[::1:5555", "unclosed"),
        ("tcp://[nope]:5555", "not an IPv6 address"),
        ("tcp://999.1.1.1:5555", "not an IPv4 address"),
        ("tcp://bad host:5555", "not a host name"),
        ("tcp://-bad:5555", "not a host name"),
        ("ipc://", "non-empty path"),
        ("ipc:///" + "x" * 107, "sun_path"),
        ("inproc://", "non-empty name"),
    ],
)
def test_bad_endpoint_is_named_with_the_reason(address, why):
    with pytest.raises(ConfigError) as exc:
        validate_log_opts({"zmq-address": address})
    message = str(exc.value)
    assert message.startswith(f"invalid zmq-address {address!r}: ") and why in message


def test_ipc_path_limit_counts_bytes_not_characters():
    with pytest.raises(ConfigError, match="sun_path"):
        validate_log_opts({"zmq-address": "ipc://" + "\u00e9" * 54})  # 108 bytes, 54 characters


@pytest.mark.parametrize("key", ["labels-regex", "env-regex"])
def test_bad_regex_names_the_option(key):
    with pytest.raises(ConfigError) as exc:
        validate_log_opts({**ADDRESS, key: "(unclosed"})
    assert str(exc.value).startswith(f"invalid {key} '(unclosed': bad regular expression")


@pytest.mark.parametrize("tag", ["{{.Nope}}", "{{.Name", "{{shout .Name}}"])
def test_bad_tag_is_rejected_at_validation(tag):
    with pytest.raises(ConfigError, match=r"^invalid tag template "):
        validate_log_opts(opts(tag=tag))


# --- driver registry ------------------------------------------------------------------------


@pytest.fixture
def registry():
    saved = dict(config._DRIVERS)
    yield
    config._DRIVERS.clear()
    config._DRIVERS.update(saved)


def test_zmq_driver_is_registered_at_import():
    driver = get_driver("zmq")
    assert "zmq" in drivers()
    assert driver.name == "zmq" and driver.validator is validate_log_opts


def test_registering_a_name_twice_is_an_error(registry):
    register_driver("test-twice", lambda info, options: None, lambda o: None)
    with pytest.raises(ConfigError) as exc:
        register_driver("test-twice", lambda info, options: None, lambda o: None)
    assert str(exc.value) == "logger: log driver named 'test-twice' is already registered"


def test_registering_zmq_again_is_an_error(registry):
    with pytest.raises(ConfigError, match="'zmq' is already registered"):
        register_driver("zmq", lambda info, options: None, validate_log_opts)


def test_registered_driver_is_found_and_listed_sorted(registry):
    def creator(info, options):
        return ("sink", info, options)

    register_driver("aaa-test", creator, validate_log_opts)
    assert get_driver("aaa-test").creator(1, 2) == ("sink", 1, 2)
    assert drivers() == sorted(drivers()) and "aaa-test" in drivers()


def test_unknown_driver_is_an_error():
    with pytest.raises(ConfigError) as exc:
        get_driver("syslog")
    assert str(exc.value) == "logger: no log driver named 'syslog' is registered"


# --- container info, tenant and attributes --------------------------------------------------

FULL_ID = "0123456789ab" + "c" * 52
IMAGE_ID = "sha256:" + "fedcba987654" + "0" * 52
DOCKER_INFO = {
    "Config": {"zmq-address": "tcp://collector:5555"},
    "ContainerID": FULL_ID,
    "ContainerName": "/web-1",
    "ContainerEntrypoint": "/bin/sh",
    "ContainerArgs": ["-c", "echo hi"],
    "ContainerImageID": IMAGE_ID,
    "ContainerImageName": "busybox:latest",
    "ContainerCreated": "2024-05-01T10:00:00.123456789Z",
    "ContainerEnv": ["TENANT_ID=acme", "PATH=/bin"],
    "ContainerLabels": {"com.example.team": "infra"},
    "LogPath": "",
    "DaemonName": "docker",
}


def test_container_info_reads_docker_info_json():
    info = ContainerInfo.from_docker(DOCKER_INFO)
    assert info.container_id == FULL_ID and info.short_id == "0123456789ab"
    assert info.container_name == "/web-1" and info.name == "web-1"
    assert info.env == ("TENANT_ID=acme", "PATH=/bin")
    assert info.labels == {"com.example.team": "infra"}
    assert (info.image_id, info.image_name) == (IMAGE_ID, "busybox:latest")
    assert (info.entrypoint, info.args) == ("/bin/sh", ("-c", "echo hi"))
    assert info.created == "2024-05-01T10:00:00.123456789Z"
    assert info.hostname == socket.gethostname()


def test_container_info_accepts_null_env_labels_and_args():
    info = ContainerInfo.from_docker(
        {"ContainerID": FULL_ID, "ContainerEnv": None, "ContainerLabels": None, "ContainerArgs": None}
    )
    assert (info.env, info.labels, info.args) == ((), {}, ())


def test_tenant_and_service_default_to_default():
    assert tenant_service([]) == ("default", "default")
    assert tenant_service(["PATH=/bin", "TENANT_ID", "SERVICE_ID"]) == ("default", "default")


def test_tenant_and_service_come_from_env():
    assert tenant_service(["TENANT_ID=acme", "SERVICE_ID=billing"]) == ("acme", "billing")
    assert tenant_service(["SERVICE_ID=billing"]) == ("default", "billing")


def test_tenant_env_last_occurrence_wins_and_splits_at_first_equals():
    assert tenant_service(["TENANT_ID=a", "TENANT_ID=b=c"]) == ("b=c", "default")


def test_empty_tenant_value_means_default():
    assert tenant_service(["TENANT_ID=", "SERVICE_ID=x"]) == ("default", "x")


ATTR_INFO = ContainerInfo(
    container_id=FULL_ID,
    container_name="/web-1",
    env=("REGION=eu", "X_A=1", "X_B=2", "NOVALUE", "EQ=a=b", "REGION=us"),
    labels={"team": "infra", "com.x.b": "2", "com.x.a": "1", "shared": "label"},
)


def attrs(**extra):
    return extra_attributes(ATTR_INFO, validate_log_opts(opts(**extra)))


def test_no_attribute_options_give_no_attributes():
    assert attrs() == {}


def test_listed_labels_that_exist_are_added():
    assert attrs(labels="team,missing") == {"team": "infra"}


def test_labels_regex_matches_label_keys_anywhere():
    assert attrs(labels_regex=r"x\.") == {"com.x.a": "1", "com.x.b": "2"}


def test_env_is_split_at_first_equals_and_entries_without_equals_are_ignored():
    assert attrs(env="EQ,NOVALUE,MISSING") == {"EQ": "a=b"}


def test_env_last_occurrence_wins():
    assert attrs(env="REGION") == {"REGION": "us"}


def test_attributes_merge_labels_then_regex_then_env_then_env_regex():
    info = ContainerInfo(labels={"shared": "label", "team": "infra"}, env=("shared=env", "X_shared=1"))
    options = validate_log_opts(opts(labels="team", labels_regex="^sh", env="shared", env_regex="^X_"))
    got = extra_attributes(info, options)
    assert got == {"team": "infra", "shared": "env", "X_shared": "1"}
    assert list(got) == ["team", "shared", "X_shared"]


def test_env_overwrites_a_label_with_the_same_key():
    info = ContainerInfo(labels={"K": "label", "L": "label"}, env=("K=env", "L=env"))
    options = ZmqOptions(address=None, labels=("K", "L"), env=("K",), env_regex=re.compile("^L$"))
    assert extra_attributes(info, options) == {"K": "env", "L": "env"}


def test_env_regex_matches_env_names_anywhere():
    assert attrs(env_regex="_") == {"X_A": "1", "X_B": "2"}


def test_tag_is_added_last_and_overwrites_a_label_named_tag():
    info = ContainerInfo(container_name="/web-1", labels={"tag": "from-label"})
    got = extra_attributes(info, validate_log_opts(opts(labels="tag", tag="{{.Name}}")))
    assert got == {"tag": "web-1"}


# --- tag templates --------------------------------------------------------------------------

TAG_INFO = ContainerInfo(
    container_id=FULL_ID,
    container_name="/web-1",
    image_id=IMAGE_ID,
    image_name="busybox:latest",
    entrypoint="/bin/sh",
    args=("-c", "echo hi"),
    hostname="host-a",
    labels={"com.example.team": "infra", "k": "v"},
)


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{{.ID}}", "0123456789ab"),
        ("{{.FullID}}", FULL_ID),
        ("{{.Name}}", "web-1"),
        ("{{.ImageID}}", "fedcba987654"),
        ("{{.ImageFullID}}", IMAGE_ID),
        ("{{.ImageName}}", "busybox:latest"),
        ("{{.Command}}", "/bin/sh -c echo hi"),
        ("{{.Hostname}}", "host-a"),
        ("{{.DaemonName}}", "docker"),
        ("{{.ContainerName}}", "/web-1"),
        ('{{index .ContainerLabels "com.example.team"}}', "infra"),
        ('{{index .ContainerLabels "missing"}}', ""),
        ("{{.Name | upper}}", "WEB-1"),
        ("{{upper .Name}}", "WEB-1"),
        ("{{ .Name|upper|lower }}", "web-1"),
        ("{{title .Name}}", "Web-1"),
        ('{{title "hello wORLD_x"}}', "Hello WORLD_x"),
        ('{{upper (index .ContainerLabels "k")}}', "V"),
        ('{{"k" | index .ContainerLabels}}', "v"),
        ("{{.ContainerLabels}}", "map[com.example.team:infra k:v]"),
        ("app/{{.Name}}/{{.ID}}", "app/web-1/0123456789ab"),
        ("{{`raw`}}", "raw"),
        ("plain text", "plain text"),
        ("a { b } c", "a { b } c"),
        ("", ""),
    ],
)
def test_render_tag(template, expected):
    assert render_tag(template, TAG_INFO) == expected


def test_render_tag_on_empty_info_gives_empty_values():
    assert render_tag("{{.ID}}-{{.Name}}-{{.ImageID}}", ContainerInfo()) == "--"


@pytest.mark.parametrize(
    "template, why",
    [
        ("{{.Nope}}", "unknown field .Nope"),
        ("{{shout .Name}}", "unknown function 'shout'"),
        ("{{.Name | shout}}", "unknown function 'shout'"),
        ("{{.Name", "unclosed action"),
        ("{{.Name}", "unexpected '}'"),
        ("a}}", "without a matching"),
        ("{{}}", "empty action"),
        ("{{ }}", "empty action"),
        ("{{.Name .ID}}", "not a function"),
        ("{{upper}}", "takes 1 argument"),
        ("{{upper .Name .ID}}", "takes 1 argument"),
        ("{{index .ContainerLabels}}", "takes 2 arguments"),
        ("{{upper .ContainerLabels}}", "needs a string"),
        ("{{index .Name \"k\"}}", "index needs .ContainerLabels"),
        ("{{.ContainerLabels.k}}", "not supported"),
        ("{{if .Name}}x{{end}}", "unknown function 'if'"),
        ("{{.Name | .ID}}", "can only pipe into a function"),
        ("{{(upper .Name}}", "missing ')'"),
        ("{{- .Name}}", "unexpected '-'"),
    ],
)
def test_bad_tag_template_is_a_config_error(template, why):
    with pytest.raises(ConfigError) as exc:
        render_tag(template, TAG_INFO)
    message = str(exc.value)
    assert message.startswith(f"invalid tag template {template!r}: ") and why in message
