import argparse
import asyncio
import json
import threading

import grpc
import numpy as np
import pytest

from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc
from smartspec import bench, report
from smartspec.prompts import BUILTIN_PROMPTS, load_prompts

# --- arrivals and prompt order ------------------------------------------------


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrival_gaps_have_mean_one_over_rate(burstiness):
    times = bench.arrival_times(20_000, rate=5.0, burstiness=burstiness, seed=3)
    assert times[0] == 0.0
    gaps = np.diff(times)
    assert (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)


def test_burstier_arrivals_have_more_varied_gaps():
    poisson = np.diff(bench.arrival_times(20_000, rate=5.0, burstiness=1.0, seed=0))
    bursty = np.diff(bench.arrival_times(20_000, rate=5.0, burstiness=0.25, seed=0))
    assert bursty.std() > 1.5 * poisson.std()


def test_arrivals_are_deterministic_per_seed():
    assert bench.arrival_times(50, 2.0, seed=7) == bench.arrival_times(50, 2.0, seed=7)
    assert bench.arrival_times(50, 2.0, seed=7) != bench.arrival_times(50, 2.0, seed=8)


def test_infinite_rate_sends_everything_at_once():
    assert bench.arrival_times(4, float("inf")) == [0.0] * 4


@pytest.mark.parametrize("args", [(0, 1.0, 1.0), (3, 0.0, 1.0), (3, 1.0, 0.0), (3, float("nan"), 1.0)])
def test_arrival_times_rejects_bad_input(args):
    with pytest.raises(ValueError):
        bench.arrival_times(*args)


def test_prompt_order_uses_each_prompt_equally_and_is_seeded():
    prompts = ["a", "b", "c"]
    order = bench.prompt_order(prompts, 9, seed=1)
    assert sorted(order) == sorted(prompts * 3)
    assert order == bench.prompt_order(prompts, 9, seed=1)
    assert bench.prompt_order(prompts, 2, seed=1) == order[:2]


# --- summary and table --------------------------------------------------------


def test_latency_stats_on_known_data():
    stats = report.latency_stats(list(range(1, 101)))
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert report.latency_stats([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def _record(i, e2e, ttft, tokens, error=None, proposed=0, accepted=0):
    return report.RequestRecord(
        index=i,
        prompt_chars=1,
        e2e_ms=e2e,
        ttft_ms=ttft,
        completion_tokens=tokens,
        itl_ms=[10.0] * max(tokens - 1, 0),
        error=error,
        proposed_tokens=proposed,
        accepted_tokens=accepted,
    )


def test_summarize_skips_failed_requests_and_counts_errors():
    records = [
        _record(0, 100.0, 20.0, 5, proposed=8, accepted=6),
        _record(1, 300.0, 40.0, 3, proposed=2, accepted=0),
        _record(2, 5.0, None, 0, error="INVALID_ARGUMENT"),
        _record(3, 5.0, None, 0, error="INVALID_ARGUMENT"),
    ]
    summary = report.summarize(records, duration_s=2.0)
    assert summary["completed"] == 2
    assert summary["errors"] == 2
    assert summary["error_codes"] == {"INVALID_ARGUMENT": 2}
    assert summary["e2e_ms"]["mean"] == pytest.approx(200.0)
    assert summary["ttft_ms"]["p50"] == pytest.approx(30.0)
    assert summary["itl_ms"]["mean"] == pytest.approx(10.0)
    assert summary["output_tokens"] == 8
    assert summary["output_throughput"] == pytest.approx(4.0)
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["acceptance"] == pytest.approx(0.6)
    table = report.format_table(summary)
    assert "e2e_ms" in table and "INVALID_ARGUMENT x2" in table and "0.600" in table


def test_acceptance_is_none_without_proposals():
    summary = report.summarize([_record(0, 10.0, 5.0, 2)], duration_s=1.0)
    assert summary["acceptance"] is None
    assert "acceptance" in report.format_table(summary)


# --- speculation flag ---------------------------------------------------------


@pytest.mark.parametrize(
    "text, mode, k",
    [
        ("auto", pb.SPECULATION_MODE_AUTO, 0),
        ("off", pb.SPECULATION_MODE_OFF, 0),
        ("fixed:4", pb.SPECULATION_MODE_FIXED, 4),
    ],
)
def test_parse_speculation(text, mode, k):
    spec = bench.parse_speculation(text)
    assert (spec.mode, spec.k) == (mode, k)


@pytest.mark.parametrize("text", ["", "fixed", "fixed:", "fixed:0", "fixed:-1", "fixed:x", "on", "AUTO"])
def test_parse_speculation_rejects(text):
    with pytest.raises(ValueError, match="fixed:K"):
        bench.parse_speculation(text)


def test_cli_flags_parse_and_validate():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--rate", "inf", "--speculation", "fixed:3", "--chat"])
    assert args.rate == float("inf") and args.speculation == "fixed:3" and args.chat
    assert args.target == "127.0.0.1:50051" and args.output == "results/bench.json"
    for bad in (["--speculation", "fixed:0"], ["--rate", "0"], ["--num-requests", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# --- prompts ------------------------------------------------------------------


def test_builtin_prompts():
    assert load_prompts(None) == BUILTIN_PROMPTS
    assert len(BUILTIN_PROMPTS) >= 20 and all(p.strip() for p in BUILTIN_PROMPTS)
    assert "def fibonacci(n):" in BUILTIN_PROMPTS


def _write(tmp_path, data):
    path = tmp_path / "prompts.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_load_sharegpt(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn"}]},
        {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "q2"}]},
    ]
    assert load_prompts(_write(tmp_path, data)) == ["hi", "q2"]


