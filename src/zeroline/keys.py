"""CurveZMQ key pairs: creating them (``zeroline keygen``) and loading them for the CURVE transport.

Files are in the format of pyzmq's ``zmq.auth.create_certificates`` (ZeroMQ's ZPL certificates,
as czmq's ``zcert`` writes them), so pyzmq, czmq and zeroline read each other's keys:

* ``NAME.key``: the public certificate, ``curve`` / ``public-key = "<40 Z85 chars>"``;
* ``NAME.key_secret``: the same plus ``secret-key``, created with mode 0600 (never readable by
  anyone else, not even for a moment: the mode is given to ``open(2)``, not set afterwards).

Secret key files readable or writable by group or others are refused when loaded, as ssh refuses
such private keys: a secret that others could read is no longer a secret, and saying so at start
is kinder than a silent leak.
"""

import datetime
import os
import re
import stat

import zmq

from .errors import ConfigError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: A CURVE key in Z85 text: 32 bytes become 40 characters.
Z85_KEY_CHARS = 40
SECRET_FILE_MODE = 0o600
#: Certificates are a few hundred bytes; a "key file" far larger than that is not one.
MAX_CERTIFICATE_BYTES = 64 * 1024

_PUBLIC_BANNER = """#   ****  Generated on {0} by zeroline  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange.

"""
_SECRET_BANNER = """#   ****  Generated on {0} by zeroline  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_Z85_ALPHABET = re.escape("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                          ".-:+=^!/*?&<>()[]{}@%$#")
_Z85_KEY = re.compile("[%s]{%d}" % (_Z85_ALPHABET, Z85_KEY_CHARS))
_PROPERTY = re.compile(r"^\s*(public-key|secret-key)\s*=\s*(.*?)\s*$")


def _certificate(banner, public, secret=None):
    now = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    text = banner.format(now) + "metadata\ncurve\n"
    text += '    public-key = "%s"\n' % public.decode("ascii")
    if secret is not None:
        text += '    secret-key = "%s"\n' % secret.decode("ascii")
    return text.encode("ascii")


def _write_new(path, data, mode, replace):
    """Write ``data`` to a file created with ``mode``; with ``replace``, through a temporary file
    renamed over ``path`` (so a reader never sees half a key), else refusing an existing path."""
    target = path + ".tmp%d" % os.getpid() if replace else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)     # the umask may have taken bits away; never adds any
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
    if replace:
        os.replace(target, path)


def create_keypair(directory, name, force=False):
    """Create a CURVE key pair as ``directory/name.key`` and ``directory/name.key_secret``.

    Args:
        directory: where the files go; created (mode 0700) when missing.
        name: the file name stem: no ``/``, not empty, not ``.`` or ``..``.
        force: replace existing files instead of refusing.

    Returns:
        ``(public_path, secret_path)``.

    Raises:
        ConfigError: a bad name, an existing file without ``force``, a directory that cannot be
            written.
    """
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ConfigError("invalid key name %r: a file name without '/'" % (name,))
    public_path = os.path.join(directory, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(directory, name + SECRET_SUFFIX)
    if not force:
        existing = [p for p in (public_path, secret_path) if os.path.lexists(p)]
        if existing:
            raise ConfigError("%s already exist%s; not overwriting (--force replaces)"
                              % (" and ".join(existing), "s" if len(existing) == 1 else ""))
    public, secret = zmq.curve_keypair()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Secret first: a public key without its secret would be useless; the other way round
        # the public half can always be derived again.
        _write_new(secret_path, _certificate(_SECRET_BANNER, public, secret), SECRET_FILE_MODE,
                   force)
        try:
            _write_new(public_path, _certificate(_PUBLIC_BANNER, public), 0o644, force)
        except BaseException:
            if not force:
                os.unlink(secret_path)
            raise
    except FileExistsError as exc:
        raise ConfigError("%s already exists; not overwriting (--force replaces)"
                          % exc.filename) from None
    except OSError as exc:
        raise ConfigError("cannot write the key pair into %s: %s"
                          % (directory, exc.strerror or exc)) from None
    return public_path, secret_path


def _read_certificate(path, what):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CERTIFICATE_BYTES + 1)
    except OSError as exc:
        raise ConfigError("cannot read %s %s: %s" % (what, path, exc.strerror or exc)) from None
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise ConfigError("%s %s is not a CurveZMQ certificate (over %d bytes)"
                          % (what, path, MAX_CERTIFICATE_BYTES))
    found = {}
    for line in data.decode("utf-8", "replace").splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = _PROPERTY.match(line)
        if match:
            value = match.group(2).strip("'\"")
            if not _Z85_KEY.fullmatch(value):
                raise ConfigError("%s %s: %s is not a 40-character Z85 key"
                                  % (what, path, match.group(1)))
            found.setdefault(match.group(1), value.encode("ascii"))
    return found


def load_public_key(text_or_path):
    """A server's public key, given as 40 Z85 characters or as a certificate file.

    Args:
        text_or_path: Z85 text (str or bytes), or the path of a ``.key`` (or ``.key_secret``) file.

    Returns:
        The key as 40 bytes of Z85 text (what ``zmq.CURVE_SERVERKEY`` takes).

    Raises:
        ConfigError: neither a Z85 key nor a readable certificate with a public key.
    """
    if isinstance(text_or_path, bytes):
        text_or_path = text_or_path.decode("utf-8", "replace")
    text = str(text_or_path).strip()
    if _Z85_KEY.fullmatch(text):
        return text.encode("ascii")
    if not os.path.exists(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ConfigError("CURVE public key %r is neither 40 Z85 characters nor an existing file"
                          % shown)
    found = _read_certificate(text, "certificate")
    if "public-key" not in found:
        raise ConfigError("certificate %s has no public-key" % text)
    return found["public-key"]


def load_secret_key(path):
    """A key pair from a secret certificate (``NAME.key_secret``).

    Group or world access to the file is refused (as ssh refuses such private keys): fix it with
    ``chmod 600 FILE``.

    Returns:
        ``(public, secret)``, each 40 bytes of Z85 text.

    Raises:
        ConfigError: a missing or unreadable file, one without a secret key, mode wider than 0600,
            or a public key that does not belong to the secret key.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError("cannot read secret key %s: %s" % (path, exc.strerror or exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError("secret key %s is not a regular file" % path)
    if st.st_mode & 0o077:
        raise ConfigError("secret key %s is accessible by group or others (mode %04o); "
                          "run chmod 600 %s" % (path, st.st_mode & 0o777, path))
    found = _read_certificate(path, "secret key")
    if "secret-key" not in found:
        raise ConfigError("%s has no secret-key (a public certificate? the secret one is "
                          "NAME%s)" % (path, SECRET_SUFFIX))
    public = zmq.curve_public(found["secret-key"])
    if "public-key" in found and found["public-key"] != public:
        raise ConfigError("secret key %s: its public-key does not belong to its secret-key"
                          % path)
    return public, found["secret-key"]
