"""Several students on one teacher (real gRPC server on 127.0.0.1, auth by a tokens file): shares and order.

No timings are asserted: what is checked is who the scheduler served, read from the teacher's own
per-client counters, and which status codes each student got.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from protos.arrays import pack
from teacher_server.client import TeacherClient
from tests.fixtures.teacher import random_sequences, start_teacher
from tests.fixtures.tls import write_atomically

pytestmark = pytest.mark.timeout(240)

STUDENTS = ("student-a", "student-b", "student-c", "student-d")
TOKENS = {name: f"token-of-{name}" for name in STUDENTS}


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text("".join(f"{name}: {token}\n" for name, token in TOKENS.items()))
    return path


def snapshot(server) -> dict[str, dict[str, float]]:
    """The per-client counters, read on the server's event loop (the only writer), so all are of one instant."""

    async def read() -> str:
        return generate_latest(server.server.metrics.registry).decode()

    out: dict[str, dict[str, float]] = {"dispatched": {}, "completed": {}, "scored": {}, "depth": {}, "express": {}}
    for family in text_string_to_metric_families(server.call(read())):
        for s in family.samples:
            client = s.labels.get("client")
            if s.name == "opd_teacher_queue_wait_seconds_count":
                out["dispatched"][client] = s.value  # observed when the scheduler puts a request in a batch
            elif s.name == "opd_teacher_requests_total" and s.labels["code"] == "OK":
                out["completed"][client] = out["completed"].get(client, 0.0) + s.value
            elif s.name == "opd_teacher_scored_tokens_total":
                out["scored"][client] = s.value
            elif s.name == "opd_teacher_queue_depth_requests":
                out["depth"]["all"] = s.value
            elif s.name == "opd_teacher_express_requests_total":
                out["express"][client] = s.value
            elif s.name == "opd_teacher_client_weight":
                out.setdefault("weight", {})[client] = s.value
    return out


async def poll(server, condition):
    """The first snapshot meeting `condition` (polled every 20 ms, for at most 2 minutes)."""
    for _ in range(6000):
        snap = await asyncio.to_thread(snapshot, server)
        if condition(snap):
            return snap
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not reached; last metrics {snap}")


async def fair_queue_start(server, students, seen):
    """A snapshot after which the fair queue alone decides: since the last express-lane dispatch (a client
    with nothing queued may be served there, e.g. its first request), every student was dispatched at least
    once from the fair queue, so each one's virtual time is within one quantum of the least."""
    while True:
        before = {c: seen["dispatched"].get(c, 0) for c in students}
        snap = await poll(server, lambda s, b=before: all(s["dispatched"].get(c, 0) > b[c] for c in students))
        if snap["express"] == seen["express"]:
            return snap
        seen = snap


async def token_window(server, students, lengths, arrived, window_tokens):
    """The (start, end) snapshots of a window: from `fair_queue_start` until `window_tokens` more tokens have been
    dispatched (each student's requests are of the one length given for it in `lengths`)."""

    def dispatched_tokens(snap) -> int:
        return sum(snap["dispatched"].get(c, 0) * n for c, n in zip(students, lengths, strict=True))

    start = await fair_queue_start(server, students, arrived)
    first = dispatched_tokens(start)
    end = await poll(server, lambda s: dispatched_tokens(s) >= first + window_tokens)
    return start, end


