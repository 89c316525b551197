"""`atop bench` and its load generator: statistics, error counting against a real short-lived server, and a tiny
--quick run on a random-weight serving folder that must write the report files with the expected content.
Nothing here asserts speed."""
from __future__ import annotations

import io
import json
import os
import re
import sys
import time

import numpy as np
import pytest
from PIL import Image

from atop_serve import modelio
from atop_serve.errors import AtopError
from atop_serve.settings import Settings
from training import loadgen
from training.loadgen import Payload, latency_summary, percentile, run_load

from tests._server import export_folder, serve
from tests.conftest import make_model_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def serving_folder(tmp_path_factory):
    """Random weights, pipeline.onnx and classifier.onnx in place (as `atop export` writes them), plus an
    offline-optimised pipeline.opt.onnx declared shipped."""
    from export.optimize import build_ort_offline

    folder = export_folder(make_model_folder(tmp_path_factory.mktemp("bench") / "model"))
    build_ort_offline(folder / modelio.ONNX_FILE, folder / modelio.OPT_ONNX_FILE)
    card = modelio.read_card(folder)
    card.setdefault("export", {})["cpu_variant"] = {"shipped": "ort-offline"}
    modelio.write_card(folder, card)
    return folder


@pytest.fixture(scope="module")
def server(serving_folder, tmp_path_factory):
    with serve(serving_folder, {"ATOP_ORT_THREADS": "1", "OMP_NUM_THREADS": "1"}, tmp_path_factory.mktemp("bentoml")) as s:
        yield s


