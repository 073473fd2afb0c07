"""The package root: re-exports, version, get_include(), and a tiny extension cimporting it."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

import zeroline
from zeroline import core, errors

CONSUMER = textwrap.dedent("""\
    # cython: language_level=3
    # A third-party extension using zeroline's public C API.
    from zeroline cimport Stream

    def count(Stream s, bytes data):
        # Pointer and length are taken with the GIL; the result is converted after the block
        # (a def function cannot return from inside `with nogil`).
        cdef const char *p = data
        cdef size_t n = len(data)
        cdef Py_ssize_t queued
        with nogil:
            queued = s.feed_raw(p, n, 1000)
        return queued

    def finish(Stream s):
        cdef Py_ssize_t queued
        with nogil:
            queued = s.close_raw(2000)
        return queued

    def pending(Stream s):
        return s.pending_count()
    """)


# --- the package root --------------------------------------------------------------------------


def test_root_reexports_the_dispatched_core():
    for name in ("IMPLEMENTATION", "LineCutter", "Stream", "Receiver", "Message", "Partial",
                 "Framer", "decode", "DEFAULT_LINE_BUFFER"):
        assert getattr(zeroline, name) is getattr(core, name), name
    assert zeroline.DEFAULT_LINE_BUFFER == 16384


def test_root_reexports_the_exception_tree():
    for name in ("ZerolineError", "ConfigError", "ProtocolError", "TransportError"):
        assert getattr(zeroline, name) is getattr(errors, name), name
    assert set(zeroline.__all__) <= set(dir(zeroline))


def test_version_comes_from_the_installed_metadata():
    try:
        expected = importlib.metadata.version("zeroline")
    except importlib.metadata.PackageNotFoundError:
        expected = "0+unknown"
    assert zeroline.__version__ == expected
    assert zeroline.__version__[0].isdigit()


def test_module_docstring_is_one_line():
    assert zeroline.__doc__ and "\n" not in zeroline.__doc__.strip()


def test_get_include_is_the_parent_of_the_package_with_its_pxd_files():
    include = zeroline.get_include()
    assert os.path.isabs(include)
    package = os.path.join(include, "zeroline")
    assert os.path.samefile(package, os.path.dirname(zeroline.__file__))
    assert os.path.isfile(os.path.join(package, "_core.pxd"))
    assert os.path.isfile(os.path.join(package, "__init__.pxd"))


def test_import_is_cheap_and_creates_no_zmq_context():
    code = ("import zeroline, sys, zmq\n"
            "assert zmq.Context._instance is None, 'a global zmq context was created'\n"
            "assert 'zeroline.collector' not in sys.modules and 'zeroline.cli' not in sys.modules\n"
            "print(zeroline.IMPLEMENTATION)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == core.IMPLEMENTATION


# --- cimport: a consumer extension built against zeroline.get_include() ------------------------


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    compiled = pytest.importorskip("zeroline._core", reason="the compiled core is not built")
    Cython = pytest.importorskip("Cython.Build")
    setuptools = pytest.importorskip("setuptools")
    work = tmp_path_factory.mktemp("cimport")
    pyx = work / "zl_consumer.pyx"
    pyx.write_text(CONSUMER)
    extensions = Cython.cythonize(
        [setuptools.Extension("zl_consumer", [str(pyx)])],
        include_path=[zeroline.get_include()], build_dir=str(work / "c"), quiet=True,
        force=True)
    dist = setuptools.Distribution({"ext_modules": extensions, "script_name": "setup.py"})
    build = dist.get_command_obj("build_ext")
    build.build_lib = str(work / "lib")
    build.build_temp = str(work / "tmp")
    dist.run_command("build_ext")
    path = build.get_ext_fullpath("zl_consumer")
    spec = importlib.util.spec_from_file_location("zl_consumer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return compiled, module


def test_consumer_feeds_a_stream_without_the_gil(consumer):
    compiled, module = consumer
    config = dict(tenant="t", service="s", container_id="c", max_line_bytes=4, id_seed=1)
    stream = compiled.Stream(**config)
    assert module.count(stream, b"ab\ncdefgh\nxy") == 3       # "ab", chunk "cdef", "gh" (last)
    assert module.pending(stream) == 3 == stream.pending_messages
    assert module.count(stream, b"") == 0
    assert module.finish(stream) == 1                         # "xy", closed at EOF
    assert module.pending(stream) == 4

    reference = compiled.Stream(**config)
    reference.feed(b"ab\ncdefgh\nxy", 1000)
    reference.close(2000)
    expected = reference.take()
    assert stream.take() == expected
    assert [f[2] for f in expected] == [b"c: ab", b"c: cdef", b"c: gh", b"c: xy"]
    assert module.pending(stream) == 0


def test_consumer_uses_the_time_it_passes(consumer):
    compiled, module = consumer
    import msgpack

    stream = compiled.Stream(framing="msgpack")
    assert module.count(stream, b"one\ntwo\n") == 2
    assert [msgpack.unpackb(f[2])["time_nano"] for f in stream.take()] == [1000, 1000]


def test_consumer_rejects_other_objects(consumer):
    compiled, module = consumer
    with pytest.raises(TypeError):
        module.count(core.implementations()["python"].Stream(), b"x\n")
    with pytest.raises(TypeError):
        module.count(compiled.Stream(), "not bytes")