def share_tolerance(
    lengths: list[int],
    dispatched: float,
    scored: float,
    inflight_change: list[float],
    weights: list[float] | None = None,
) -> list[float]:
    """Bound on |share_i - s_i| of the scored tokens of students backlogged through a window (s_i = w_i / sum w).

    The scheduler gives the next batch slot to the backlogged student with the least virtual time (tokens
    dispatched / weight) and adds the request's length / weight to it, so at any instant every backlogged
    student's virtual time v_i lies in [m, m + L_i / w_i] (m: the least one; L_i: its request length, the
    scheduler's quantum). Over a window the dispatched tokens D_i = w_i (change of v_i) then differ from
    s_i sum(D) by e_i <= L_i + s_i sum(L). The scored tokens are S_i = f_i D_i - g_i: positions are tokens - 1
    per request (f_i = 1 - 1/L_i), and g_i counts the positions of requests dispatched but not yet answered,
    observed at both ends of the window (`inflight_change`, in requests). Then |S_i - s_i sum(S)| <=
    s_i sum(D) |f_i - sum_j s_j f_j| + f_i e_i + s_i sum_j f_j e_j + |g_i - s_i sum(g)|, divided by sum(S)
    (`scored`, observed).
    """
    n = len(lengths)
    weights = weights or [1.0] * n
    s = [w / sum(weights) for w in weights]
    f = [1 - 1 / length for length in lengths]
    g = [du * (length - 1) for du, length in zip(inflight_change, lengths, strict=True)]
    f_mean = sum(si * fi for si, fi in zip(s, f, strict=True))
    e = [length + si * sum(lengths) for length, si in zip(lengths, s, strict=True)]
    fe = sum(fi * ei for fi, ei in zip(f, e, strict=True))
    return [
        (dispatched * s[i] * abs(f[i] - f_mean) + f[i] * e[i] + s[i] * fe + abs(g[i] - s[i] * sum(g))) / scored
        for i in range(n)
    ]


