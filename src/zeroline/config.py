"""Log-opts of the zmq driver: one options table drives validation, --help and the Docker plugin."""

from __future__ import annotations

import ipaddress
import json
import re
import socket as _socket
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

from zeroline.errors import ConfigError

__all__ = [
    "OPTIONS",
    "ContainerInfo",
    "Driver",
    "LogOpt",
    "ZmqOptions",
    "drivers",
    "extra_attributes",
    "get_driver",
    "parse_binary_size",
    "parse_bool",
    "parse_decimal_size",
    "parse_duration",
    "register_driver",
    "render_tag",
    "tenant_service",
    "validate_log_opts",
]

_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1
_LINE_BUFFER_MAX_BYTES = 16 * 1024 * 1024
# sun_path is 108 bytes on Linux and libzmq needs room for the terminating NUL.
_IPC_PATH_MAX_BYTES = 107
# Unacknowledged batches of the acked transport: each holds up to 256 KiB of records.
_WINDOW_MAX = 4096


class _Invalid(Exception):
    """Why one value is bad; the caller turns it into a ConfigError that names the value."""


def _q(text: object) -> str:
    # repr keeps the message on one line even when the value holds a newline.
    return repr(text if isinstance(text, str) else str(text))


def _require_str(text: object) -> str:
    if not isinstance(text, str):
        raise _Invalid(f"expected a string, got {type(text).__name__}")
    return text


# ---------------------------------------------------------------------------------------------
# Parsers for sizes, durations and booleans


# go-units: a number, an optional single space, an optional suffix. Only plain decimal numbers
# are taken (Go's ParseFloat would also take "1e3", "inf" or hex floats; nobody means those).
_SIZE_RE = re.compile(
    r"(?P<sign>[-+]?)(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+) ?(?P<suffix>[A-Za-z]*)"
)
_SIZE_PREFIXES = "kmgtp"
_SIZE_EXPECTED = "expected a number with an optional suffix b, k, kb, kib, m, mb, mib, g ... p"


def _parse_size(text: object, base: int) -> int:
    text = _require_str(text)
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise _Invalid(_SIZE_EXPECTED)
    value = Fraction(match["num"])
    if match["sign"] == "-" and value:
        raise _Invalid("a size must not be negative")
    suffix = match["suffix"].lower()
    if suffix and suffix != "b":
        # The base comes from the parser, never from the suffix: "mib" and "mb" mean the same.
        power = _SIZE_PREFIXES.find(suffix[0]) + 1
        if power == 0 or suffix[1:] not in ("", "b", "ib"):
            raise _Invalid(f"unknown suffix {_q(match['suffix'])}; {_SIZE_EXPECTED}")
        value *= base**power
    size = int(value)  # truncates like Go's int64(float64)
    if size > _INT64_MAX:
        raise _Invalid("the size does not fit in 64 bits")
    return size


def parse_binary_size(text: str) -> int:
    """Parse a size with base 1024 whatever the suffix, like go-units RAMInBytes.

    ``"1m"``, ``"1mb"`` and ``"1mib"`` are all 1048576; ``"1.5k"`` is 1536; ``"10 kb"`` is 10240.

    Raises:
        ConfigError: the text is negative, malformed or has an unknown suffix.
    """
    try:
        return _parse_size(text, 1024)
    except _Invalid as exc:
        raise ConfigError(f"invalid size {_q(text)}: {exc}") from None


def parse_decimal_size(text: str) -> int:
    """Parse a size with base 1000 whatever the suffix, like go-units FromHumanSize.

    ``"1m"``, ``"1mb"`` and ``"1mib"`` are all 1000000.

    Raises:
        ConfigError: the text is negative, malformed or has an unknown suffix.
    """
    try:
        return _parse_size(text, 1000)
    except _Invalid as exc:
        raise ConfigError(f"invalid size {_q(text)}: {exc}") from None