def test_load_plain_strings_and_prompt_objects(tmp_path):
    assert load_prompts(_write(tmp_path, ["one", "two"])) == ["one", "two"]
    assert load_prompts(_write(tmp_path, [{"prompt": "p1"}, {"prompt": "p2"}])) == ["p1", "p2"]


@pytest.mark.parametrize(
    "data, message",
    [
        ("{not json", "not valid JSON"),
        ({"prompt": "x"}, "expected a JSON list"),
        ([1, 2], "item 0"),
        ([{"text": "x"}], "neither"),
        ([{"prompt": 3}], "must be a string"),
        ([{"conversations": "hi"}], "must be a list"),
        ([{"conversations": [{"from": "human"}]}], 'string "value"'),
        ([], "no non-empty prompts"),
        (["", "  "], "no non-empty prompts"),
    ],
)
def test_load_prompts_rejects_malformed_files(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        load_prompts(_write(tmp_path, data))


# --- against a real in-process server -----------------------------------------

CHUNKS = [[], [1], [2, 3], [4]]  # the first chunk only carries the request id


class FakeGeneration(pb_grpc.GenerationServicer):
    def __init__(self):
        self.requests = []

    async def Generate(self, request, context):
        self.requests.append(request)
        if request.prompt_text == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad prompt")
        request_id = f"req-{len(self.requests)}"
        for tokens in CHUNKS:
            await asyncio.sleep(0.01)
            yield pb.GenerateResponse(request_id=request_id, token_ids=tokens, text="x" * len(tokens))
        yield pb.GenerateResponse(
            request_id=request_id,
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=3, completion_tokens=4),
            speculation=pb.SpeculationStats(
                proposed_tokens=4,
                accepted_tokens=3,
                rounds=[pb.SpeculationRound(k=3, proposed=3, accepted=3), pb.SpeculationRound(k=3, proposed=1)],
            ),
            timings=pb.Timings(queue_ms=1.0, time_to_first_token_ms=2.0, e2e_ms=3.0),
        )


@pytest.fixture
def server():
    """A grpc.aio server on its own loop in a thread, so tests may call asyncio.run."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = FakeGeneration()

    async def start():
        srv = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(servicer, srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        return srv, port

    srv, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    yield f"127.0.0.1:{port}", servicer
    asyncio.run_coroutine_threadsafe(srv.stop(None), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def test_run_benchmark_records_requests_and_errors(server):
    target, servicer = server
    result = asyncio.run(
        bench.run_benchmark(
            target,
            ["good a", "bad", "good b"],
            rate=200.0,
            num_requests=6,
            max_new_tokens=16,
            temperature=0.5,
            chat=True,
            speculation="fixed:3",
            seed=1,
            progress=False,
        )
    )
    records, summary = result["requests"], result["summary"]
    assert len(records) == 6 and len(servicer.requests) == 6
    failed = [r for r in records if r["error"]]
    assert [r["error"] for r in failed] == ["INVALID_ARGUMENT"] * 2
    assert summary["errors"] == 2 and summary["completed"] == 4
    assert summary["error_codes"] == {"INVALID_ARGUMENT": 2}
    for r in records:
        if r["error"]:
            continue
        assert r["completion_tokens"] == 4 and r["finish_reason"] == "FINISH_REASON_LENGTH"
        assert r["request_id"].startswith("req-")
        assert r["ttft_ms"] >= 20.0  # the tokenless first chunk does not count
        assert len(r["itl_ms"]) == 3 and r["itl_ms"][0] == r["itl_ms"][1]  # a 2-token chunk is split
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / 3)
        assert r["e2e_ms"] > r["ttft_ms"]
        assert r["server_timings"] == {"queue_ms": 1.0, "ttft_ms": 2.0, "e2e_ms": 3.0}
        assert r["prompt_tokens"] == 3 and r["rounds"] == [(3, 3, 3), (3, 1, 0)]
    assert summary["acceptance"] == pytest.approx(0.75)
    assert summary["output_tokens"] == 16
    sent = servicer.requests[0]
    assert sent.chat and sent.max_new_tokens == 16 and sent.trace_speculation
    assert sent.sampling.temperature == pytest.approx(0.5)
    assert (sent.speculation.mode, sent.speculation.k) == (pb.SPECULATION_MODE_FIXED, 3)


def test_run_writes_json_and_png(server, tmp_path, capsys):
    target, _ = server
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "good"}, {"prompt": "bad"}]))
    output = tmp_path / "out" / "bench.json"
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--target",
            target,
            "--rate",
            "inf",
            "--num-requests",
            "4",
            "--prompts",
            str(prompts),
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert bench.run(args) == 1  # the "bad" prompts failed
    result = json.loads(output.read_text())
    assert result["config"]["rate"] == "inf"
    assert result["summary"]["errors"] == 2 and len(result["requests"]) == 4
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ttft_ms" in capsys.readouterr().out

    ok_only = parser.parse_args(
        [
            "--target",
            target,
            "--num-requests",
            "2",
            "--rate",
            "100",
            "--output",
            str(tmp_path / "ok.json"),
            "--no-progress",
        ]
    )
    assert bench.run(ok_only) == 0
