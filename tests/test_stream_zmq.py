"""Stream.send and Receiver on real pyzmq sockets over ipc://, on both implementations."""

import os
import threading
import time

import msgpack
import pytest
import zmq

from zeroline.errors import TransportError

POLL_MS = 10_000          # generous bound for one expected event; never asserted as a duration


def expected_frames(impl, data, **kwargs):
    """What a stream configured like the sender queues for ``data`` (same seed, same times)."""
    twin = impl.Stream(**kwargs)
    twin.feed(data, 1000)
    twin.close(2000)
    return twin.take()


def receive(impl_receiver, sock, want, rounds=100):
    """Receives until ``want`` messages are held or ``rounds`` polls of 100 ms have passed."""
    for _ in range(rounds):
        if impl_receiver.pending_messages >= want:
            break
        impl_receiver.recv(sock, timeout_ms=100)
    return impl_receiver.take()


def stream_config(**extra):
    config = dict(tenant="acme", service="web", container_id="c1", max_line_bytes=64, id_seed=5)
    config.update(extra)
    return config


BATCH = b"".join(b"line %d\n" % i for i in range(200)) + b"x" * 300 + b"\nunterminated"


def test_push_pull_batch_arrives_exactly(impl, sockets, ipc_endpoint):
    pull = sockets.make(zmq.PULL)
    pull.bind(ipc_endpoint)
    push = sockets.make(zmq.PUSH)
    push.connect(ipc_endpoint)
    stream = impl.Stream(**stream_config())
    stream.feed(BATCH, 1000)
    stream.close(2000)
    expected = expected_frames(impl, BATCH, **stream_config())
    assert len(expected) == 200 + 5 + 1
    assert stream.pending_messages == len(expected)
    assert push.poll(POLL_MS, zmq.POLLOUT)
    assert stream.send(push) == len(expected)
    assert (stream.pending_messages, stream.pending_bytes) == (0, 0)
    assert stream.sent_total == len(expected)

    receiver = impl.Receiver()
    assert receive(receiver, pull, len(expected)) == expected
    assert receiver.messages_total == len(expected)
    assert receiver.bytes_total == sum(len(f[2]) for f in expected)
    assert (receiver.malformed_total, receiver.pending_messages) == (0, 0)


def test_take_payloads_joins_third_frames_with_newlines(impl, sockets, ipc_endpoint):
    pull = sockets.make(zmq.PULL)
    pull.bind(ipc_endpoint)
    push = sockets.make(zmq.PUSH)
    push.connect(ipc_endpoint)
    config = stream_config(framing="msgpack", container_name="/web")
    stream = impl.Stream(**config)
    stream.feed(BATCH, 1000)
    stream.close(2000)
    expected = expected_frames(impl, BATCH, **config)
    assert push.poll(POLL_MS, zmq.POLLOUT)
    assert stream.send(push) == len(expected)

    receiver = impl.Receiver()
    for _ in range(100):
        if receiver.pending_messages >= len(expected):
            break
        receiver.recv(pull, max_messages=7, timeout_ms=100)    # many small batches
    assert receiver.pending_messages == len(expected)
    joined = receiver.take_payloads()
    assert joined == b"".join(f[2] + b"\n" for f in expected)
    assert receiver.take() == [] and receiver.take_payloads() == b""
    first = msgpack.unpackb(expected[0][2])
    assert first["line"] == b"line 0"


def test_recv_respects_max_messages(impl, sockets, ipc_endpoint):
    pull = sockets.make(zmq.PULL)
    pull.bind(ipc_endpoint)
    push = sockets.make(zmq.PUSH)
    push.connect(ipc_endpoint)
    for i in range(10):
        push.send_multipart([b"t", b"s", b"p%d" % i])
    receiver = impl.Receiver()
    assert pull.poll(POLL_MS, zmq.POLLIN)
    for _ in range(100):                      # the whole batch may arrive in pieces
        if receiver.pending_messages >= 3:
            break
        assert receiver.recv(pull, max_messages=3 - receiver.pending_messages) <= 3
    assert [f[2] for f in receiver.take()] == [b"p0", b"p1", b"p2"]
    assert [f[2] for f in receive(receiver, pull, 7)] == [b"p%d" % i for i in range(3, 10)]