_NS_PER_S = 1_000_000_000
_DURATION_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign, accepted by Go
    "\u03bcs": 1_000,  # Greek mu, accepted by Go
    "ms": 1_000_000,
    "s": _NS_PER_S,
    "m": 60 * _NS_PER_S,
    "h": 3600 * _NS_PER_S,
}
_DURATION_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
# "ms" must be tried before "m" so "1ms" is not read as one minute followed by garbage.
_DURATION_PART_RE = re.compile(rf"({_DURATION_NUMBER})(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_DURATION_BARE_RE = re.compile(_DURATION_NUMBER)
_DURATION_EXPECTED = "expected a duration like 500ms, 5s, 1m30s, 2h or a number of seconds"


def _scaled_ns(number: str, unit_ns: int) -> int:
    whole, _, fraction = number.partition(".")
    ns = int(whole or "0") * unit_ns
    if fraction:
        ns += int(fraction) * unit_ns // 10 ** len(fraction)  # Go also drops sub-nanoseconds
    return ns


def _parse_duration(text: object) -> float:
    text = _require_str(text)
    sign, body = (text[0], text[1:]) if text[:1] in ("-", "+") else ("", text)
    if _DURATION_BARE_RE.fullmatch(body):
        # Our extension: a bare number is seconds ("0" is also what Go accepts without a unit).
        ns = _scaled_ns(body, _NS_PER_S)
    else:
        ns, pos = 0, 0
        while pos < len(body):
            match = _DURATION_PART_RE.match(body, pos)
            if match is None:
                raise _Invalid(_DURATION_EXPECTED)
            ns += _scaled_ns(match[1], _DURATION_UNITS_NS[match[2]])
            pos = match.end()
        if not body:
            raise _Invalid(_DURATION_EXPECTED)
    if ns > _INT64_MAX:
        raise _Invalid("the duration is too long (more than 292 years)")
    if sign == "-" and ns:
        raise _Invalid("a duration must not be negative")
    return ns / _NS_PER_S


def parse_duration(text: str) -> float:
    """Parse a Go duration ("500ms", "1m30s", "1.5s", "0") or a bare number of seconds.

    Returns:
        The duration in seconds.

    Raises:
        ConfigError: the text is negative or not a duration.
    """
    try:
        return _parse_duration(text)
    except _Invalid as exc:
        raise ConfigError(f"invalid duration {_q(text)}: {exc}") from None


_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _parse_bool(text: object) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _Invalid("expected a boolean: true, false, 1, 0, t or f")


def parse_bool(text: str) -> bool:
    """Parse a boolean exactly like Go's strconv.ParseBool (1, t, T, TRUE, true, True, 0, f, ...).

    Raises:
        ConfigError: anything else, including " true" or "yes".
    """
    try:
        return _parse_bool(text)
    except _Invalid as exc:
        raise ConfigError(f"invalid boolean {_q(text)}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Other value kinds of the options table

_ENDPOINT_EXPECTED = "expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _check_tcp_host(host: str) -> None:
    if host.startswith("["):
        if not host.endswith("]"):
            raise _Invalid(f"unclosed '[' in host {_q(host)}")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _Invalid(f"{_q(host[1:-1])} is not an IPv6 address") from None
    elif host == "*":
        raise _Invalid("'*' only works for binding; give the host to connect to")
    elif ":" in host:
        raise _Invalid("write an IPv6 host in brackets, e.g. tcp://[::1]:5555")
    elif not _HOSTNAME_RE.fullmatch(host):
        raise _Invalid(f"{_q(host)} is not a host name or IP address")
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host.rstrip("."))
        except ValueError:
            raise _Invalid(f"{_q(host)} is not an IPv4 address") from None


def _parse_endpoint(text: object) -> str:
    text = _require_str(text)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        raise _Invalid(_ENDPOINT_EXPECTED)
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise _Invalid("expected tcp://HOST:PORT")
        _check_tcp_host(host)
        if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise _Invalid("the port must be an integer from 1 to 65535")
    elif scheme == "ipc":
        if not rest:
            raise _Invalid("expected ipc://PATH with a non-empty path")
        if "\0" in rest:
            raise _Invalid("the ipc path must not contain a NUL byte")
        size = len(rest.encode("utf-8", "surrogateescape"))
        if size > _IPC_PATH_MAX_BYTES:
            raise _Invalid(
                f"the ipc path is {size} bytes, "
                f"more than the {_IPC_PATH_MAX_BYTES} that fit in sun_path"
            )
    elif not rest:
        raise _Invalid("expected inproc://NAME with a non-empty name")
    return text


def _parse_hwm(text: object) -> int:
    text = _require_str(text)
    if not re.fullmatch(r"[0-9]+", text) or int(text) > _INT32_MAX:
        raise _Invalid(f"expected an integer from 0 to {_INT32_MAX}")
    return int(text)


def _parse_line_buffer(text: object) -> int:
    size = _parse_size(text, 1024)
    if not 1 <= size <= _LINE_BUFFER_MAX_BYTES:
        raise _Invalid(f"must be from 1 byte to 16 MiB ({_LINE_BUFFER_MAX_BYTES} bytes)")
    return size


def _parse_window(text: object) -> int:
    value = _parse_hwm(text)
    if not 1 <= value <= _WINDOW_MAX:
        raise _Invalid(f"expected an integer from 1 to {_WINDOW_MAX}")
    return value


def _parse_spool_dir(text: object) -> str | None:
    text = _require_str(text)
    if "\0" in text:
        raise _Invalid("the path must not contain a NUL byte")
    return text or None


def _parse_list(text: object) -> tuple[str, ...]:
    # Docker splits on "," without trimming; we also trim blanks and drop empty items.
    return tuple(item.strip() for item in _require_str(text).split(",") if item.strip())


def _parse_regex(text: object) -> re.Pattern[str] | None:
    text = _require_str(text)
    if not text:
        return None  # Docker ignores an empty regex option
    try:
        return re.compile(text)
    except re.error as exc:
        raise _Invalid(f"bad regular expression: {exc}") from None


def _parse_tag(text: object) -> str | None:
    text = _require_str(text)
    if not text:
        return None  # an empty tag means no tag, as in Docker
    # Rendering against an empty container also catches type errors such as upper of a map;
    # the ConfigError it raises already names the tag and says why.
    render_tag(text, ContainerInfo())
    return text


def _parse_string(text: object) -> str:
    return _require_str(text)


def _parse_curve_public_key(text: object) -> bytes | None:
    text = _require_str(text)
    if not text:
        return None
    # zeroline.keys imports zmq: only when CURVE is asked for.
    from zeroline.keys import load_public_key

    try:
        return load_public_key(text)
    except ConfigError as exc:
        raise _Invalid(str(exc)) from None


def _parse_curve_secret_key(text: object) -> tuple[bytes, bytes] | None:
    text = _require_str(text)
    if not text:
        return None
    from zeroline.keys import load_secret_key

    try:
        return load_secret_key(text)
    except ConfigError as exc:
        raise _Invalid(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# The options table


@dataclass(frozen=True)
class LogOpt:
    """One log-opt of the zmq driver.

    ``default`` is the string a user would write (``"5s"``, ``"16384"``), or None when the option
    has no default; ``kind`` names the value type (endpoint, choice, int, binary-size, duration,
    bool, list, regex, template, string, path, curve-public-key, curve-secret-key); ``choices`` lists the accepted words of a choice.
    """

    name: str
    kind: str
    default: str | None
    help: str
    choices: tuple[str, ...] | None = None


OPTIONS: dict[str, LogOpt] = {
    opt.name: opt
    for opt in (
        LogOpt(
            "zmq-address", "endpoint", None,
            "ZeroMQ endpoint to connect to: tcp://HOST:PORT, ipc://PATH or inproc://NAME.",
        ),
        LogOpt(
            "zmq-socket", "choice", "pub",
            "pub: lines to all subscribers; push: to one puller; acked: acknowledged batches.",
            ("pub", "push", "acked"),
        ),
        LogOpt(
            "zmq-hwm", "int", "1000",
            "pub/push: messages that may queue per peer before sends wait; 0 means no limit.",
        ),
        LogOpt(
            "zmq-framing", "choice", "seed",
            "Third frame: seed is '<id>: <line>'; msgpack a record with time, source, partial, attrs.",
            ("seed", "msgpack"),
        ),
        LogOpt(
            "zmq-container-id", "choice", "short",
            "Container ID sent with each line: short (12 characters, as docker ps) or full (64).",
            ("short", "full"),
        ),
        LogOpt(
            "zmq-line-buffer", "binary-size", "16384",
            "Longest piece of a line in one message; longer lines are sent as partial chunks.",
        ),
        LogOpt(
            "zmq-linger", "duration", "5s",
            "At the end, how long to wait without progress for unsent or unacknowledged lines.",
        ),
        LogOpt(
            "zmq-peer-wait", "duration", "5s",
            "After this long without a collector, say so on stderr (once); never fatal. 0: never.",
        ),
        LogOpt(
            "zmq-window", "int", "32",
            "acked: batches sent and not yet acknowledged before sending waits.",
        ),
        LogOpt(
            "spool-dir", "path", None,
            "Disk buffer: every batch until acked; pub/push: an outage's lines. Resumed later.",
        ),
        LogOpt(
            "spool-max-size", "binary-size", "1g",
            "With spool-dir: most disk the spool may use; then the mode's backpressure.",
        ),
        LogOpt(
            "zmq-curve-server-key", "curve-public-key", None,
            "CURVE: the collector's public key, 40 Z85 characters or its .key certificate file.",
        ),
        LogOpt(
            "zmq-curve-key", "curve-secret-key", None,
            "CURVE: this forwarder's secret certificate file (NAME.key_secret, mode 0600).",
        ),
        LogOpt(
            "mode", "choice", "blocking",
            "blocking waits for the driver; non-blocking buffers lines and drops new ones if full.",
            ("blocking", "non-blocking"),
        ),
        LogOpt(
            "max-buffer-size", "binary-size", "1000000",
            "mode=non-blocking: line bytes that may wait before new lines drop; 1m = 1,048,576.",
        ),
        LogOpt(
            "labels", "list", None,
            "Comma-separated container label keys to send with each line.",
        ),
        LogOpt(
            "labels-regex", "regex", None,
            "Regular expression; container labels whose key matches are sent with each line.",
        ),
        LogOpt(
            "env", "list", None,
            "Comma-separated environment variable names to send with each line.",
        ),
        LogOpt(
            "env-regex", "regex", None,
            "Regular expression; environment variables whose name matches are sent with each line.",
        ),
        LogOpt(
            "tag", "template", None,
            "Tag sent with each line, a Docker template such as {{.Name}} or {{.ID}}.",
        ),
        LogOpt(
            "cache-disabled", "bool", None,
            "Plugin: true turns off the local copy docker logs reads (else false); run/forward: "
            "ignored.",
        ),
        LogOpt(
            "cache-max-file", "string", None,
            "Plugin: files the local copy keeps (else 5); run/forward: ignored.",
        ),
        LogOpt(
            "cache-max-size", "string", None,
            "Plugin: local copy file size before it rotates, 20m = 20e6 (else 20 MiB); "
            "run/forward: ignored.",
        ),
        LogOpt(
            "cache-compress", "string", None,
            "Plugin: gzip rotated local copy files (else true); run/forward: ignored.",
        ),
    )
}

_PARSERS: dict[str, Callable[[object], Any]] = {
    "endpoint": _parse_endpoint,
    "int": _parse_hwm,
    "binary-size": lambda text: _parse_size(text, 1024),
    "duration": _parse_duration,
    "bool": _parse_bool,
    "list": _parse_list,
    "regex": _parse_regex,
    "template": _parse_tag,
    "string": _parse_string,
    "path": _parse_spool_dir,
    "curve-public-key": _parse_curve_public_key,
    "curve-secret-key": _parse_curve_secret_key,
}
# Range checks beyond the kind's own parser.
_SPECIAL_PARSERS: dict[str, Callable[[object], Any]] = {
    "zmq-line-buffer": _parse_line_buffer,
    "zmq-window": _parse_window,
}


def _parse_option(name: str, text: object) -> Any:
    opt = OPTIONS[name]
    try:
        if opt.kind == "choice":
            if text not in opt.choices:
                raise _Invalid("expected " + " or ".join(opt.choices))
            return text
        return _SPECIAL_PARSERS.get(name, _PARSERS[opt.kind])(text)
    except _Invalid as exc:
        raise ConfigError(f"invalid {name} {_q(text)}: {exc}") from None


@dataclass(frozen=True)
class ZmqOptions:
    """Validated log-opts of one container; ``raw`` is a copy of the options as given."""

    address: str | None
    socket: str = "pub"
    hwm: int = 1000
    framing: str = "seed"
    container_id_format: str = "short"
    line_buffer: int = 16384
    linger_s: float = 5.0
    peer_wait_s: float = 5.0
    window: int = 32
    spool_dir: str | None = None
    spool_max_size: int = 1 << 30
    mode: str = "blocking"
    max_buffer_size: int = 1000000
    labels: tuple[str, ...] = ()
    labels_regex: re.Pattern[str] | None = None
    env: tuple[str, ...] = ()
    env_regex: re.Pattern[str] | None = None
    tag: str | None = None
    #: CURVE: the collector's public key (Z85), and this side's (public, secret) key pair (Z85).
    curve_server_key: bytes | None = None
    curve_key: tuple[bytes, bytes] | None = None
    raw: dict[str, str] = field(default_factory=dict)


_ATTRIBUTES = {
    "zmq-address": "address",
    "zmq-socket": "socket",
    "zmq-hwm": "hwm",
    "zmq-framing": "framing",
    "zmq-container-id": "container_id_format",
    "zmq-line-buffer": "line_buffer",
    "zmq-linger": "linger_s",
    "zmq-peer-wait": "peer_wait_s",
    "zmq-window": "window",
    "spool-dir": "spool_dir",
    "spool-max-size": "spool_max_size",
    "mode": "mode",
    "max-buffer-size": "max_buffer_size",
    "labels": "labels",
    "labels-regex": "labels_regex",
    "env": "env",
    "env-regex": "env_regex",
    "tag": "tag",
    "zmq-curve-server-key": "curve_server_key",
    "zmq-curve-key": "curve_key",
}


def validate_log_opts(
    opts: Mapping[str, str], driver: str = "zmq", *, require_address: bool = True
) -> ZmqOptions:
    """Check the log-opts of one container and return them parsed.

    The checks run in Docker's order (``mode``, ``max-buffer-size`` only with
    ``mode=non-blocking``, ``cache-disabled``), then the first unknown key in sorted order is
    rejected, then ``zmq-address`` is required, then every value is parsed.

    Args:
        opts: the log-opts as Docker passes them, strings to strings.
        driver: the driver name used in messages.
        require_address: when False, a missing ``zmq-address`` gives ``address=None`` so the
            caller can fill in its own default.

    Returns:
        The parsed options, defaults filled in.

    Raises:
        ConfigError: one line naming the option and its bad value.
    """
    raw = dict(opts)
    values: dict[str, Any] = {}
    # 1. mode; Docker reads an empty mode as blocking.
    values["mode"] = _parse_option("mode", raw.get("mode") or "blocking")
    # 2. max-buffer-size only with mode=non-blocking, parsed as a binary size.
    if "max-buffer-size" in raw and values["mode"] != "non-blocking":
        raise ConfigError(
            f"invalid max-buffer-size {_q(raw['max-buffer-size'])}: "
            f"only allowed with mode=non-blocking (mode is {values['mode']})"
        )
    # 3. cache-disabled must be a bool; the other cache-* keys are Docker's business.
    for name in ("max-buffer-size", "cache-disabled"):
        if name in raw:
            values[name] = _parse_option(name, raw[name])

    for key in sorted(raw):
        if key not in OPTIONS:
            valid = ", ".join(sorted(OPTIONS))
            raise ConfigError(f"unknown log opt {_q(key)} for {driver} log driver (valid: {valid})")
    if require_address and "zmq-address" not in raw:
        raise ConfigError(f"missing required log opt 'zmq-address' for {driver} log driver")

    for name, opt in OPTIONS.items():
        if name in values:
            continue
        if name in raw:
            values[name] = _parse_option(name, raw[name])
        elif opt.default is not None:
            values[name] = _parse_option(name, opt.default)
    if (values.get("zmq-curve-server-key") is None) != (values.get("zmq-curve-key") is None):
        given, missing = (
            ("zmq-curve-server-key", "zmq-curve-key")
            if values.get("zmq-curve-server-key") is not None
            else ("zmq-curve-key", "zmq-curve-server-key")
        )
        raise ConfigError(
            f"invalid {given} {_q(raw[given])}: CURVE needs both zmq-curve-server-key (the "
            f"collector's public key) and zmq-curve-key (this side's secret key); {missing} is "
            f"missing"
        )
    if values.get("zmq-socket") == "acked":
        if raw.get("zmq-framing") == "seed":
            raise ConfigError(
                "invalid zmq-framing 'seed': zmq-socket=acked always carries full msgpack "
                "records; leave zmq-framing out or set it to msgpack"
            )
        values["zmq-framing"] = "msgpack"
    else:
        for name in ("zmq-window",):
            if name in raw:
                raise ConfigError(
                    f"invalid {name} {_q(raw[name])}: only used with zmq-socket=acked "
                    f"(zmq-socket is {values.get('zmq-socket')})"
                )
    return ZmqOptions(
        address=values.get("zmq-address"),
        raw=raw,
        **{
            _ATTRIBUTES[name]: value
            for name, value in values.items()
            if name in _ATTRIBUTES and name != "zmq-address"
        },
    )


# ---------------------------------------------------------------------------------------------
# Container info, attributes and tags


@dataclass(frozen=True)
class ContainerInfo:
    """What the driver knows about one container (the parts of Docker's logger Info it uses)."""

    container_id: str = ""
    container_name: str = ""
    env: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    image_id: str = ""
    image_name: str = ""
    entrypoint: str = ""
    args: tuple[str, ...] = ()
    hostname: str = ""
    created: str = ""

    @classmethod
    def from_docker(cls, info_json: Mapping[str, Any]) -> ContainerInfo:
        """Build from the ``Info`` object of a StartLogging request (null env and labels allowed).

        Docker's Info has no host name (its ``.Hostname`` is the daemon host's), so a
        ``Hostname`` key is used if present, else this host's name.
        """
        return cls(
            container_id=info_json.get("ContainerID") or "",
            container_name=info_json.get("ContainerName") or "",
            env=tuple(info_json.get("ContainerEnv") or ()),
            labels=dict(info_json.get("ContainerLabels") or {}),
            image_id=info_json.get("ContainerImageID") or "",
            image_name=info_json.get("ContainerImageName") or "",
            entrypoint=info_json.get("ContainerEntrypoint") or "",
            args=tuple(info_json.get("ContainerArgs") or ()),
            hostname=info_json.get("Hostname") or _socket.gethostname(),
            created=info_json.get("ContainerCreated") or "",
        )

    @property
    def short_id(self) -> str:
        """The first 12 characters of the container ID, as ``docker ps`` shows it."""
        return self.container_id[:12]

    @property
    def name(self) -> str:
        """The container name without Docker's leading ``/``."""
        return self.container_name.removeprefix("/")


def _env_mapping(env: Sequence[str]) -> dict[str, str]:
    mapping = {}
    for entry in env:
        key, sep, value = entry.partition("=")
        if sep:
            mapping[key] = value  # the last occurrence wins
    return mapping


def tenant_service(env: Sequence[str]) -> tuple[str, str]:
    """Read ``TENANT_ID`` and ``SERVICE_ID`` from a ``K=V`` env list.

    Entries are split at the first ``=``, entries without one are ignored and the last
    occurrence wins; an absent or empty value is ``"default"``.
    """
    mapping = _env_mapping(env)
    return mapping.get("TENANT_ID") or "default", mapping.get("SERVICE_ID") or "default"


def extra_attributes(info: ContainerInfo, options: ZmqOptions) -> dict[str, str]:
    """Attributes sent with each line, merged like Docker's Info.ExtraAttributes.

    Order: labels named in ``labels``, labels matching ``labels-regex``, env names in ``env``,
    env names matching ``env-regex`` (a later one overwrites an earlier one), then ``tag``.
    Regex matches are added in sorted key order so the result does not depend on input order.
    """
    extra: dict[str, str] = {}
    for key in options.labels:
        if key in info.labels:
            extra[key] = info.labels[key]
    if options.labels_regex is not None:
        for key in sorted(info.labels):
            if options.labels_regex.search(key):
                extra[key] = info.labels[key]
    env = _env_mapping(info.env)
    for key in options.env:
        if key in env:
            extra[key] = env[key]
    if options.env_regex is not None:
        for key in sorted(env):
            if options.env_regex.search(key):
                extra[key] = env[key]
    if options.tag:
        extra["tag"] = render_tag(options.tag, info)
    return extra


def _is_word_separator(char: str) -> bool:
    # Go's strings.Title rule: ASCII letters, digits and "_" continue a word, other ASCII ends it;
    # beyond ASCII, letters and digits continue a word and only spaces end it.
    if char <= "\x7f":
        return not (char.isalnum() or char == "_")
    if char.isalpha() or char.isdigit():
        return False
    return char.isspace()


def _go_title(text: str) -> str:
    # Unlike str.title(), Go upper-cases the first letter of each word and leaves the rest alone.
    out, previous = [], " "
    for char in text:
        out.append(char.upper() if _is_word_separator(previous) else char)
        previous = char
    return "".join(out)


def _image_id(info: ContainerInfo) -> str:
    # stringid.TruncateID: drop everything up to the first ":" (the algorithm), keep 12 chars.
    return info.image_id.partition(":")[2][:12] if ":" in info.image_id else info.image_id[:12]


_TAG_FIELDS: dict[str, Callable[[ContainerInfo], Any]] = {
    "ID": lambda info: info.short_id,
    "FullID": lambda info: info.container_id,
    "Name": lambda info: info.name,
    "ImageID": _image_id,
    "ImageFullID": lambda info: info.image_id,
    "ImageName": lambda info: info.image_name,
    "Command": lambda info: " ".join((info.entrypoint, *info.args)),
    "Hostname": lambda info: info.hostname,
    "DaemonName": lambda info: "docker",
    # Raw Info fields, as Docker's template sees them.
    "ContainerID": lambda info: info.container_id,
    "ContainerName": lambda info: info.container_name,
    "ContainerEntrypoint": lambda info: info.entrypoint,
    "ContainerImageID": lambda info: info.image_id,
    "ContainerImageName": lambda info: info.image_name,
    "ContainerLabels": lambda info: info.labels,
}
_TAG_FUNCS = {"upper": str.upper, "lower": str.lower, "title": _go_title, "index": None}

_TAG_TOKEN_RE = re.compile(
    r"""[ \t\r\n]*(?:
        (?P<close>\}\})
      | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*")
      | (?P<raw>`[^`]*`)
      | (?P<punct>[|()])
    )""",
    re.VERBOSE,
)
_OPERAND_TOKENS = ("field", "string", "raw")


class _TagParser:
    """Recursive descent over the tokens of one action: pipelines, calls, fields and strings.

    Nodes are tuples: ("text", str), ("field", name), ("call", function, args).
    """

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise _Invalid("missing value in action")
        self.pos += 1
        return token

    def starts_operand(self) -> bool:
        token = self.peek()
        return token is not None and (token[0] in _OPERAND_TOKENS or token == ("punct", "("))

    def action(self) -> tuple:
        node = self.pipeline()
        if self.peek() is not None:
            raise _Invalid(f"unexpected {self.peek()[1]!r} in action")
        return node

    def pipeline(self) -> tuple:
        node = self.command(None)
        while self.peek() == ("punct", "|"):
            self.pos += 1
            node = self.command(node)
        return node

    def command(self, piped: tuple | None) -> tuple:
        kind, value = self.take()
        if kind != "ident":
            if piped is not None:
                raise _Invalid(f"can only pipe into a function, not into {value!r}")
            self.pos -= 1
            node = self.operand()
            if self.starts_operand():
                raise _Invalid(f"{value!r} is not a function and takes no arguments")
            return node
        if value not in _TAG_FUNCS:
            raise _Invalid(f"unknown function {value!r}")
        args = []
        while self.starts_operand():
            args.append(self.operand())
        if piped is not None:
            args.append(piped)  # a pipe passes its value as the last argument
        wanted = 2 if value == "index" else 1
        if len(args) != wanted:
            plural = "s" if wanted > 1 else ""
            raise _Invalid(f"{value} takes {wanted} argument{plural}, got {len(args)}")
        return ("call", value, tuple(args))

    def operand(self) -> tuple:
        kind, value = self.take()
        if kind == "field":
            name = value[1:]
            if "." in name:
                raise _Invalid(f"field chains like {value} are not supported")
            if name not in _TAG_FIELDS:
                raise _Invalid(f"unknown field {value}")
            return ("field", name)
        if kind == "string":
            try:
                return ("text", json.loads(value))
            except ValueError:
                raise _Invalid(f"bad string literal {value}") from None
        if kind == "raw":
            return ("text", value[1:-1])
        if (kind, value) == ("punct", "("):
            node = self.pipeline()
            if self.peek() != ("punct", ")"):
                raise _Invalid("missing ')'")
            self.pos += 1
            return node
        raise _Invalid(f"unexpected {value!r}")


@lru_cache(maxsize=256)
def _compile_tag(template: str) -> tuple:
    parts: list[Any] = []
    pos = 0
    while pos < len(template):
        start = template.find("{{", pos)
        text = template[pos:] if start < 0 else template[pos:start]
        if "}}" in text:
            raise _Invalid("'}}' without a matching '{{'")
        if text:
            parts.append(text)
        if start < 0:
            break
        tokens, pos = [], start + 2
        while True:
            match = _TAG_TOKEN_RE.match(template, pos)
            if match is None:
                if template[pos:].strip() == "":
                    raise _Invalid("unclosed action: missing '}}'")
                raise _Invalid(f"unexpected {template[pos:].lstrip()[0]!r} in action")
            pos = match.end()
            if match.lastgroup == "close":
                break
            tokens.append((match.lastgroup, match[match.lastgroup]))
        if not tokens:
            raise _Invalid("empty action '{{}}'")
        parts.append(_TagParser(tokens).action())
    return tuple(parts)


def _go_format(value: Any) -> str:
    if isinstance(value, dict):  # Go prints a map as map[k1:v1 k2:v2], keys sorted
        return "map[" + " ".join(f"{key}:{value[key]}" for key in sorted(value)) + "]"
    return value


def _evaluate(node: tuple, info: ContainerInfo) -> Any:
    kind = node[0]
    if kind == "text":
        return node[1]
    if kind == "field":
        return _TAG_FIELDS[node[1]](info)
    _, function, arg_nodes = node
    args = [_evaluate(arg, info) for arg in arg_nodes]
    if function == "index":
        labels, key = args
        if not isinstance(labels, dict):
            raise _Invalid("index needs .ContainerLabels as its first argument")
        if not isinstance(key, str):
            raise _Invalid("index needs a string key")
        return labels.get(key, "")
    if not isinstance(args[0], str):
        raise _Invalid(f"{function} needs a string, not a map")
    return _TAG_FUNCS[function](args[0])


def render_tag(template: str, info: ContainerInfo) -> str:
    """Render a Docker log tag template such as ``{{.Name}}/{{.ID}}`` or ``{{.Name | upper}}``.

    Supports the fields ID, FullID, Name, ImageID, ImageFullID, ImageName, Command, Hostname,
    DaemonName, the raw Container* fields, ``index .ContainerLabels "k"``, the functions upper,
    lower and title (called or piped), string literals and parentheses.

    Raises:
        ConfigError: ``invalid tag template '...': <why>`` for anything else.
    """
    try:
        parts = _compile_tag(_require_str(template))
        return "".join(
            part if isinstance(part, str) else _go_format(_evaluate(part, info)) for part in parts
        )
    except _Invalid as exc:
        raise ConfigError(f"invalid tag template {_q(template)}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Driver registry, after Docker's logger factory


@dataclass(frozen=True)
class Driver:
    """A log driver: ``creator(info, options)`` makes a sink, ``validator(opts)`` checks opts."""

    name: str
    creator: Callable[..., Any]
    validator: Callable[..., Any]


_DRIVERS: dict[str, Driver] = {}
_DRIVERS_LOCK = threading.Lock()


def register_driver(
    name: str, creator: Callable[..., Any], validator: Callable[..., Any]
) -> Driver:
    """Register a log driver under a new name.

    Raises:
        ConfigError: a driver of that name is already registered.
    """
    with _DRIVERS_LOCK:
        if name in _DRIVERS:
            raise ConfigError(f"logger: log driver named {_q(name)} is already registered")
        driver = _DRIVERS[name] = Driver(name, creator, validator)
    return driver


def get_driver(name: str) -> Driver:
    """Look up a registered log driver.

    Raises:
        ConfigError: no driver of that name is registered.
    """
    with _DRIVERS_LOCK:
        driver = _DRIVERS.get(name)
    if driver is None:
        raise ConfigError(f"logger: no log driver named {_q(name)} is registered")
    return driver


def drivers() -> list[str]:
    """Names of the registered log drivers, sorted."""
    with _DRIVERS_LOCK:
        return sorted(_DRIVERS)
