"""Slow and vanishing clients against a real uvicorn: they may hold an upload slot only for a bounded time.

Two clients that start an upload and then stall take both slots (max_uploads_in_flight=2): everyone else is
refused with 503 + Retry-After, but only until the stalled uploads are cut off with 408; then uploads are
accepted again, and the stalled ones left nothing on disk. A client that disconnects frees its slot at once.
Eight slow clients cannot starve the others: from one address they get two slots and 429 for the rest; from
eight addresses, trickling bytes, they are cut off at the minimum upload rate.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import models
from live_server import PLAN, LiveServer, read_answer, upload_head
from service_harness import TERMINAL, job_body, wait_until

pytestmark = pytest.mark.slow

UPLOAD_TIMEOUT_S = 3.0
# No timeout but the one a test is about may free a slot: each test names the one it relies on.
PATIENT = {"upload_timeout_s": 600.0, "upload_idle_s": 600.0, "upload_min_kib_s": 0.0}
SLOW_ADDRESSES = [f"127.0.0.{i}" for i in range(10, 18)]  # eight client machines


def _job_state(server: LiveServer, job_id: str) -> str | None:
    status, _, body = server.get(f"/api/jobs/{job_id}")
    assert status == 200, body
    state: str = json.loads(body)["state"]
    return state if state in TERMINAL else None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(tmp_path / "data", max_uploads_in_flight=2, upload_timeout_s=UPLOAD_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="module")
def model() -> bytes:
    return models.mlp().SerializeToString()


def _stall_both_slots(server: LiveServer) -> list[socket.socket]:
    """Two clients (on two addresses, each within its own share) that take both upload slots and stall."""
    stalled = [server.stall(source=address) for address in SLOW_ADDRESSES[:2]]
    wait_until(lambda: len(server.folders()) == 2, 10, "both stalled uploads to take a slot")
    return stalled


def test_stalled_uploads_hold_their_slots_only_until_the_upload_timeout(server: LiveServer, model: bytes) -> None:
    stalled = _stall_both_slots(server)
    try:
        # Both slots taken: a third client is refused at once, with a hint when to come back.
        status, headers, body = server.post(job_body(model, PLAN))
        assert status == 503, body
        assert b'"busy"' in body
        assert headers.get("retry-after", "").isdigit(), headers
        # Status requests do not need a slot.
        assert server.get("/healthz")[0] == 200

        # The stalled uploads are cut off with 408 at the upload timeout, and their folders are removed.
        answers = [read_answer(sock) for sock in stalled]
        assert [a[0] for a in answers] == [408, 408], answers
        assert all(json.loads(a[2])["error"]["code"] == "upload_timeout" for a in answers)
        assert all(b"took longer than 3 s" in a[2] for a in answers), answers
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: server.folders() == [], 10, "the stalled uploads' folders to be removed")

    # The slots are free again: a normal upload is accepted and its job runs to the end.
    status, _, body = server.post(job_body(model, PLAN))
    assert status == 202, body
    job_id = json.loads(body)["id"]
    assert wait_until(lambda: _job_state(server, job_id), 60, "the job to finish", poll=0.1) == "succeeded"
    assert server.folders() == [job_id]


def test_client_that_disconnects_mid_upload_frees_its_slot_at_once(tmp_path: Path, model: bytes) -> None:
    # No upload timeout that could end within this test: only the disconnect can give the slot back.
    with LiveServer(tmp_path / "data", max_uploads_in_flight=2, **PATIENT) as server:
        holder, leaver = server.stall(source=SLOW_ADDRESSES[0]), server.stall(200_000, source=SLOW_ADDRESSES[1])
        try:
            wait_until(lambda: len(server.folders()) == 2, 10, "both uploads to take a slot")
            assert server.post(job_body(model, PLAN))[0] == 503
            leaver.close()
            wait_until(lambda: len(server.folders()) == 1, 10, "the abandoned upload's folder to be removed")

            status, _, body = server.post(job_body(model, PLAN))
            assert status == 202, body
        finally:
            holder.close()
            leaver.close()
        wait_until(lambda: len(server.folders()) == 1, 10, "the other abandoned upload's folder to be removed")


def test_clients_stuck_in_their_request_headers_take_no_upload_slot(server: LiveServer, model: bytes) -> None:
    stuck: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = server.connect()
            sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            stuck.append(sock)
        status, _, body = server.post(job_body(model, PLAN))
        assert status == 202, body
    finally:
        for sock in stuck:
            sock.close()


def test_a_refused_client_still_sending_a_large_body_reads_the_503_not_a_reset(server: LiveServer) -> None:
    """Without `Expect: 100-continue` a client sends its whole body before it reads; the 503 must reach it."""
    big = job_body(b"\0" * (24 << 20), PLAN)  # far more than the socket buffers hold
    stalled = _stall_both_slots(server)
    try:
        for _ in range(3):
            status, headers, body = server.post(big)
            assert status == 503, body
            assert json.loads(body)["error"]["code"] == "busy"
            assert headers.get("retry-after", "").isdigit(), headers
        assert len(server.folders()) == 2  # the refused bodies were thrown away, not stored
    finally:
        for sock in stalled:
            sock.close()


def test_a_refused_client_that_asked_100_continue_is_answered_without_sending_its_body(server: LiveServer) -> None:
    stalled = _stall_both_slots(server)
    try:
        with server.connect() as sock:
            sock.sendall(upload_head(64 << 20, "Expect: 100-continue\r\n"))  # no body: answer without asking for it
            status, _, body = read_answer(sock)
        assert status == 503, body
    finally:
        for sock in stalled:
            sock.close()


def _answered(socks: list[socket.socket]) -> list[socket.socket]:
    """The connections the server has answered (or closed): readable without blocking."""
    return select.select(socks, [], [], 0)[0] if socks else []


def test_eight_slow_clients_on_one_address_take_two_slots_and_others_are_served(tmp_path: Path, model: bytes) -> None:
    # Eight upload slots and no timeout that could end within this test: only the per-client share protects.
    with LiveServer(tmp_path / "data", max_uploads_in_flight=8, max_uploads_per_client=2, **PATIENT) as server:
        slow = [server.stall(source=SLOW_ADDRESSES[0]) for _ in range(8)]
        try:
            wait_until(lambda: len(_answered(slow)) == 6, 60, "six of the slow uploads to be refused")
            holders = [sock for sock in slow if sock not in _answered(slow)]
            refused = [read_answer(sock) for sock in _answered(slow)]
            assert {status for status, _, _ in refused} == {429}, refused
            assert all(json.loads(body)["error"]["code"] == "too_many_uploads" for _, _, body in refused)
            assert all(headers.get("retry-after", "").isdigit() for _, headers, _ in refused), refused
            assert len(server.folders()) == 2  # the other two still hold their slots, stalled

            # Another client's upload is served while they do, and its job runs to the end.
            status, _, body = server.post(job_body(model, PLAN), source="127.0.0.1")
            assert status == 202, body
            job_id = json.loads(body)["id"]
            assert wait_until(lambda: _job_state(server, job_id), 120, "the job to finish", poll=0.2) == "succeeded"
            assert _answered(holders) == []  # the two slow uploads still hold their slots
        finally:
            for sock in slow:
                sock.close()


class Tricklers(threading.Thread):
    """Clients on eight addresses that each start an upload, then send one byte every `every_s` until answered."""

    def __init__(self, server: LiveServer, every_s: float = 0.5) -> None:
        super().__init__(name="tricklers", daemon=True)
        self.socks = {address: server.stall(source=address) for address in SLOW_ADDRESSES}
        self.every_s = every_s
        self.answers: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        waiting = dict(self.socks)
        while waiting and not self.stop.wait(self.every_s):
            for address, sock in list(waiting.items()):
                if _answered([sock]):
                    self.answers[address] = read_answer(sock)
                    del waiting[address]
                else:
                    sock.sendall(b"\0")

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        for sock in self.socks.values():
            sock.close()


def test_eight_trickling_clients_are_cut_off_at_the_minimum_rate_and_others_are_served(
    tmp_path: Path, model: bytes
) -> None:
    # Every slot goes to a trickling client on its own address; only the minimum rate (1 KiB/s after 5 s)
    # can free them: no upload timeout or idle timeout ends within this test.
    patient_but_for_rate = PATIENT | {"upload_min_kib_s": 1.0, "upload_grace_s": 5.0}
    with LiveServer(tmp_path / "data", max_uploads_in_flight=8, **patient_but_for_rate) as server:
        tricklers = Tricklers(server)
        tricklers.start()
        try:
            wait_until(lambda: len(server.folders()) == 8, 30, "the eight trickling uploads to take every slot")

            # A normal client, retrying while the slots are taken, gets its upload in.
            def submitted() -> str | None:
                status, _, body = server.post(job_body(model, PLAN), source="127.0.0.1")
                assert status in (202, 503), body
                return str(json.loads(body)["id"]) if status == 202 else None

            job_id = wait_until(submitted, 120, "an upload to be accepted", poll=0.5)
            assert wait_until(lambda: _job_state(server, job_id), 120, "the job to finish", poll=0.2) == "succeeded"

            # Each trickling upload was cut off for its rate while its client was still sending.
            wait_until(lambda: len(tricklers.answers) == 8, 60, "every trickling client to be answered")
            assert {status for status, _, _ in tricklers.answers.values()} == {408}, tricklers.answers
            for _, _, body in tricklers.answers.values():
                error = json.loads(body)["error"]
                assert error["code"] == "upload_timeout" and "slower than 1 KiB/s" in error["message"], error
        finally:
            tricklers.close()
        wait_until(lambda: server.folders() == [job_id], 10, "the cut-off uploads' folders to be removed")