def test_recv_without_messages_returns_zero(impl, sockets, ipc_endpoint):
    pull = sockets.make(zmq.PULL)
    pull.bind(ipc_endpoint)
    receiver = impl.Receiver()
    assert receiver.recv(pull, timeout_ms=0) == 0
    assert receiver.recv(pull, timeout_ms=20) == 0
    assert receiver.take() == []


def test_nonblocking_send_without_peer_keeps_messages_then_delivers(impl, sockets, ipc_endpoint):
    push = sockets.make(zmq.PUSH, IMMEDIATE=1)    # no pipe, hence EAGAIN, until a peer is there
    push.connect(ipc_endpoint)
    stream = impl.Stream(**stream_config())
    stream.feed(BATCH, 1000)
    stream.close(2000)
    count, size = stream.pending_messages, stream.pending_bytes
    assert stream.send(push, block=False) == 0
    assert stream.send(push, block=False) == 0
    assert (stream.pending_messages, stream.pending_bytes, stream.sent_total) == (count, size, 0)

    pull = sockets.make(zmq.PULL)
    pull.bind(ipc_endpoint)
    assert push.poll(POLL_MS, zmq.POLLOUT)        # connected: a blocking send cannot hang now
    assert stream.send(push, block=True) == count
    assert (stream.pending_messages, stream.pending_bytes, stream.sent_total) == (0, 0, count)
    receiver = impl.Receiver()
    assert receive(receiver, pull, count) == expected_frames(impl, BATCH, **stream_config())


def test_nonblocking_send_at_high_water_mark_sends_part_and_keeps_order(impl, sockets,
                                                                       ipc_endpoint):
    pull = sockets.make(zmq.PULL, RCVHWM=1, RCVBUF=4096)
    pull.bind(ipc_endpoint)
    push = sockets.make(zmq.PUSH, SNDHWM=1, SNDBUF=4096)
    push.connect(ipc_endpoint)
    data = b"".join(bytes([65 + i % 26]) * 20000 + b"\n" for i in range(60))
    stream = impl.Stream(max_line_bytes=32768)
    stream.feed(data, 1)
    expected = [f[2] for f in expected_frames(impl, data, max_line_bytes=32768)]
    assert push.poll(POLL_MS, zmq.POLLOUT)
    first = stream.send(push, block=False)
    assert 0 < first < 60
    assert stream.pending_messages == 60 - first
    assert stream.pending_bytes == 20000 * (60 - first)
    receiver = impl.Receiver()
    for _ in range(2000):
        if receiver.pending_messages == 60:
            break
        stream.send(push, block=False)
        receiver.recv(pull, timeout_ms=10)
    assert [f[2] for f in receiver.take()] == expected
    assert (stream.sent_total, stream.pending_messages) == (60, 0)


def test_feed_after_partial_send_keeps_everything_in_order(impl, sockets, ipc_endpoint):
    push = sockets.make(zmq.PUSH, IMMEDIATE=1, SNDHWM=3)
    push.connect(ipc_endpoint)
    pull = sockets.make(zmq.PULL, RCVHWM=1)
    pull.bind(ipc_endpoint)
    assert push.poll(POLL_MS, zmq.POLLOUT)
    stream = impl.Stream(container_id="c")
    stream.feed(b"".join(b"a%d\n" % i for i in range(50)), 1)
    stream.send(push, block=False)
    stream.feed(b"".join(b"b%d\n" % i for i in range(50)), 2)  # appended behind the unsent rest
    receiver = impl.Receiver()
    for _ in range(2000):
        if receiver.pending_messages == 100:
            break
        stream.send(push, block=False)
        receiver.recv(pull, timeout_ms=10)
    expected = [b"c: a%d" % i for i in range(50)] + [b"c: b%d" % i for i in range(50)]
    assert [f[2] for f in receiver.take()] == expected