def test_four_saturating_students_each_get_a_quarter_of_the_scored_tokens(tiny_model_dir, tokens_file):
    # Students send sequences of 32, 64, 96 and 128 tokens: fair share is by tokens, so the first gets four
    # times as many requests answered as the last. One request per batch keeps the in-flight slack small.
    lengths = [32, 64, 96, 128]
    backlog_tokens, window_tokens = 12000, 20000  # backlogs outlast the window: nobody runs dry in it
    server = start_teacher(
        tiny_model_dir,
        "hf",
        auth={"tokens_file": str(tokens_file)},
        scheduler={"max_batch_requests": 1, "batch_wait_ms": 0},
    )
    backlogs = [backlog_tokens // n for n in lengths]

    async def main():
        clients = [TeacherClient(server.address, token=TOKENS[name], timeout_s=120) for name in STUDENTS]
        tasks = []
        for i, (client, n) in enumerate(zip(clients, lengths, strict=True)):  # student-a's backlog first
            for ids in random_sequences(backlogs[i], 384, min_len=n, max_len=n, seed=i):
                tasks.append(asyncio.create_task(client.score(ids, 1, top_k=4)))
        try:
            # Window start: every request has reached the scheduler (queued + dispatched = all sent), and the
            # fair queue alone has served everyone since.
            arrived = await poll(server, lambda s: s["depth"]["all"] + sum(s["dispatched"].values()) >= sum(backlogs))
            start, end = await token_window(server, STUDENTS, lengths, arrived, window_tokens)
            assert end["express"] == start["express"], (start, end)  # backlogged students never go express
            return start, end
        finally:
            for client in clients:
                await client.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        start, end = asyncio.run(main())
    finally:
        server.stop()
    dispatched = [end["dispatched"][c] - start["dispatched"].get(c, 0) for c in STUDENTS]
    for c, backlog in zip(STUDENTS, backlogs, strict=True):  # all had arrived at the start: backlogged throughout
        assert end["dispatched"][c] < backlog, (c, end)
    tokens = [d * n for d, n in zip(dispatched, lengths, strict=True)]
    scored = [end["scored"][c] - start["scored"].get(c, 0) for c in STUDENTS]
    inflight = [
        (end["dispatched"][c] - end["completed"][c]) - (start["dispatched"].get(c, 0) - start["completed"].get(c, 0))
        for c in STUDENTS
    ]
    # What the scheduler decided: dispatched tokens within one quantum of each other, and so within the bound.
    for i, (t, n) in enumerate(zip(tokens, lengths, strict=True)):
        assert abs(t - sum(tokens) / 4) <= n + sum(lengths) / 4, (STUDENTS[i], tokens)
    # What each student got, on the /metrics counter: 25% of the scored tokens within the derived bound.
    tolerance = share_tolerance(lengths, sum(tokens), sum(scored), inflight)
    assert max(tolerance) <= 0.05, tolerance  # the window is long enough for a +/- 5% share target
    shares = [s / sum(scored) for s in scored]
    for name, share, tol in zip(STUDENTS, shares, tolerance, strict=True):
        assert abs(share - 0.25) <= tol, (name, shares, tolerance)
    # Fair by tokens, not by requests: the 32-token student got ~4x the requests of the 128-token one.
    assert dispatched[0] > 3 * dispatched[3], dispatched


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_on_vllm_students_keeping_requests_in_flight_get_a_quarter_each_of_the_scored_tokens(
    tiny_model_dir, tokens_file
):
    # Closed loop, as trainers send: each student keeps 80 requests in flight (320 in all), with 32-, 64-, 96-
    # and 128-token sequences. opd keeps at most 1.5 engine steps of bulk tokens in vLLM (3,072 with vLLM's
    # 2,048-token steps on the CPU build), shared about equally by tokens (~24 requests of student-a), so every
    # student has requests waiting in opd's fair queue (while its client keeps up) and opd decides the order. With whole
    # batches in vLLM instead (`bulk_engine_steps=0`: up to 4 x 64 requests), most of the 320 are inside vLLM,
    # which serves them first come first served: the students get about equal numbers of requests, so shares
    # of the tokens that grow with the sequence length (the first round's benchmark: 13 / 20 / 29 / 38%).
    lengths, outstanding, window_tokens = [32, 64, 96, 128], 80, 40000
    server = start_teacher(
        tiny_model_dir, "vllm", auth={"tokens_file": str(tokens_file)}, scheduler={"batch_wait_ms": 0}
    )
    assert server.server is not None
    engine = server.server.engine
    assert engine is not None and engine.step_tokens, "the vllm engine reports its step size"
    budget = 1.5 * engine.step_tokens

    async def main():
        clients = [TeacherClient(server.address, token=TOKENS[name], timeout_s=120) for name in STUDENTS]
        stop = asyncio.Event()

        async def keep_sending(client, n, seed):
            sequences = random_sequences(64, 384, min_len=n, max_len=n, seed=seed)
            i = 0
            while not stop.is_set():
                await client.score(sequences[i % len(sequences)], 1, top_k=4)
                i += 1

        workers = [
            asyncio.create_task(keep_sending(client, n, 100 * i + k))
            for i, (client, n) in enumerate(zip(clients, lengths, strict=True))
            for k in range(outstanding)
        ]
        try:
            arrived = await poll(server, lambda s: all(s["dispatched"].get(c, 0) >= outstanding for c in STUDENTS))
            start, end = await token_window(server, STUDENTS, lengths, arrived, window_tokens)
            return start, end
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
            for client in clients:
                await client.close()

    try:
        start, end = asyncio.run(main())
    finally:
        server.stop()
    dispatched = [end["dispatched"][c] - start["dispatched"].get(c, 0) for c in STUDENTS]
    tokens = [d * n for d, n in zip(dispatched, lengths, strict=True)]
    scored = [end["scored"][c] - start["scored"].get(c, 0) for c in STUDENTS]
    inflight_at = [
        {c: snap["dispatched"].get(c, 0) - snap["completed"].get(c, 0) for c in STUDENTS} for snap in (start, end)
    ]
    for snap in inflight_at:  # what opd handed to vLLM and vLLM has not answered: at most the bound + one request
        assert sum(inflight_at_c * n for inflight_at_c, n in zip(snap.values(), lengths, strict=True)) <= budget + 128
    # The issue's target, 25% +- 5 points each. Not the scheduler's tighter bound (`share_tolerance`): that one
    # holds for students backlogged through the whole window, and a closed-loop client here shares the host's
    # cores with the server and vLLM, so on a loaded host the 32-token student (the most requests to resend per
    # token) can briefly have nothing queued at opd and fall ~1 point short (seen: 24.0 / 25.4 / 25.4 / 25.2%).
    # Whole batches inside vLLM give 9 / 20 / 31 / 41% here, far outside.
    assert sum(tokens) >= window_tokens
    shares = [s / sum(scored) for s in scored]
    for name, share in zip(STUDENTS, shares, strict=True):
        assert abs(share - 0.25) <= 0.05, (name, shares)


def _team_file(path, weights: dict[str, float], caps: dict[str, dict] | None = None) -> None:
    """The tokens file in the team form: `name: {token, weight, caps...}`, replaced atomically (as a Secret is)."""
    entries = {n: {"token": TOKENS[n], "weight": w, **(caps or {}).get(n, {})} for n, w in weights.items()}
    write_atomically(path, yaml.safe_dump(entries).encode())


def test_weights_two_one_one_give_half_and_quarters_and_an_edit_applies_without_restart(tiny_model_dir, tmp_path):
    # Three students with 64-token sequences, weights 2:1:1 from the tokens file, all backlogged from the start
    # (every request sent at once); over a window the scored tokens split 50/25/25. Then the file is edited to
    # 1:1:2 while the teacher runs: after the next request (each one checks the file) the split is 25/25/50.
    students, length, backlog, window_tokens = STUDENTS[:3], 64, 375, 20000
    path = tmp_path / "tokens.yaml"
    _team_file(path, dict(zip(students, (2.0, 1.0, 1.0), strict=True)))
    server = start_teacher(
        tiny_model_dir, "hf", auth={"tokens_file": str(path)}, scheduler={"max_batch_requests": 1, "batch_wait_ms": 0}
    )

    def dispatched_tokens(snap):
        return sum(snap["dispatched"].get(c, 0) for c in students) * length

    async def window(clients, expect_weights):
        # Start: the weights on /metrics are the expected ones, and every student has been dispatched since
        # (then each one's virtual time is within one quantum of the least, at the new weights).
        seen = await poll(server, lambda s: all(s.get("weight", {}).get(c) == w for c, w in expect_weights.items()))
        start = await fair_queue_start(server, students, seen)
        end = await poll(server, lambda s: dispatched_tokens(s) >= dispatched_tokens(start) + window_tokens)
        for c in students:  # still backlogged at the end: nobody ran dry inside the window
            assert end["dispatched"][c] < backlog, (c, end)
        assert end["express"] == start["express"], (start, end)  # backlogged students never go express
        return start, end

    async def main():
        clients = {name: TeacherClient(server.address, token=TOKENS[name], timeout_s=120) for name in students}
        tasks = [
            asyncio.create_task(clients[name].score(ids, 1, top_k=4))
            for i, name in enumerate(students)
            for ids in random_sequences(backlog, 384, min_len=length, max_len=length, seed=i)
        ]
        try:
            await poll(server, lambda s: s["depth"]["all"] + sum(s["dispatched"].values()) >= len(tasks))
            first = await window(clients, {"student-a": 2.0, "student-b": 1.0, "student-c": 1.0})
            _team_file(path, dict(zip(students, (1.0, 1.0, 2.0), strict=True)))
            # one more request: it reads the edited file (its result is not part of the windows' arithmetic)
            tasks.append(asyncio.create_task(clients["student-b"].score(np.arange(1, 9, dtype=np.int32), 1)))
            second = await window(clients, {"student-a": 1.0, "student-b": 1.0, "student-c": 2.0})
            return first, second
        finally:
            for client in clients.values():
                await client.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        first, second = asyncio.run(main())
    finally:
        server.stop()
    for (start, end), weights in ((first, [2.0, 1.0, 1.0]), (second, [1.0, 1.0, 2.0])):
        scored = [end["scored"][c] - start["scored"].get(c, 0) for c in students]
        dispatched = [(end["dispatched"][c] - start["dispatched"][c]) * length for c in students]
        inflight = [
            (end["dispatched"][c] - end["completed"][c]) - (start["dispatched"][c] - start["completed"].get(c, 0))
            for c in students
        ]
        tolerance = share_tolerance([length] * 3, sum(dispatched), sum(scored), inflight, weights)
        assert max(tolerance) <= 0.05, tolerance  # the window is long enough for the issue's +/- 5%
        shares = [x / sum(scored) for x in scored]
        for name, share, w, tol in zip(students, shares, weights, tolerance, strict=True):
            assert abs(share - w / sum(weights)) <= tol, (name, shares, weights, tolerance)


def test_a_team_over_its_cap_is_refused_with_a_hint_and_the_other_teams_are_not(tiny_model_dir, tmp_path):
    # student-d may queue 4 requests (its line in the tokens file) and keeps 24 in flight; the global queue
    # (4096) is never full. Its extra requests get RESOURCE_EXHAUSTED naming the cap, with a retry hint;
    # student-a/b/c (no cap) send 5 requests each meanwhile and get only OK, on /metrics as well.
    path = tmp_path / "tokens.yaml"
    _team_file(path, dict.fromkeys(STUDENTS, 1.0), caps={"student-d": {"max_queued_requests": 4}})
    server = start_teacher(
        tiny_model_dir, "hf", auth={"tokens_file": str(path)}, scheduler={"max_batch_requests": 1, "batch_wait_ms": 0}
    )
    request = pb.ScoreRequest(token_ids=pack(np.arange(1, 129) % 384, pb.INT32), score_from=1, top_k=8)
    capped: Counter[str] = Counter()
    hints: list[tuple[float, str]] = []
    others: dict[str, list[str]] = {name: [] for name in STUDENTS[:3]}

    async def main():
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.TeacherStub(channel)

            senders = [asyncio.create_task(_resend(stub, request, "student-d", stop, capped, hints)) for _ in range(24)]
            for _ in range(3000):  # wait until the cap is being hit
                if capped["RESOURCE_EXHAUSTED"]:
                    break
                await asyncio.sleep(0.01)
            await asyncio.gather(*(_send_five(stub, request, name, others[name]) for name in others))
            stop.set()
            await asyncio.gather(*senders)

    try:
        asyncio.run(main())
        text = asyncio.run(_metrics_text(server))
    finally:
        server.stop()
    assert capped["RESOURCE_EXHAUSTED"] > 0 and capped["OK"] > 0, capped
    assert all(h > 0 and "max_queued_requests 4" in d and re.search(r"retry in [\d.]+ s", d) for h, d in hints)
    assert others == {name: ["OK"] * 5 for name in others}, others
    answered = _answered(text)
    assert {key: n for key, n in answered.items() if key[0] in others} == {(name, "OK"): 5 for name in others}
    assert answered[("student-d", "RESOURCE_EXHAUSTED")] == capped["RESOURCE_EXHAUSTED"]


def test_a_flooder_is_refused_with_a_retry_hint_while_well_behaved_students_get_no_errors(tiny_model_dir, tokens_file):
    # A small queue (16) and one request per batch; the flooder keeps 48 requests in flight and re-sends at
    # once whatever the answer (it ignores the retry hints). Well-behaved students send one request at a time.
    server = start_teacher(
        tiny_model_dir,
        "hf",
        auth={"tokens_file": str(tokens_file)},
        scheduler={"max_queued_requests": 16, "max_batch_requests": 1, "batch_wait_ms": 0},
    )
    request = pb.ScoreRequest(token_ids=pack(np.arange(1, 257) % 384, pb.INT32), score_from=1, top_k=16)
    flood_codes: Counter[str] = Counter()
    hints: list[tuple[float, str]] = []
    polite: dict[str, list[str]] = {name: [] for name in STUDENTS[:3]}

    async def main():
        stop = asyncio.Event()
        async with (
            grpc.aio.insecure_channel(server.address) as flood_ch,
            grpc.aio.insecure_channel(server.address) as polite_ch,
        ):
            flood_stub, polite_stub = pb_grpc.TeacherStub(flood_ch), pb_grpc.TeacherStub(polite_ch)

            flood = (_resend(flood_stub, request, "student-d", stop, flood_codes, hints) for _ in range(48))
            flooders = [asyncio.create_task(sender) for sender in flood]
            for _ in range(3000):  # the queue is full: the flood is being refused
                if flood_codes["RESOURCE_EXHAUSTED"]:
                    break
                await asyncio.sleep(0.01)
            await asyncio.gather(*(_send_five(polite_stub, request, name, polite[name]) for name in polite))
            stop.set()
            await asyncio.gather(*flooders)

    try:
        asyncio.run(main())
        text = asyncio.run(_metrics_text(server))
    finally:
        server.stop()
    assert flood_codes["RESOURCE_EXHAUSTED"] > 0, flood_codes
    assert all(h > 0 and re.search(r"retry in [\d.]+ s", d) for h, d in hints), hints[:5]
    assert polite == {name: ["OK"] * 5 for name in polite}, polite
    answered = _answered(text)  # the teacher's own count on /metrics agrees: nothing but OK for the well-behaved
    assert {key: n for key, n in answered.items() if key[0] in polite} == {(name, "OK"): 5 for name in polite}
    assert answered[("student-d", "RESOURCE_EXHAUSTED")] == flood_codes["RESOURCE_EXHAUSTED"]
    # The order in which the scheduler serves students is checked without timings by the share test above
    # (dispatched tokens within one quantum); counting flood dispatches around a request here would depend on
    # how fast the request travels, so it is not asserted.


def test_a_light_students_express_batch_preempts_the_flooders_running_batch_and_both_are_scored_exactly(
    tiny_model_dir, tokens_file
):
    # Full bulk batches (up to 32 requests of 256 tokens: a second or more on this CPU) from a flooder that
    # re-sends at once whatever the answer, so it always offers more than the engine delivers; student-a
    # sends one request at a time until the teacher's /metrics show that a running bulk batch parked for one
    # of its express batches (bounded tries). Then: student-a got only OK, served in the express lane, and
    # the parked-and-resumed bulk batches scored the flooder's sequence exactly as a plain forward does.
    from protos.arrays import unpack
    from tests.fixtures.teacher import reference_logprobs

    server = start_teacher(
        tiny_model_dir,
        "hf",
        auth={"tokens_file": str(tokens_file)},
        scheduler={"max_queued_requests": 64, "max_batch_requests": 32},
    )
    flood_ids = (np.arange(1, 257) * 7) % 384
    light_ids = (np.arange(1, 129) * 5) % 384
    flood_request = pb.ScoreRequest(token_ids=pack(flood_ids, pb.INT32), score_from=1, top_k=4)
    light_request = pb.ScoreRequest(token_ids=pack(light_ids, pb.INT32), score_from=1, top_k=4)
    flood_replies: list[pb.ScoreReply] = []
    light_replies: list[pb.ScoreReply] = []
    light_codes: Counter[str] = Counter()

    async def main():
        stop = asyncio.Event()
        async with (
            grpc.aio.insecure_channel(server.address) as flood_ch,
            grpc.aio.insecure_channel(server.address) as light_ch,
        ):
            flood_stub, light_stub = pb_grpc.TeacherStub(flood_ch), pb_grpc.TeacherStub(light_ch)

            async def flood():
                while not stop.is_set():
                    try:
                        reply = await flood_stub.Score(flood_request, timeout=120, metadata=_meta("student-d"))
                        flood_replies.append(reply)
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.005)

            flooders = [asyncio.create_task(flood()) for _ in range(96)]
            await poll(server, lambda s: s["completed"].get("student-d", 0) >= 32)  # full batches are running
            for _ in range(200):
                try:
                    reply = await light_stub.Score(light_request, timeout=120, metadata=_meta("student-a"))
                    light_replies.append(reply)
                    light_codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    light_codes[err.code().name] += 1
                text = await _metrics_text(server)
                if _sample(text, "opd_teacher_bulk_yields_total") > 0:
                    break
            stop.set()
            await asyncio.gather(*flooders)
            return text

    try:
        text = asyncio.run(main())
    finally:
        server.stop()
    assert _sample(text, "opd_teacher_bulk_yields_total") > 0, "no bulk batch parked for an express batch"
    assert _sample(text, "opd_teacher_bulk_yield_seconds_total") > 0
    assert set(light_codes) == {"OK"}, light_codes
    assert _sample(text, "opd_teacher_express_requests_total", client="student-a") > 0
    # float32 forwards of the same weights, batched and padded or not: summation-order rounding only
    for ids, replies in ((flood_ids, flood_replies), (light_ids, light_replies)):
        want = reference_logprobs(tiny_model_dir, ids)[np.arange(len(ids) - 1), ids[1:]]
        for reply in replies:
            np.testing.assert_allclose(unpack(reply.token_logprobs), want, atol=1e-4)