# ------------------------------------------------------------------------------------------ statistics
def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 100, 1001):
        values = rng.exponential(size=n).tolist()
        for q in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the input does not matter
    assert percentile([1.0, 2.0], 50) == 1.5 and percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary():
    s = latency_summary([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert s["n"] == 100 and s["min_ms"] == 1.0 and s["max_ms"] == 100.0
    assert s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    assert s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert latency_summary([])["n"] == 0 and latency_summary([])["p50_ms"] is None


# ------------------------------------------------------------------------------------------ load generator
def test_load_generator_only_talks_to_this_machine():
    for url in ("http://example.com", "http://10.0.0.1:3000", "ftp://127.0.0.1:21", "http://127.0.0.2:3000"):
        with pytest.raises(AtopError, match="only talks to this machine"):
            run_load(url, [Payload("a.png", _png(0), "image/png")], 1, 1, 1.0)
    assert loadgen.check_local("http://localhost:3000/") == "http://localhost:3000"


def test_load_generator_counts_errors(server):
    good = [Payload(f"{i}.png", _png(i), "image/png") for i in range(4)]
    bad = [Payload("bad.jpg", b"not an image at all"), Payload("empty.jpg", b"")]
    payloads = good + bad
    r = run_load(server.url, payloads, concurrency=3, max_requests=2 * len(payloads), max_seconds=120)
    assert r.sent == 12 and r.stopped_by == "requests"  # every payload sent exactly twice
    assert r.errors == 4 and r.ok == 8 and r.error_kinds == {"HTTP 415": 2, "HTTP 400": 2}
    assert r.latency_ok["n"] == 8 and r.latency_ok["p50_ms"] > 0 and r.latency_all["n"] == 12
    assert r.requests_per_s > 0 and r.accuracy is None  # unlabelled payloads
    assert 0 < r.client_cpu < 4  # the load generator's own CPU, in cores
    assert any("not an image" in e for e in r.first_errors)
    # still serving after the bad requests
    again = run_load(server.url, good, concurrency=2, max_requests=4, max_seconds=60)
    assert (again.sent, again.ok, again.errors) == (4, 4, 0)


def test_load_generator_survives_a_dead_port():
    url = f"http://127.0.0.1:{loadgen.free_port()}"  # nothing listens there
    r = run_load(url, [Payload("a.png", _png(0), "image/png")], concurrency=4, max_requests=10**6, max_seconds=0.5)
    assert r.stopped_by == "time" and r.sent > 0 and r.errors == r.sent and r.ok == 0
    assert set(r.error_kinds) == {"ConnectError"} and r.requests_per_s == 0
    assert r.latency_ok["n"] == 0 and r.latency_all["n"] == r.sent


def test_load_images_real_or_synthetic(tmp_path):
    with pytest.raises(AtopError, match="no image folders"):
        loadgen.load_images(tmp_path, n=3)
    for c in ("a", "b"):
        (tmp_path / "test" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "test" / c / f"{i}.png").write_bytes(_png(i))
    payloads, source = loadgen.load_images(tmp_path, n=4)
    assert len(payloads) == 4 and sorted(p.label for p in payloads) == [0, 0, 1, 1] and "class-balanced" in source


# ------------------------------------------------------------------------------------------ atop bench --quick
def test_quick_bench_writes_report(serving_folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import atop_cli

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "bench"
    args = ["bench", "--quick", "--model", str(serving_folder), "--out", str(out),
            "--backends", "torch-fp32,ort-fp32,ort-opt,ort-cuda-fp32", "--batch-sizes", "1,4", "--samples", "1,2",
            "--concurrency", "1,4", "--requests", "8", "--level-seconds", "5", "--threads", "1", "--budget", "900",
            "--setting", "ATOP_FAST_PATH=0"]
    result = CliRunner().invoke(atop_cli.app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert set(summary["files"]) == {"report.json", "report.md", "latency_vs_batch.png", "throughput_vs_concurrency.png"}
    for name in summary["files"]:
        assert (out / name).stat().st_size > 0
    for png in ("latency_vs_batch.png", "throughput_vs_concurrency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = json.loads((out / "report.json").read_text())
    assert r["schema"] == "atop-bench/1" and r["mode"] == "quick" and r["wall_seconds"] > 0
    m = r["machine"]
    assert m["cores"] >= 1 and m["cpu"] and {"avx512f", "amx_bf16", "avx512_bf16"} <= set(m["cpu_flags"])
    assert {"torch", "onnxruntime", "numpy", "bentoml"} <= set(m["versions"]) and len(m["load_average_end"]) == 3

    ref = r["reference"]
    fl = ref["flops"]
    assert 0 < fl["purifier"] < fl["pipeline"] and 0 < fl["classifier"] < fl["pipeline"]
    assert fl["pipeline_per_k"]["2"] == pytest.approx(2 * fl["pipeline"], rel=0.01) and fl["tta_passes"] == 2
    assert ref["peaks"]["cpu-fp32"]["gflops_per_s"] > 0 and ref["floor"]["cpu-fp32"]["images_per_s"] > 0
    assert ref["diffpure"]["gflops_per_image"] > 3000 and ref["diffpure"]["ratio_to_atop"] > 1
    assert ref["rt_draws"]["service_us_per_row"] > 0

    backends = r["model_level"]["backends"]
    assert set(backends) == {"torch-fp32", "ort-fp32", "ort-opt", "ort-cuda-fp32"}
    for name in ("torch-fp32", "ort-fp32", "ort-opt"):
        b = backends[name]
        assert b["status"] == "ok", b
        got = {(c["part"], c["k"], c["batch"]) for c in b["cells"]}
        assert got == {(p, k, n) for n in (1, 4) for p, k in (("classifier", 1), ("pipeline", 1), ("pipeline", 2))}
        for c in b["cells"]:
            assert c["reps"] >= 3 and 0 < c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"], c
            assert c["images_per_s"] > 0 and c["gflops_per_s"] > 0 and c["peak_fraction"] > 0
    if backends["ort-cuda-fp32"]["status"] == "skipped":
        assert backends["ort-cuda-fp32"]["reason"]
    assert backends["ort-opt"]["precision"].startswith("fp32")
    assert "classifier.onnx from the folder" in backends["ort-fp32"]["detail"]  # the graph `atop export` wrote
    ml = r["model_level"]
    assert ml["best_cpu"]["images_per_s"] > 0 and set(ml["overhead"]["ort-fp32"]["4"]) == {"k1", "k2"}
    assert all(v > 0 for v in ml["overhead"]["ort-fp32"]["4"].values())
    prof = r["profile"]
    assert prof["by_op_type"] and all(o["share"] > 0 for o in prof["by_op_type"])
    if prof["backend"].startswith("ort"):
        assert abs(sum(o["share"] for o in prof["by_component"]) - 1) < 0.01

    http = r["http"]
    [run] = http["runs"]
    assert run["max_batch_size"] == Settings().max_batch_size and run["server"]["backend"] == "onnxruntime"
    assert http["settings"] == {"ATOP_FAST_PATH": "0"} and run["server"]["fast_path"] is False  # --setting reached it
    assert [lv["concurrency"] for lv in run["levels"]] == [1, 4]
    for lv in run["levels"]:
        assert lv["sent"] > 0 and lv["errors"] == 0 and lv["requests_per_s"] > 0 and lv["latency_ok"]["p50_ms"] > 0
        assert lv["share_of_best_model_level"] > 0
        sv = lv["server"]  # the server's own account (/metrics): every request, one row each, in model calls
        assert sv["requests"] == lv["sent"] and sv["rows"] == lv["sent"] and 1 <= sv["model_calls"] <= lv["sent"]
        assert sv["request_mean_ms"] > 0 and sv["call_mean_ms"] > 0 and sv["model_busy_share"] > 0
        # CPU of the server's processes, client's; /proc counts in 10 ms ticks per process, over levels ~1 s long here
        assert 0 < sv["server_cpu"] <= 1.2 * m["cores"] and 0 < lv["client_cpu"]
    assert http["choice"]["max_batch_size"] == Settings().max_batch_size and http["choice"]["max_latency_ms"] >= 1000 and http["choice"]["why"]

    assert [b["passed"] is not None for b in r["bars"]] == [True, True, True]
    md = (out / "report.md").read_text()
    for heading in ("## Benchmark results", "### Machine", "### Bars", "### Reference", "### Model level",
                    "### HTTP level", "**Batching choice:**"):
        assert heading in md, heading
    assert "`ATOP_FAST_PATH=0`" in md and "Quick run" in md and "![latency_vs_batch](latency_vs_batch.png)" in md
    assert all((out / link).is_file() for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md))  # links resolve from report.md


def test_bench_drives_a_running_server(serving_folder, server):
    """--url: no server started; the batching in force is read from the server's /metadata."""
    from training.bench import BenchConfig, run_bench

    cfg = BenchConfig(model=str(serving_folder), quick=True, backends=("ort-fp32",), batch_sizes=(1,), samples=(1,),
                      concurrency=(2,), requests=6, level_seconds=5, url=server.url, threads=1, budget_s=600)
    r = run_bench(cfg, log=lambda m: None)
    [run] = r["http"]["runs"]
    assert run["max_batch_size"] == Settings().max_batch_size and run["server"]["backend"] == "onnxruntime" and "startup_s" not in run
    [level] = run["levels"]
    assert level["sent"] == 6 and level["errors"] == 0 and level["ok"] == 6
    assert r["http"]["choice"]["max_batch_size"] == Settings().max_batch_size


@pytest.mark.parametrize("args,message", [
    (["--model", "/nowhere/at/all"], "does not exist"),
    (["--backends", "torch-fp64"], "unknown backend"),
    (["--batch-sizes", "1,many"], "--batch-sizes must be comma-separated integers"),
    (["--batching", "0"], "--batching"),
    (["--url", "http://example.com:3000"], "only talks to this machine"),
    (["--setting", "ATOP_NOPE=1"], "no such setting"),
    (["--setting", "ATOP_FAST_PATH=maybe"], "not a valid bool"),
    (["--setting", "FAST_PATH"], "write ATOP_NAME=value"),
])
def test_bench_usage_errors_are_one_line(args, message, monkeypatch, capsys):
    import atop_cli

    monkeypatch.setattr("sys.argv", ["atop", "bench", "--quick", *args])
    with pytest.raises(SystemExit) as e:
        atop_cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_tree_cpu_seconds_counts_descendants():
    """The server CPU of the HTTP report: a process tree's CPU time includes its children's."""
    import subprocess

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(30)"
    before = loadgen.tree_cpu_seconds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        deadline = time.monotonic() + 30
        while (loadgen.tree_cpu_seconds(child.pid) or 0) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert loadgen.tree_cpu_seconds(child.pid) >= 0.5
        assert loadgen.tree_cpu_seconds(os.getpid()) - before >= 0.5  # the child counts in its parent's tree
    finally:
        child.kill()
        child.wait()
    assert loadgen.tree_cpu_seconds(child.pid) is None  # gone


def test_batching_choice_breaks_ties_towards_larger_batches():
    """Request rates within 5 % are noise: the largest such max_batch_size wins; errors rule a candidate out; the
    queueing deadline scales the K = 1 tail to the default K."""
    from training.bench import choose_batching

    def run(mbs, rps, p99, errors=0):
        return {"max_batch_size": mbs, "levels": [{"concurrency": 32, "requests_per_s": rps, "errors": errors,
                                                   "latency_ok": {"p99_ms": p99}}]}

    rates = {1: 100.0, 64: 800.0}
    s = Settings()
    got = choose_batching([run(16, 227, 400), run(64, 224, 450), run(128, 210, 300)], s, rates, k_default=4)
    assert got["max_batch_size"] == 64 and "within 5 %" in got["why"]
    assert got["max_latency_ms"] >= 2 * 450 * 4 and got["default_samples"] == 4
    got = choose_batching([run(16, 227, 400), run(64, 300, 450, errors=2)], s, rates)
    assert got["max_batch_size"] == 16 and got["errors"] == 0
    got = choose_batching([run(16, 300, 400), run(64, 224, 450)], s, rates, k_default=1)
    assert got["max_batch_size"] == 16 and "the most requests/s" in got["why"]


def test_ort_opt_is_skipped_where_the_service_would_not_run_it(serving_folder, tmp_path, monkeypatch):
    """A folder whose int8 variant has 8-bit weights (an older export) is not benchmarked as ort-opt on a CPU where
    those weights saturate: the service runs the fp32 graph there, and the skip says why."""
    import shutil

    from atop_serve import cpu, engine
    from training import bench

    folder = shutil.copytree(serving_folder, tmp_path / "legacy")
    card = modelio.read_card(folder)
    card["export"]["cpu_variant"] = {"shipped": "int8"}  # as an export before 7-bit weights recorded it
    modelio.write_card(folder, card)
    model = bench.load_model(folder)
    ctx = bench.Context(model, tmp_path, 1, 8, 1, np.zeros((4, 3, 32, 32), np.float32), lambda m: None)
    monkeypatch.setattr(engine, "int8_saturates", lambda: cpu.int8_saturates("x86_64", {"avx2", "avx512f"}))
    with pytest.raises(bench.Skip, match="does not run pipeline.opt.onnx on this CPU: .*no VNNI"):
        bench.setup_backend("ort-opt", ctx)
    monkeypatch.setattr(engine, "int8_saturates", lambda: False)
    assert bench.setup_backend("ort-opt", ctx).variant == card["export"]["cpu_variant"]["shipped"]


def test_emulated_bf16_is_skipped_unless_asked_for(serving_folder, tmp_path, monkeypatch):
    """On an x86 CPU without bf16 instructions torch-bf16 (tens of times slower than fp32 there) is skipped with
    the reason, so it cannot eat the full run's budget; asked for by name, it runs."""
    from atop_serve import cpu
    from training import bench

    assert cpu.bf16_native("x86_64", {"avx2", "fma"}) is False
    assert cpu.bf16_native("x86_64", {"avx512f", "avx512_bf16"}) and cpu.bf16_native("x86_64", {"amx_bf16"})
    assert cpu.bf16_native("aarch64", set()) is None  # unknown there: not skipped
    model = bench.load_model(serving_folder)
    pool = np.zeros((4, 3, 32, 32), np.float32)
    monkeypatch.setattr(bench, "bf16_native", lambda: False)
    with pytest.raises(bench.Skip, match="no bf16 instructions .*--backends torch-bf16"):
        bench.setup_backend("torch-bf16", bench.Context(model, tmp_path, 1, 8, 1, pool, lambda m: None))
    asked = bench.Context(model, tmp_path, 1, 8, 1, pool, lambda m: None, skip_emulated_bf16=False)
    assert bench.setup_backend("torch-bf16", asked).precision == "bf16 autocast"
    monkeypatch.setattr(bench, "bf16_native", lambda: None)
    assert bench.setup_backend("torch-bf16", bench.Context(model, tmp_path, 1, 8, 1, pool, lambda m: None))


def test_a_call_slower_than_the_budget_is_timed_once():
    """Peak measurements repeat a call at least three times, unless one call alone outlasts the budget."""
    from training.bench import _best_time

    calls = []
    _, reps = _best_time(lambda: calls.append(time.sleep(0.05)), seconds=0.01)
    assert reps == 1 and len(calls) == 2  # the warm-up and one timed call
    _, reps = _best_time(lambda: None, seconds=0.01)
    assert 3 <= reps <= 50


def test_overhead_advice_follows_the_measured_variant():
    """A missed overhead bar gets advice for what the measured graph does not do yet: no 'quantise the gating'
    for an int8-full variant, both int8 and the gating for an fp32 graph."""
    from training.bench import suggestions

    def report(precision, variant):
        rec = {"precision": precision, **({"variant": variant} if variant else {})}
        return {"bars": [{"bar": "purification overhead at batch 32", "value": 2.3, "detail": "x", "passed": False}],
                "reference": {"flops": {"purifier": 1.0, "classifier": 1.0, "pipeline": 2.0}, "peaks": {}},
                "model_level": {"best_cpu": {"backend": "b"}, "backends": {"b": rec}}}

    [int8_full] = suggestions(report("int8 (QDQ)", "int8-full-gate"))
    assert "int8-full-gate" in int8_full and "gating on uint8" not in int8_full and "int8 for" not in int8_full
    assert "full-resolution" in int8_full
    [fp32] = suggestions(report("fp32", None))
    assert "int8 for the purifier's convolutions" in fp32 and "gating on uint8" in fp32


def test_out_that_is_a_file_is_refused_before_the_run(tmp_path):
    """--out naming a file was a FileExistsError traceback after the whole benchmark had run."""
    from atop_serve.errors import AtopError
    from training.bench import BenchConfig

    (tmp_path / "f").write_text("keep")
    with pytest.raises(AtopError, match="is a file"):
        BenchConfig(out=tmp_path / "f", quick=True, http=False).validate()