def test_receiver_counts_malformed_messages_and_keeps_going(impl, sockets, ipc_endpoint):
    pull = sockets.make(zmq.PULL)
    pull.bind(ipc_endpoint)
    push = sockets.make(zmq.PUSH)
    push.connect(ipc_endpoint)
    push.send_multipart([b"t", b"s"])                             # 2 frames
    push.send_multipart([b"t", b"s", b"ok 1"])
    push.send_multipart([b"t", b"s", b"p", b"extra"])             # 4 frames
    push.send_multipart([b"one"])                                 # 1 frame
    push.send_multipart([b"t", b"s", b"x" * 9])                   # payload over the limit
    push.send_multipart([b"t" * 9, b"s", b"p"])                   # tenant over the limit
    push.send_multipart([b"t", b"s", b"p", b"y" * 100])           # 4 frames, last oversize
    push.send_multipart([b"t", b"s", b"12345678"])                # exactly the limit: fine
    receiver = impl.Receiver(max_frame_bytes=8)
    assert receiver.max_frame_bytes == 8
    for _ in range(100):
        if receiver.messages_total + receiver.malformed_total >= 8:
            break
        receiver.recv(pull, timeout_ms=100)
    assert receiver.take() == [[b"t", b"s", b"ok 1"], [b"t", b"s", b"12345678"]]
    assert (receiver.messages_total, receiver.malformed_total) == (2, 6)
    assert receiver.bytes_total == 12


def test_send_on_closed_socket_raises_transport_error(impl, sockets, ipc_endpoint):
    push = sockets.make(zmq.PUSH)
    push.bind(ipc_endpoint)
    push.close(linger=0)
    stream = impl.Stream()
    stream.feed(b"x\n", 1)
    with pytest.raises(TransportError):
        stream.send(push)
    assert stream.pending_messages == 1


def test_recv_on_closed_socket_raises_transport_error(impl, sockets, ipc_endpoint):
    pull = sockets.make(zmq.PULL)
    pull.bind(ipc_endpoint)
    pull.close(linger=0)
    with pytest.raises(TransportError):
        impl.Receiver().recv(pull, timeout_ms=0)


def test_transport_error_is_an_os_error():
    assert issubclass(TransportError, OSError)


def test_send_from_forked_child_raises_transport_error(impl, sockets, ipc_endpoint):
    push = sockets.make(zmq.PUSH)
    push.bind(ipc_endpoint)
    stream = impl.Stream()
    stream.feed(b"x\n", 1)
    pid = os.fork()
    if pid == 0:                                   # child: never return into pytest
        code = 3
        try:
            stream.send(push, block=False)
            code = 1
        except TransportError:
            code = 0
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    status = None
    for _ in range(1000):                          # bounded wait for the child (<= ~10 s)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not exit")
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0, {1: "send succeeded in the child",
                                         2: "raised something else"}.get(os.WEXITSTATUS(status))
    assert stream.pending_messages == 1            # the parent's batch is untouched


def test_blocking_send_without_peer_returns_after_cancel(impl, sockets, ipc_endpoint):
    push = sockets.make(zmq.PUSH)
    push.bind(ipc_endpoint)                        # no peer ever connects (unless rescued)
    stream = impl.Stream()
    stream.feed(b"a\nb\nc\n", 1)
    assert hasattr(stream, "cancel"), "Stream.cancel() is missing"

    done = threading.Event()
    rescued = threading.Event()

    def canceller():
        # Cancel repeatedly (a cancel() before send() starts is reset by it) for at most ~10 s;
        # if send() is still blocked then, connect a peer so it returns and the test fails
        # instead of hanging.
        for _ in range(200):
            if done.wait(0.05):
                return
            stream.cancel()
        rescued.set()
        pull = sockets.context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.connect(ipc_endpoint)
        done.wait(30)
        pull.close(linger=0)

    timer = threading.Timer(0.1, canceller)
    timer.start()
    try:
        sent = stream.send(push, block=True)
    finally:
        done.set()
        timer.join(60)
    assert not rescued.is_set(), "send() ignored cancel()"
    assert sent == 0
    assert stream.pending_messages == 3
    assert stream.sent_total == 0


def test_xpub_nodrop_to_sub_delivers(impl, sockets, ipc_endpoint):
    xpub = sockets.make(zmq.XPUB, XPUB_NODROP=1)
    xpub.bind(ipc_endpoint)
    sub = sockets.make(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ipc_endpoint)
    assert xpub.poll(POLL_MS, zmq.POLLIN), "no subscription arrived"
    assert xpub.recv() == b"\x01"                  # subscribe to everything
    config = stream_config(framing="msgpack", tenant="tenant-a")
    stream = impl.Stream(**config)
    stream.feed(BATCH, 1000)
    stream.close(2000)
    expected = expected_frames(impl, BATCH, **config)
    assert stream.send(xpub, block=True) == len(expected)
    receiver = impl.Receiver()
    assert receive(receiver, sub, len(expected)) == expected