def _meta(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


async def _resend(stub, request, name: str, stop: asyncio.Event, codes: Counter[str], hints: list) -> None:
    """Send `request` as `name` again at once, whatever the answer, until `stop`; count each status and keep
    each refusal's (retry hint, details)."""
    while not stop.is_set():
        try:
            await stub.Score(request, timeout=60, metadata=_meta(name))
            codes["OK"] += 1
        except grpc.aio.AioRpcError as err:
            codes[err.code().name] += 1
            hint = [float(v) for k, v in err.trailing_metadata() or () if k == "retry-after-s"]
            hints.append((hint[0] if hint else 0.0, err.details() or ""))
            await asyncio.sleep(0)


async def _send_five(stub, request, name: str, codes: list[str]) -> None:
    """A well-behaved student: five requests, one at a time; each status appended to `codes`."""
    for _ in range(5):
        try:
            await stub.Score(request, timeout=60, metadata=_meta(name))
            codes.append("OK")
        except grpc.aio.AioRpcError as err:
            codes.append(err.code().name)


def _sample(text: str, name: str, **labels: str) -> float:
    """The sum of metric `name`'s samples with these labels in a /metrics text."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _answered(text: str) -> dict[tuple[str, str], float]:
    """`opd_teacher_requests_total` by (client, status code), the non-zero ones, from a /metrics text."""
    return {
        (s.labels["client"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "opd_teacher_requests_total" and s.value
    }


async def _metrics_text(server) -> str:
    import httpx

    async with httpx.AsyncClient() as http:
        return (await http.get(f"{server.ops_url}/metrics")).text


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_tenants_quick_prints_both_schedulers_and_consistent_figures(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OPD_CACHE_DIR": str(tmp_path)}  # the tiny model is built here, not in the user's cache
    proc = subprocess.run(
        [sys.executable, "-m", "opd", "bench", "tenants", "--quick"],
        capture_output=True,
        text=True,
        timeout=380,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # one run: the summary's capacity ratio is that run's median of its adjacent windows' ratios (--quick: two
    # pairs, so their mean; each printed to 0.01), and each C is that run's C
    m = re.search(
        r"new scheduler ([\d.]+) req/s, today's behaviour .* ([\d.]+) req/s; new/old of adjacent windows ([\d.]+)", out
    )
    assert m, out
    c_new, c_old, ratio = (float(x) for x in m.groups())
    pairs = re.search(r"^  capacity at \d+ in flight, pairs new/old ([\d.]+) ([\d.]+) \(median ([\d.]+),", out, re.M)
    assert pairs, out
    first, second, median = (float(x) for x in pairs.groups())
    assert median == pytest.approx((first + second) / 2, abs=0.0051) and ratio == median
    runs_c = dict(re.findall(r"^  (new|old): C ([\d.]+) req/s", out, re.M))
    assert (float(runs_c["new"]), float(runs_c["old"])) == (c_new, c_old)
    # the counts beside it: batches of at least one 64-token request and at most the batch bound, CPU per request
    counts = re.findall(
        r"(new|old): (\d+) batches of (\d+) tokens \(mean\), (\d+) express, (\d+) parks, "
        r"teacher CPU ([\d.]+) ms/request",
        out,
    )
    assert {c[0] for c in counts} == {"new", "old"}, out
    for _, batches, tokens, _, _, cpu_ms in counts:
        assert int(batches) > 0 and 64 <= int(tokens) <= 16384 and float(cpu_ms) > 0
    solo = {
        sched: float(v) for sched, v in re.findall(r"^  (new|old): C [\d.]+ req/s .* solo p50 ([\d.]+) ms", out, re.M)
    }
    assert set(solo) == {"new", "old"}, out
    row = r"^(student-[a-d])" + r"\s+([\d.na]+)" * 9 + r"\s+(?:ok|MISS)$"
    flood = {m.group(1): [float(x) for x in m.groups()[1:]] for m in re.finditer(row, out, re.M)}
    assert set(flood) == set(STUDENTS), out
    for name, (_, p50_new, per_solo_new, _, _, _, p50_old, per_solo_old, _) in flood.items():
        for p50, per_solo, sched in ((p50_new, per_solo_new, "new"), (p50_old, per_solo_old, "old")):
            # p50 and solo printed to 0.1 ms, the ratio to 0.01
            bound = 0.005 + 1.01 * (p50 / solo[sched]) * (0.05 / p50 + 0.05 / solo[sched])
            assert per_solo == pytest.approx(p50 / solo[sched], abs=bound), (name, sched, out)
    share_row = r"^(student-[a-d])\s+\d+\s+([\d.]+)\s+([\d.]+)%\s+(\d+)%\s+(?:ok|MISS)$"
    tables = [m.groups() for m in re.finditer(share_row, out, re.M)]
    assert len(tables) == 8, out  # (b) and (c)
    for table, weights in ((tables[:4], [1, 1, 1, 1]), (tables[4:], [2, 1, 1, 1])):
        assert [float(w) for _, w, _, _ in table] == weights
        assert [int(t) for _, _, _, t in table] == [round(100 * w / sum(weights)) for w in weights]
        assert sum(float(share) for _, _, share, _ in table) == pytest.approx(100, abs=4 * 0.05 + 1e-9)
