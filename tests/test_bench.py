"""`av-td3 bench` in a tiny configuration: every row and ratio is there, finite and positive, and every file lands
in the out dir; the headline rows read the shipped defaults, FLOP are counted, the phase breakdown covers the
step. (The numbers themselves are benchmarks, not timed tests.)"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from av_td3 import bench, machine
from av_td3.agent.td3 import TD3
from av_td3.bench import regression, updates
from av_td3.bench import run as bench_run
from av_td3.bench.progress import about, estimate_s
from av_td3.cli import main as cli
from av_td3.config import Config, to_config
from av_td3.envs.base import state_dim
from av_td3.timing import NoPhases, PhaseTimer, UpdatePhases
from tests.test_td3 import make_agent, make_batch

ROOT = Path(__file__).resolve().parent.parent


def trained_config(*overrides: str) -> Config:
    """The configuration `python launch.py [overrides]` trains with (conf/ composed as in tests/test_config.py)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))

# The headline rows at the shipped defaults, shrunk so the tests stay quick (and proving the rows follow the config)
TINY_DEFAULT = ("agent.batch_size=8", "agent.features_dim=16", "agent.hidden_dim=32", "env.image.stack=2",
                "env.npcs=2")
DEFAULT_ROWS = ["update/default", "update/default_monitor_off", "matmul/sgemm_2048", "e2e/default",
                "e2e/default_sb3", "checkpoint/default_stall", "checkpoint/default_write", "checkpoint/default_size"]
PHASES = {"act", "env_step", "store", "sample", "critic", "actor", "target", "monitor", "log"}
ROWS = DEFAULT_ROWS + ["update/ours_separate", "update/ours_separate_monitor_off", "update/ours_shared", "update/sb3",
        "replay/ours", "replay/reference", "replay/sb3", "replay/sb3_optimize_memory_usage",
        "env/steps_per_s", "env/steps_per_s_with_resets", "env/steps_per_s_stock_road", "e2e/steps_per_s",
        "e2e/steps_per_s_num_envs_2"]
RATIOS = ["separate_vs_sb3", "shared_vs_sb3", "monitor_overhead_pct", "replay_vs_reference", "env_steps_per_s",
          "sb3_vs_ours", "sb3_optimize_memory_usage_vs_ours", "separate_vs_sb3_cpu", "shared_vs_sb3_cpu",
          "monitor_overhead_pct_cpu", "env_vectorised_road_speedup", "e2e_num_envs_2_vs_1",
          "default_update_matmul_fraction", "default_monitor_overhead_pct", "default_e2e_steps_per_s",
          "default_e2e_vs_sb3", "sb3_update_matmul_fraction"]
# bfloat16 autocast runs on this machine (else its row is skipped, see test_bf16_row_is_skipped_where_unsupported)
BF16 = updates.bf16_unsupported(torch.device("cpu")) is None
if BF16:
    ROWS.append("update/default_bf16")
    RATIOS += ["default_bf16_speedup", "default_bf16_speedup_cpu", "default_bf16_update_matmul_fraction"]


def tiny(**kw) -> bench.BenchConfig:
    """64x64 is the smallest size at which our encoder and SB3's NatureCNN are the same Nature-CNN stack."""
    cfg = bench.BenchConfig(height=64, width=64, stack=2, batch_size=8, features_dim=16, hidden_dim=32,
                            update_reps=2, updates_per_rep=2, warmup_updates=1, fill=40, replay_capacity=50,
                            npcs=2, env_reps=2, env_steps_per_rep=5, e2e_total_steps=24, e2e_learning_starts=8,
                            e2e_log_every=8, e2e_max_episode_steps=20, checkpoint_buffer_size=300,
                            checkpoint_env_steps=20, checkpoint_reps=2, overrides=TINY_DEFAULT)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[bench.BenchResult, Path, Path]:
    pytest.importorskip("stable_baselines3")
    root = tmp_path_factory.mktemp("bench")
    out = root / "outputs" / "bench" / "tiny"
    mp = pytest.MonkeyPatch()
    mp.chdir(root)  # anything written relative to the working dir would show up in root
    threads = torch.get_num_threads()
    try:
        result = bench.run_bench(tiny(threads=1), out, say=lambda s: None)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return result, out, root


def test_json_has_every_row_and_ratio_finite_and_positive(tiny_run) -> None:
    _, out, _ = tiny_run
    data = json.loads((out / "bench.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(ROWS) <= rows.keys(), set(ROWS) - rows.keys()
    for name, r in rows.items():
        assert r["values"] and all(math.isfinite(v) and v > 0 for v in r["values"]), (name, r["values"])
        assert r["min"] <= r["median"] <= r["max"]
        if name.startswith("update/"):
            assert r["cpu_values"] and all(math.isfinite(v) and v > 0 for v in r["cpu_values"]), name
    assert rows["update/ours_separate"]["reps"] == 2
    for key in RATIOS:
        assert key in data["ratios"] and math.isfinite(data["ratios"][key]), key
        if "monitor_overhead_pct" not in key:  # a difference of two noisy timings: may come out below 0
            assert data["ratios"][key] > 0, key
    assert {t["name"] for t in data["targets"]} == set(bench.TARGETS)
    # every target of the sections run is judged; the busy section's (never run unasked) is not measured
    assert all(t["met"] in (True, False) for t in data["targets"] if t["name"] != "busy_default_vs_threads1")
    assert next(t for t in data["targets"] if t["name"] == "busy_default_vs_threads1")["met"] is None
    assert not data["skipped"] if BF16 else set(data["skipped"]) == {"update/default_bf16"}
    m = data["machine"]
    for key in ("cpu_model", "logical_cores", "torch", "torch_threads", "device"):
        assert m[key] not in (None, ""), key
    assert m["torch_threads"] == 1


def test_update_rows_carry_counted_flop_and_the_matmul_fraction(tiny_run) -> None:
    result, out, _ = tiny_run
    matmul = result.row("matmul/sgemm_2048")
    assert matmul.unit == "GFLOP/s" and len(matmul.values) == 2 and min(matmul.values) > 0
    updates = [r for r in result.rows if r.name.startswith("update/") and not r.name.endswith("_compile")]
    assert {r.name for r in updates} >= {"update/default", "update/ours_separate", "update/sb3"}
    for r in updates:
        assert r.flop_per_update is not None and math.isfinite(r.flop_per_update) and r.flop_per_update > 0, r.name
        assert 0 < r.matmul_fraction < 1.5, (r.name, r.matmul_fraction)
        # paired by repetition: the update's GFLOP/s over the matmul's in the same rep
        paired = statistics.median(v * r.flop_per_update / 1e9 / m for v, m in zip(r.values, matmul.values))
        assert r.matmul_fraction == pytest.approx(paired)
    # separate encoders do more convolutions per update than one shared encoder at the same sizes
    assert result.row("update/ours_separate").flop_per_update > result.row("update/ours_shared").flop_per_update
    # monitoring adds no matmuls or convolutions, bfloat16 autocast changes their dtype, not their count
    assert result.row("update/default_monitor_off").flop_per_update == result.row("update/default").flop_per_update
    if BF16:
        assert result.row("update/default_bf16").flop_per_update == result.row("update/default").flop_per_update
    md = (out / "bench.md").read_text()
    assert "| GFLOP/update | % of matmul rate |" in md
    data = json.loads((out / "bench.json").read_text())
    row = next(r for r in data["rows"] if r["name"] == "update/default")
    assert row["flop_per_update"] == result.row("update/default").flop_per_update and 0 < row["matmul_fraction"]


def test_default_rows_follow_the_config_and_its_overrides(tiny_run) -> None:
    result, _, _ = tiny_run
    sizes = result.config["e2e_default"]
    shipped = trained_config()
    # overridden: the tiny sizes; not overridden: what training uses (64x64 frames today)
    assert (sizes["batch_size"], sizes["features_dim"], sizes["hidden_dim"], sizes["stack"], sizes["npcs"]) == \
        (8, 16, 32, 2, 2)
    assert (sizes["height"], sizes["width"], sizes["encoder"], sizes["hidden_layers"]) == \
        (shipped.env.image.height, shipped.env.image.width, shipped.agent.encoder, shipped.agent.hidden_layers)
    note = (f"2x{shipped.env.image.height}x{shipped.env.image.width} frames, batch 8, "
            f"agent.encoder={shipped.agent.encoder}")
    for name in ["update/default", "update/default_monitor_off", "e2e/default"] + ["update/default_bf16"] * BF16:
        assert note in result.row(name).note, result.row(name).note
    if BF16:
        assert "agent.precision=bf16" in result.row("update/default_bf16").note
    assert "monitor on" in result.row("update/default").note
    assert "monitor.enabled=false" in result.row("update/default_monitor_off").note


def test_checkpoint_rows_time_the_trainers_checkpoint_of_a_full_buffer(tiny_run) -> None:
    result, out, _ = tiny_run
    stall, write = result.row("checkpoint/default_stall"), result.row("checkpoint/default_write")
    size = result.row("checkpoint/default_size")
    assert (stall.unit, write.unit, size.unit) == ("s", "s", "MB") and len(stall.values) == 2
    # both clocks start at the same call: the file is complete only after save_checkpoint returned
    assert all(0 < s <= w for s, w in zip(stall.values, write.values))
    assert "agent.buffer_size=300 full (" in stall.note and "2x64x64 frames" in stall.note
    (path,) = (out / "checkpoint_default" / "checkpoints").glob("step_*.pt")
    assert size.values[-1] == pytest.approx(path.stat().st_size / 1e6)
    assert "buffer" in torch.load(path, weights_only=True)


def test_default_config_is_the_one_training_uses() -> None:
    assert bench.default_config() == trained_config()
    assert bench.default_sizes(bench.default_config()) == bench.default_sizes(trained_config())
    changed = ("agent.encoder=separate", "env.image.height=48", "monitor.enabled=false")
    d = bench.default_sizes(bench.default_config(changed))
    assert (d["encoder"], d["height"], d["monitor"]) == ("separate", 48, False)
    assert bench.default_config(changed) == trained_config(*changed)


def test_flop_count_at_the_default_is_counted_and_linear_in_the_batch() -> None:
    """At the shipped sizes: one critic+actor cycle counted by torch, per update; every matmul and convolution
    of an update scales with the batch, so half the batch counts half the FLOP."""
    cpu = torch.device("cpu")
    conf = bench.default_config()
    flop = {}
    for batch in (conf.agent.batch_size, conf.agent.batch_size // 2):
        cfg = bench.BenchConfig(fill=conf.agent.batch_size + 10, overrides=(f"agent.batch_size={batch}",))
        flop[batch] = bench.count_flop(bench.default_updater(cfg, cpu), conf.agent.policy_freq)
    full, half = flop[conf.agent.batch_size], flop[conf.agent.batch_size // 2]
    assert math.isfinite(full) and full > 1e8
    assert half / full == pytest.approx(0.5, rel=0.02)


def test_phase_breakdown_covers_the_training_step(tiny_run) -> None:
    result, _, _ = tiny_run
    b = result.breakdown
    conf = result.config["e2e_default"]
    assert b["steps"] == conf["total_steps"] - conf["learning_starts"]  # one env and one update per step
    assert PHASES <= b["phases"].keys(), PHASES - b["phases"].keys()
    assert all(p["ms_per_step"] > 0 for p in b["phases"].values())
    assert sum(p["share"] for p in b["phases"].values()) == pytest.approx(1.0)
    assert sum(p["ms_per_step"] for p in b["phases"].values()) == pytest.approx(b["ms_per_step"])
    assert set(b["not_per_step_s"]) == set(bench.NOT_PER_STEP)
    # the phases add up to the step time the trainer itself measured over the same steps: perf/steps_per_s of
    # equally long log intervals, so the mean time per step is 1 / their harmonic mean
    trainer_ms = 1e3 / statistics.harmonic_mean(result.row("e2e/default").values)
    assert b["ms_per_step"] == pytest.approx(trainer_ms, rel=0.2)


def test_phase_timer_laps_and_start_step() -> None:
    timer = PhaseTimer(torch.device("cpu"), start_step=2)
    for step in range(4):
        timer.begin_step(step)
        sum(range(20_000))
        timer.lap("a")
        timer.lap("b")
    assert timer.steps == 2 and list(timer.seconds) == ["a", "b"]
    assert timer.seconds["a"] > timer.seconds["b"] >= 0


class Laps(NoPhases):
    def __init__(self) -> None:
        self.laps: list[str] = []

    def lap(self, name: str) -> None:
        self.laps.append(name)


def test_the_update_is_timed_from_outside_in_its_phases() -> None:
    """TD3.update holds no timing call; UpdatePhases charges it, in order, to the phases the bench reports:
    per network update forward+backward -> the net, guard+clip -> monitor, optimizer step -> the net,
    observations -> monitor; after an actor update, the target networks' step -> target."""
    assert "lap(" not in inspect.getsource(TD3.update)
    agent, timer = make_agent(policy_freq=2), Laps()
    UpdatePhases(agent, timer)
    for i in (1, 2):
        agent.update(make_batch(i), step=i)
    phases = [name for k, name in enumerate(timer.laps) if k == 0 or timer.laps[k - 1] != name]
    critic = ["critic", "monitor", "critic", "monitor"]
    assert phases == critic + critic + ["actor", "monitor", "actor", "monitor", "target"]


def test_replay_bytes_are_the_allocated_arrays(tiny_run) -> None:
    result, _, _ = tiny_run
    frame = 64 * 64
    state = 4 * state_dim(bench.BenchConfig().lane_points)  # float32 speed, offset, heading, lead, lane points
    assert result.row("replay/reference").median == frame + state + 4 * 2 + 4
    assert frame <= result.row("replay/ours").median <= 1.1 * result.row("replay/reference").median
    # SB3 stores the stacked observation (2 frames) twice, or once with optimize_memory_usage
    assert result.row("replay/sb3").median >= 2 * 2 * frame
    assert 2 * frame <= result.row("replay/sb3_optimize_memory_usage").median < 2 * 2 * frame


def test_markdown_lists_every_row_and_ratio(tiny_run) -> None:
    _, out, _ = tiny_run
    md = (out / "bench.md").read_text()
    for name in ROWS + RATIOS:
        assert f"| {name} |" in md, name
    assert "AMD" in md or "Intel" in md or "Machine:" in md
    assert f"freed memory {machine.freed_memory}" in md  # a setting that moves every update row


def test_every_file_lands_in_the_out_dir(tiny_run) -> None:
    _, out, root = tiny_run
    written = files_under(root)
    assert written and all(out in p.parents for p in written), sorted(map(str, written - files_under(out)))
    assert (out / "bench.json").exists() and (out / "bench.md").exists()
    assert (out / "e2e_run" / "scalars.csv").exists()


def test_without_sb3_its_rows_are_skipped_with_the_install_hint(tmp_path: Path, monkeypatch) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "stable_baselines3"] + ["stable_baselines3"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError, as when not installed
    messages: list[str] = []
    cfg = tiny(sections=("update", "replay"), update_rows=("ours_shared", "sb3"), update_reps=1)
    result = bench.run_bench(cfg, tmp_path / "out", say=messages.append)
    assert result.row("update/sb3") is None and result.row("update/ours_shared") is not None
    assert set(result.skipped) == {"update/sb3", "replay/sb3", "replay/sb3_optimize_memory_usage"}
    assert any("pip install '.[bench]'" in m for m in messages)
    assert "shared_vs_sb3" not in result.ratios
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| update/sb3 | skipped |" in md and "pip install '.[bench]'" in md
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert next(t for t in data["targets"] if t["name"] == "shared_vs_sb3")["met"] is None


def test_bf16_row_is_skipped_where_unsupported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(updates, "bf16_unsupported", lambda device: "no bfloat16 here")
    messages: list[str] = []
    cfg = tiny(sections=("update",), update_rows=("default", "default_bf16"), update_reps=1)
    result = bench.run_bench(cfg, tmp_path / "out", say=messages.append)
    assert result.row("update/default_bf16") is None and result.row("update/default") is not None
    assert result.skipped == {"update/default_bf16": "no bfloat16 here"}
    assert any("no bfloat16 here" in m for m in messages)
    assert not any(k.startswith("default_bf16") for k in result.ratios)
    assert "| update/default_bf16 | skipped |" in (tmp_path / "out" / "bench.md").read_text()


def test_bf16_row_is_the_default_agent_with_agent_precision_bf16(monkeypatch) -> None:
    """The row measures the training option itself: the default configuration with agent.precision=bf16."""
    if not BF16:
        pytest.skip(f"bfloat16 autocast unsupported: {updates.bf16_unsupported(torch.device('cpu'))}")
    built: list = []
    monkeypatch.setattr(updates, "agent_updater", lambda conf, *args: built.append(conf) or (lambda n: 1.0))
    run = updates.default_bf16_updater(tiny(), torch.device("cpu"))
    assert run(3) == 1.0 and [c.agent.precision for c in built] == ["bf16"]
    assert updates.default_config(tiny().overrides).agent.precision == "fp32"  # the default row stays float32


def test_fixed_rows_are_a_training_config_of_their_sizes() -> None:
    """The older rows' agents come from a validated config of the fixed sizes; the trainer's agent_spec derives
    their shapes from it."""
    from av_td3.bench.config import fixed_config
    from av_td3.train import agent_spec

    cfg = tiny()
    conf = fixed_config(cfg, "shared", monitor=False)
    a, spec = conf.agent, agent_spec(conf.env)
    assert (a.batch_size, a.features_dim, a.hidden_dim, a.hidden_layers, a.encoder) == (8, 16, 32, 2, "shared")
    assert (spec.stack, spec.height, spec.width, spec.state_dim) == (2, 64, 64, state_dim(cfg.lane_points))
    assert conf.env.npcs == 2 and not conf.monitor.enabled


def test_interleave_alternates_the_order() -> None:
    order: list[str] = []

    def runner(name: str):
        def run(n: int) -> float:
            order.append(name)
            return 0.5
        return run

    rates, cpu_rates = bench.interleave({"a": runner("a"), "b": runner("b")}, reps=3, n=2, warmup=0)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert rates == {"a": [4.0, 4.0, 4.0], "b": [4.0, 4.0, 4.0]}
    assert set(cpu_rates) == {"a", "b"} and all(len(v) == 3 and min(v) > 0 for v in cpu_rates.values())


def test_update_ratios_pair_the_repetitions() -> None:
    result = bench.BenchResult({}, {})
    result.rows = [bench.Row("update/ours_separate", "updates/s", [10.0, 5.0, 8.0], cpu_values=[4.0, 4.0, 4.0]),
                   bench.Row("update/ours_separate_monitor_off", "updates/s", [10.2, 5.1, 8.16],
                             cpu_values=[4.0, 4.4, 4.0]),
                   bench.Row("update/sb3", "updates/s", [8.0, 4.0, 8.0]),
                   bench.Row("update/default", "updates/s", [10.0, 5.0, 8.0]),
                   bench.Row("update/default_bf16", "updates/s", [20.0, 5.0, 12.0])]
    ratios = bench.compute_ratios(result)
    assert ratios["monitor_overhead_pct"] == pytest.approx(2.0)
    assert ratios["monitor_overhead_pct_cpu"] == pytest.approx(0.0)
    assert ratios["separate_vs_sb3"] == pytest.approx(1.25)
    assert ratios["default_bf16_speedup"] == pytest.approx(1.5)  # pairs 2, 1, 1.5: their median
    assert "separate_vs_sb3_cpu" not in ratios and "shared_vs_sb3" not in ratios


def test_quick_preset_is_smaller_than_the_full_one() -> None:
    full, quick = bench.preset(False), bench.preset(True)
    assert (quick.height, quick.width, quick.stack, quick.batch_size) == (84, 84, 4, 64) == \
        (full.height, full.width, full.stack, full.batch_size)
    assert quick.npcs == full.npcs == 20
    assert quick.update_reps * quick.updates_per_rep < full.update_reps * full.updates_per_rep
    assert quick.e2e_total_steps < full.e2e_total_steps
    # the headline rows come first in both, at the shipped defaults
    assert quick.update_rows[0] == full.update_rows[0] == "default" and quick.overrides == full.overrides == ()
    assert "e2e" in quick.sections and "e2e" in full.sections


def test_cli_bench_writes_under_outputs_bench_by_default(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli(["bench", "--quick", "--only", "replay"]) == 0
    (run,) = (tmp_path / "outputs" / "bench").iterdir()
    assert files_under(tmp_path) == {run / "bench.json", run / "bench.md"}
    printed = capsys.readouterr().out
    assert "| replay/ours |" in printed and "replay_vs_reference" in printed


def test_cli_bench_passes_overrides_to_the_default_rows(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    assert cli(["bench", "--quick", "--only", "replay", "--out", str(out), "agent.batch_size=64"]) == 0
    assert json.loads((out / "bench.json").read_text())["config"]["overrides"] == ["agent.batch_size=64"]
    assert cli(["bench", "--only", "replay", "--out", str(out), "agent.batch_size=-1"]) == 2
    assert "agent.batch_size" in capsys.readouterr().err
    assert cli(["bench", "--only", "replay", "--out", str(out), "agent.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_cli_bench_usage_errors(tmp_path: Path, capsys) -> None:
    assert cli(["bench", "--only", "update,warp", "--out", str(tmp_path / "o")]) == 2
    assert "unknown section(s) warp" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert cli(["bench", "--out", str(tmp_path / "f")]) == 2
    assert cli(["bench", "--threads", "-1", "--out", str(tmp_path / "o")]) == 2
    if not torch.cuda.is_available():
        assert cli(["bench", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
        assert "no CUDA device" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- progress and Ctrl-C
def test_progress_says_each_section_k_of_n_with_an_estimate_then_its_time(tmp_path: Path) -> None:
    lines: list[str] = []
    bench.run_bench(tiny(sections=("replay", "env")), tmp_path / "out", say=lines.append)
    assert lines[0].startswith("bench: 2 section(s), replay, env: about ") and "estimate" in lines[0]
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"\[\d/2\] \w+: running, about \d+ s \(estimate\)",
                                                                 line)]
    dones = [i for i, line in enumerate(lines) if re.fullmatch(r"\[\d/2\] \w+: done in \d+ s", line)]
    assert [lines[i][:11] for i in starts] == ["[1/2] repla", "[2/2] env: "]
    # each section's own lines come between its start and its end
    assert starts[0] < dones[0] < starts[1] < dones[1] == len(lines) - 1
    assert any(line.startswith("env: ") for line in lines[starts[1]:dones[1]])


def test_estimates_follow_the_presets_sizes() -> None:
    """Estimates, not timings: each section's grows with its sizes; whole runs land near the README's figures."""
    quick, full = bench.preset(True), bench.preset(False)
    for section in ("update", "env", "e2e", "regression"):
        assert estimate_s(section, quick) < estimate_s(section, full), section
    total = {q: sum(estimate_s(s, c) for s in c.sections) for q, c in (("quick", quick), ("full", full))}
    assert 30 < total["quick"] < 180 and 180 < total["full"] < 900, total
    assert about(total["quick"]).startswith("about ") and about(4000) == "about 1 h 7 min"


def interrupt_in(monkeypatch, section: str, error: BaseException, writes: str | None = None) -> None:
    """Make ``section`` of run_bench raise ``error`` (after writing the file ``writes`` into the out folder)."""
    def stopped(cfg, *args) -> None:
        out = next((a for a in args if isinstance(a, Path)), None)
        if writes is not None:
            (out / writes).parent.mkdir(parents=True, exist_ok=True)
            (out / writes).write_text("partial")
        raise error

    monkeypatch.setattr(bench_run, f"bench_{section}", stopped)


def test_ctrl_c_in_the_first_section_says_so_in_one_line_exits_130_and_leaves_no_folder(
        tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "preset", lambda quick: tiny())
    interrupt_in(monkeypatch, "e2e", KeyboardInterrupt(), writes="e2e_default/scalars.csv")
    assert cli(["bench", "--only", "e2e"]) == 130
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("av-td3 bench: interrupted during section e2e (1 of 1); no section had finished")
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "outputs").exists()  # outputs/bench/<timestamp>/ and the folders made for it


def test_ctrl_c_after_a_finished_section_keeps_its_results(tmp_path: Path, monkeypatch, capsys) -> None:
    """A training run turns Ctrl-C into Interrupted (after its checkpoint): the same one line, the finished
    section's results kept, the interrupted section's files removed, a folder that was there before kept."""
    from av_td3.train import Interrupted

    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("was here before")
    monkeypatch.setattr(bench, "preset", lambda quick: tiny())
    interrupt_in(monkeypatch, "e2e", Interrupted(signal.SIGINT), writes="e2e_default/scalars.csv")
    assert cli(["bench", "--only", "replay,e2e", "--out", str(out)]) == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"av-td3 bench: interrupted during section e2e (2 of 2); the finished section(s) replay are in "
                    f"{out / 'bench.json'} and {out / 'bench.md'}")
    assert {p.name for p in out.iterdir()} == {"mine.txt", "bench.json", "bench.md"}
    data = json.loads((out / "bench.json").read_text())
    assert data["config"]["sections_finished"] == ["replay"] and "replay/ours" in {r["name"] for r in data["rows"]}
    # nothing finished, into a folder that was there: left as it was
    interrupt_in(monkeypatch, "replay", KeyboardInterrupt())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["bench", "--only", "replay", "--out", str(empty)]) == 130
    assert "nothing was written into" in capsys.readouterr().err and empty.is_dir() and not any(empty.iterdir())


# ------------------------------------------------------------------------------------------- regression section
def head_or_skip() -> str:
    """HEAD's full hash: the regression tests check out HEAD, which resolves in any clone, shallow ones too."""
    try:
        return regression.resolve_ref("HEAD")
    except regression.RegressionError as err:
        pytest.skip(f"the regression rows need a git checkout of av-td3: {err}")


def bench_worktrees() -> set[str]:
    """The regression section's worktrees now registered (folders av-td3-bench-*; another bench may be running)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"], capture_output=True,
                            text=True, check=True).stdout
    return {line for line in listed.splitlines() if "av-td3-bench-" in line}


def tiny_regression(**kw) -> bench.BenchConfig:
    """Runs of 16 env steps at the tiny sizes of the default rows (keys both codes know: HEAD is today's code)."""
    return tiny(sections=("regression",), against="HEAD", against_overrides=TINY_DEFAULT, regression_total_steps=16,
                regression_learning_starts=8, regression_log_every=4, **kw)


def test_cli_bench_prints_the_regression_rows_against_head(tmp_path: Path, monkeypatch, capsys) -> None:
    """For real: a git worktree of HEAD and today's code each train once, in child processes (~20 s)."""
    label = head_or_skip()[:7]
    before = bench_worktrees()
    monkeypatch.setattr(bench, "preset", lambda quick: tiny_regression(regression_pairs=1,
                                                                       regression_threads=(1,)))
    out = tmp_path / "out"
    assert cli(["bench", "--only", "regression", "--against", "HEAD", "--against-overrides", " ".join(TINY_DEFAULT),
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ratio = f"regression_vs_{label}_threads1"
    for name in ("regression/today_threads1", f"regression/{label}_threads1", ratio):
        assert f"| {name} |" in printed, name
    data = json.loads((out / "bench.json").read_text())
    assert math.isfinite(data["ratios"][ratio]) and data["ratios"][ratio] > 0
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"regression/today_threads1", f"regression/{label}_threads1"}
    assert all(r["reps"] == 1 and r["values"][0] > 0 for r in rows.values())
    assert "today's code" in rows["regression/today_threads1"]["note"]
    assert data["config"]["regression"]["commit"].startswith(label)
    # each code ran from its own folder, in the order A B; the worktree is gone
    assert data["config"]["regression"]["runs_in_order"] == [f"{label}_threads1_0", "today_threads1_0"]
    for run in data["config"]["regression"]["runs_in_order"]:
        assert (out / "regression" / run / "scalars.csv").is_file()
    assert bench_worktrees() <= before


def test_cli_threads_sets_the_regression_runs_threads_too(tmp_path: Path, monkeypatch) -> None:
    """--threads N > 0 runs the regression rows at N threads only (a busy machine skips the spinning default);
    without it, at 1 and torch's default."""
    head_or_skip()
    seen: list[tuple[int, ...]] = []

    class Stop(Exception):
        pass

    def fake_run_bench(cfg, out, quick=False):
        seen.append(cfg.regression_threads)
        raise Stop

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    for threads in (["--threads", "2"], []):
        with pytest.raises(Stop):
            cli(["bench", "--only", "regression", "--against", "HEAD", *threads, "--out", str(tmp_path / "o")])
    assert seen == [(2,), (1, 0)]


def test_regression_interleaves_a_b_b_a_and_pairs_the_runs(tmp_path: Path, monkeypatch) -> None:
    """The order of the runs and the ratios, with each run's rate stubbed (the checkout and import checks are
    real): at each thread setting old, today, today, old; the ratio is the median of today / old per pair.
    --against-overrides reach both codes, --today-overrides today's only."""
    label = head_or_skip()[:7]
    ran: list[tuple[str, int, str, Path]] = []
    overrides: dict[str, tuple[str, ...]] = {}
    rate = {regression.TODAY: [10.0, 12.0, 9.0], label: [5.0, 8.0, 9.0]}  # pairs: 2, 1.5, 1

    def fake_rate(code, cfg, threads, run_dir) -> float:
        ran.append((code.label, threads, run_dir.name, code.root))
        overrides[code.label] = code.overrides
        assert (code.root / "launch.py").is_file()
        return rate[code.label][sum(1 for c, t, *_ in ran if c == code.label and t == threads) - 1]

    monkeypatch.setattr(regression, "learning_rate", fake_rate)
    cfg = tiny_regression(regression_pairs=3, today_overrides=("monitor.enabled=false",))
    result = bench.run_bench(cfg, tmp_path / "out", say=lambda s: None)
    assert overrides == {"today": (*TINY_DEFAULT, "monitor.enabled=false"), label: TINY_DEFAULT}
    assert [(c, t) for c, t, *_ in ran] == [(label, 1), ("today", 1), ("today", 1), (label, 1), (label, 1),
                                            ("today", 1), (label, 0), ("today", 0), ("today", 0), (label, 0),
                                            (label, 0), ("today", 0)]
    assert [d for *_, d, _ in ran][:3] == [f"{label}_threads1_0", "today_threads1_0", "today_threads1_1"]
    assert {r for *_, r in ran} == {regression.code_root(), next(r for c, *_, r in ran if c == label)}
    old_root = next(r for c, *_, r in ran if c == label)
    assert old_root != regression.code_root() and not old_root.exists()
    assert not any(str(old_root) in line for line in bench_worktrees())
    for suffix in ("threads1", "threads_default"):
        assert result.ratios[f"regression_vs_{label}_{suffix}"] == pytest.approx(1.5)
        assert result.ratios[f"regression_vs_{label}_{suffix}_lowest_pair"] == pytest.approx(1.0)
        assert result.ratios[f"regression_vs_{label}_{suffix}_highest_pair"] == pytest.approx(2.0)
        assert result.row(f"regression/today_{suffix}").values == rate["today"]
    assert f"| regression_vs_{label}_threads1_lowest_pair | 1 |" in bench.markdown(result)


def test_cli_pairs_sets_the_regression_and_busy_pairs(tmp_path: Path, monkeypatch, capsys) -> None:
    """--pairs N: N pairs behind every regression and busy ratio; below 1 is a usage error (exit 2)."""
    head_or_skip()
    seen: list[tuple[int, int]] = []

    class Stop(Exception):
        pass

    def fake_run_bench(cfg, out, quick=False):
        seen.append((cfg.regression_pairs, cfg.busy_pairs))
        raise Stop

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    for pairs in (["--pairs", "5"], []):
        with pytest.raises(Stop):
            cli(["bench", "--only", "regression", "--against", "HEAD", *pairs, "--out", str(tmp_path / "o")])
    assert seen == [(5, 5), (2, 2)]
    assert cli(["bench", "--only", "regression", "--against", "HEAD", "--pairs", "0", "--out",
                str(tmp_path / "o")]) == 2
    assert "--pairs 0: give 1 or more" in capsys.readouterr().err


def test_regression_runs_only_code_that_imports_itself(tmp_path: Path) -> None:
    """A folder whose Python would import another av_td3 (here: none of its own, so the installed one) is refused:
    its runs would measure other code."""
    with pytest.raises(regression.RegressionError, match="imports av_td3 from"):
        regression.check_imports_itself(regression.Code("old", tmp_path, "a folder without av_td3", ()))
    regression.check_imports_itself(regression.Code("today", regression.code_root(), "today's code", ()))


def test_cli_bench_regression_usage_errors(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "o")
    assert cli(["bench", "--only", "regression", "--against", "no-such-ref-1f3", "--out", out]) == 2
    assert "--against no-such-ref-1f3: no commit 'no-such-ref-1f3'" in capsys.readouterr().err
    assert cli(["bench", "--only", "regression", "--out", out]) == 2
    assert "--against REF" in capsys.readouterr().err
    assert cli(["bench", "--only", "regression", "--against", "HEAD", "--against-overrides",
                "trainer.total_steps=10", "--out", out]) == 2
    assert "trainer.total_steps is set by the bench" in capsys.readouterr().err
    assert cli(["bench", "--only", "regression", "--against", "HEAD", "--today-overrides", "hydra.run.dir=x",
                "--out", out]) == 2
    assert "--today-overrides hydra.run.dir=x: hydra.run.dir is set by the bench" in capsys.readouterr().err
    assert cli(["bench", "--only", "update", "--today-overrides", "env.view=world", "--out", out]) == 2
    assert "--against REF" in capsys.readouterr().err
    assert cli(["bench", "--only", "regression", "--against", "HEAD", "--against-overrides", "agent.no_such_key=1",
                "--out", out]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_regression_ref_outside_a_git_checkout_names_the_ref(tmp_path: Path) -> None:
    with pytest.raises(regression.RegressionError, match="--against 7a659b0: .* is not a git checkout"):
        regression.resolve_ref("7a659b0", tmp_path)


# ------------------------------------------------------------------------------------------------ busy section
def test_busy_rows_train_both_thread_settings_next_to_two_busy_processes(tmp_path: Path, monkeypatch) -> None:
    """For real: two busy-looping processes run during the section and are gone after it; today's code trains at
    torch's default threads and at one (child processes, 16-step runs, one pair), and the ratio is paired."""
    from av_td3.bench import busy

    started: list[subprocess.Popen] = []
    real = busy.background_load

    @contextlib.contextmanager
    def watched(n: int = busy.BACKGROUND):
        with real(n) as procs:
            started.extend(procs)
            assert all(p.poll() is None for p in procs)  # looping while the runs train
            yield procs

    monkeypatch.setattr(busy, "background_load", watched)
    cfg = tiny(sections=("busy",), regression_total_steps=16, regression_learning_starts=8, regression_log_every=4,
               busy_pairs=1)
    result = bench.run_bench(cfg, tmp_path / "out", say=lambda s: None)
    assert len(started) == 2 and all(p.poll() is not None for p in started)  # stopped after the section
    rows = {r.name: r for r in result.rows}
    assert set(rows) == {"busy/threads1", "busy/threads_default"}
    assert all(len(r.values) == 1 and min(r.values) > 0 for r in rows.values())
    assert "OMP_WAIT_POLICY=PASSIVE" in rows["busy/threads1"].note
    assert sorted(p.name for p in (tmp_path / "out" / "busy").iterdir()) == ["threads1_0", "threads_default_0"]
    assert result.ratios["busy_default_vs_threads1"] == pytest.approx(
        statistics.median(d / o for d, o in zip(rows["busy/threads_default"].values, rows["busy/threads1"].values)))
    assert "busy_default_vs_threads1" in bench.markdown(result)
