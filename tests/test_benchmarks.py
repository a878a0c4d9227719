"""The benchmark scripts' code paths on tiny models, and the training modes the baselines rest on.

No timing is asserted here: timings belong to the benchmarks' output (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import timm
import torch

from adaptive_depth import AdaptiveDepth, ConfigError
from adaptive_depth.training import CooperativeLogits, DepthResult, TrainingConfig, cooperative_loss
from scripts import ROOT, load_script


def _script(name: str):
    return load_script(f"benchmarks/{name}.py")


def _regnet() -> AdaptiveDepth:
    return AdaptiveDepth.wrap(timm.create_model("regnetx_002", num_classes=3), input_size=[3, 32, 32])


def test_drop_blocks_skips_random_blocks_reproducibly_and_keeps_every_stage() -> None:
    model = _regnet()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    first = model.drop_blocks(0.5).active_depth
    assert model.scaling_factor is None
    torch.manual_seed(3)
    assert model.drop_blocks(0.5).active_depth == first  # the torch RNG drives it: seeds and checkpoints reproduce
    seen = set()
    for _ in range(30):
        depth = tuple(model.drop_blocks(0.9).active_depth)
        assert all(d >= 1 for d in depth)
        seen.add(depth)
        model.eval()(x)  # every sampled depth runs
    assert len(seen) > 3  # really random
    assert model.drop_blocks(0.0).active_depth == model.depth_for(1.0)
    model.set_scaling_factor(0.5)
    assert model.active_depth == model.depth_for(0.5)
    for bad in (1.0, -0.1, "0.5"):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            model.drop_blocks(bad)  # type: ignore[arg-type]


def test_training_config_for_baselines() -> None:
    alone = TrainingConfig(scaling_factors=[0.5], full_depth=False, leader="none", interactive=False)
    assert alone.scaling_factors == [0.5] and alone.top_scaling_factor == 0.5 and alone.sub_scaling_factors == []
    assert TrainingConfig(scaling_factors=[0.5]).scaling_factors == [0.5, 1.0]
    with pytest.raises(ConfigError, match="layer_drop"):
        TrainingConfig(layer_drop=1.0)
    # Below a top depth < 1 the objective distils from that top depth.
    config = TrainingConfig(scaling_factors=[0.25, 0.5], full_depth=False, leader="none", interactive=False)
    logits = CooperativeLogits([{0.5: torch.tensor([[2.0, 0.0]]), 0.25: torch.tensor([[0.0, 1.0]])}])
    loss = cooperative_loss(logits, torch.tensor([0]), config)
    assert set(loss.terms) == {"A/s=0.5/ce", "A/s=0.25/self", "A/s=0.25/ce"}


def _accuracy(out: Path, *extra: str) -> list:
    return _script("accuracy").main(
        [
            "--model", "regnetx_002", "--weights", "random", "--max-train-samples", "32", "--max-eval-samples",
            "16", "--epochs", "1", "--batch-size", "16", "--seeds", "0", "--scaling-factors", "0.5", "1.0",
            "--output-dir", str(out), *extra,
        ]
    )  # fmt: skip


def test_accuracy_benchmark_runs_every_baseline_at_every_depth(tmp_path: Path) -> None:
    bench = _script("accuracy")
    out = tmp_path / "acc"
    methods = ["cooperative", "plain", "random-depth", "two-path", "alone", "frozen-leader-cached", "random-depth@wall"]
    runs = _accuracy(out, "--methods", *methods)
    by_method = {r.method: r for r in runs}
    assert set(by_method) == {*methods, bench.NO_BN}
    for method in set(by_method) - {"alone"}:
        assert set(by_method[method].top1) == {0.5, 1.0}, method
        assert all(0 <= v <= 100 for v in by_method[method].top1.values())
    # "alone" trains s=0.5 on its own and leaves the full depth to "plain"
    assert by_method["alone"].top1[0.5] >= 0 and math.isnan(by_method["alone"].top1[1.0])
    assert by_method["plain"].gflops[0.5] < by_method["plain"].gflops[1.0]
    # random depth again, with as many epochs as the cooperative method's training time buys it
    wall = by_method["random-depth@wall"]
    expected = round(by_method["cooperative"].seconds / by_method["random-depth"].seconds)
    assert wall.epochs == max(1, expected) and wall.epochs >= 2
    table = (out / "accuracy.md").read_text()
    assert "| random-depth |" in table and "| alone |" in table and "vs plain" in table
    assert len(json.loads((out / "accuracy.json").read_text())["runs"]) == len(runs)
    assert (out / "accuracy.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "random-depth@wall"])  # its epochs need the cooperative method's time


def test_accuracy_benchmark_r2_starts_every_method_from_one_fine_tuned_model(tmp_path: Path) -> None:
    runs = _accuracy(tmp_path, "--regime", "r2", "--base-epochs", "1", "--methods", "plain", "frozen-leader", "streams")
    by_method = {r.method: r for r in runs}
    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(report["base_seconds"]) == {"0"} and report["base_seconds"]["0"] > 0
    assert by_method["plain"].seconds == 0.0  # the fine-tuned model itself, cut to each depth: no more training
    assert by_method["frozen-leader"].seconds > 0 and set(by_method["streams"].top1) == {0.5, 1.0}
    assert "took" in (tmp_path / "accuracy.md").read_text()


def test_budget_curves_give_every_method_the_same_compute_and_merge_runs_made_apart(tmp_path: Path) -> None:
    bench = _script("accuracy")
    methods = ["plain", "cooperative", "distill", "random-depth-nested"]
    common = ["--batch-size", "8", "--max-train-samples", "48"]
    runs = _accuracy(tmp_path / "s0", "--budgets", "2", "4", "--methods", *methods, *common)
    points = {(r.method, r.budget): r for r in runs}
    # r1: distill's teacher is the plain run of half its budget, counted; plain at 1 is that extra point
    assert set(points) == {(m, b) for m in methods for b in (2.0, 4.0)} | {("plain", 1.0)}
    for (method, budget), run in points.items():
        assert run.compute == pytest.approx(budget, rel=0.2), (method, budget, run.compute)
        assert set(run.top1) == {0.5, 1.0} and run.seconds > 0
    assert points["plain", 2.0].steps == round(2 * 43 / 8)  # 48 images less 5 held out for the norm check
    assert points["cooperative", 2.0].steps < points["plain", 2.0].steps
    assert points["distill", 4.0].seconds > points["plain", 2.0].seconds  # it includes its teacher's time
    _accuracy(tmp_path / "s1", "--budgets", "2", "--methods", "plain", "random-depth-nested", *common, "--seeds", "1")
    merged = bench.main(["--merge", str(tmp_path / "s0" / "budgets.json"), str(tmp_path / "s1" / "budgets.json"),
                         "--output-dir", str(tmp_path / "all")])  # fmt: skip
    assert {(r.method, r.seed) for r in merged if r.budget == 2.0} == {(m, s) for m in methods for s in (0, 1)} - {
        ("distill", 1),
        ("cooperative", 1),
    }
    table = (tmp_path / "all" / "budgets.md").read_text()
    assert "**Budget 4**" in table and "random-depth-nested wins at s=0.5" in table
    assert (tmp_path / "all" / "budgets.png").is_file()
    # a run from other weights under the same name (a checkpoint pretrained again) is refused, not averaged in
    remade = json.loads((tmp_path / "s1" / "budgets.json").read_text())
    assert remade["settings"]["start_weights"] == json.loads((tmp_path / "s0" / "budgets.json").read_text())[
        "settings"]["start_weights"]  # fmt: skip
    remade["settings"]["start_weights"] = "0" * 16
    (tmp_path / "remade").mkdir()
    (tmp_path / "remade" / "budgets.json").write_text(json.dumps(remade))
    with pytest.raises(SystemExit, match="other weights"):
        bench.main(["--merge", str(tmp_path / "s0" / "budgets.json"), str(tmp_path / "remade" / "budgets.json")])
    with pytest.raises(SystemExit):
        bench.parse_args(["--budgets", "1", "--methods", "cooperative", "random-depth", "random-depth@wall"])


def test_r2_runs_of_one_seed_made_apart_merge_with_their_starting_model_once(tmp_path: Path) -> None:
    """Each r2 process fine-tunes the seed's starting model again; merged, it is one budget-0 point, and a file whose
    starting model scored otherwise (not the same model: the runs are not paired) is refused."""
    bench = _script("accuracy")
    common = ["--regime", "r2", "--base-epochs", "1", "--budgets", "1"]
    _accuracy(tmp_path / "a", *common, "--methods", "plain")
    _accuracy(tmp_path / "b", *common, "--methods", "random-depth-nested")
    parts = [str(tmp_path / part / "budgets.json") for part in ("a", "b")]
    merged = bench.main(["--merge", *parts, "--output-dir", str(tmp_path / "all")])
    assert sorted((r.method, r.budget) for r in merged) == [
        ("fine-tuned (cut)", 0.0), ("plain", 1.0), ("random-depth-nested", 1.0)
    ]  # fmt: skip
    other = json.loads(Path(parts[1]).read_text())
    base = next(run for run in other["runs"] if run["method"] == "fine-tuned (cut)")
    base["top1"]["0.5"] += 1.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="not paired"):
        bench.main(["--merge", parts[0], str(tmp_path / "other.json"), "--output-dir", str(tmp_path / "refused")])


def test_the_start_weights_digest_changes_with_any_weight() -> None:
    digest = _script("accuracy").weights_digest
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    same = copy.deepcopy(model)
    assert digest(model) == digest(same) and len(digest(model)) == 16
    with torch.no_grad():
        same[1].running_mean[2] += 1e-6  # a buffer counts: per-depth statistics are part of what a run starts from
    assert digest(model) != digest(same)


def test_inference_benchmark_reports_every_depth_and_the_targets(tmp_path: Path) -> None:
    bench = _script("inference")
    out = tmp_path / "inference.json"
    reports = bench.main(
        ["--models", "test_vit", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "0", "--compile", "none",
         "--json", str(out)]
    )  # fmt: skip
    (report,) = reports
    assert {(d.batch_size, d.scaling_factor) for d in report.depths} == {
        (b, s) for b in (1, 2) for s in (0.25, 0.5, 0.75, 1.0)
    }
    full = [d for d in report.depths if d.scaling_factor == 1.0]
    assert all(d.latency_ratio == 1.0 and d.flops_ratio == 1.0 for d in full)
    assert all(d.flops_ratio < 1.0 and d.params_m < full[0].params_m for d in report.depths if d.scaling_factor < 0.5)
    assert report.switch_us > 0 and report.weights_moved is False
    assert json.loads(out.read_text())["reports"][0]["model"] == "test_vit"
    assert "latency/FLOPs ratio at s=0.5" in bench.markdown(reports)


def test_training_cost_benchmark_times_today_recipes_and_charges_the_flops_that_ran(tmp_path: Path) -> None:
    bench = _script("training_cost")
    out = tmp_path / "cost.json"
    result = bench.main(
        ["--model", "regnetx_002", "--batch-size", "4", "--recipes", "plain", "cooperative", "random-depth-nested",
         "distill-cached", "--repeats", "1", "--warmup", "0", "--steps-per-round", "2", "--device", "cpu",
         "--json", str(out)]
    )  # fmt: skip
    rows = result["recipes"]
    model = AdaptiveDepth.wrap(timm.create_model("regnetx_002", num_classes=10), input_size=[3, 32, 32])
    gflops = {s: model.flops(s) / 1e9 for s in (0.25, 0.5, 0.75, 1.0)}  # the benchmark's model: per image
    # A plain step is a forward and a backward at full depth; a cooperative one adds the Leader to every depth.
    assert rows["plain"]["gflops_per_image"] == pytest.approx(3 * gflops[1.0])
    assert rows["cooperative"]["gflops_per_image"] == pytest.approx(3 * (gflops[1.0] + sum(gflops.values())))
    # One nested depth a step: between the smallest and the full depth; a cached teacher's table is not a step.
    assert 3 * gflops[0.25] <= rows["random-depth-nested"]["gflops_per_image"] <= 3 * gflops[1.0]
    assert 3 * gflops[0.25] <= rows["distill-cached"]["gflops_per_image"] <= 3 * gflops[1.0]
    assert set(result["parts_ms"]) == {"Leader", "optimizer"} | {f"Teammate A s={s:g}" for s in gflops}
    assert all(row["ms_per_step"] > 0 for row in rows.values())
    assert "cooperative step" in bench.markdown(result) and json.loads(out.read_text())["recipes"].keys() == rows.keys()


def test_accuracy_benchmark_config_overrides_are_checked() -> None:
    bench = _script("accuracy")
    args = bench.parse_args(["--set", "temperature=1", "leader=none", "sampled_depths=null", "--methods", "plain"])
    assert args.set == {"temperature": 1, "leader": "none", "sampled_depths": None}
    with pytest.raises(SystemExit):
        bench.parse_args(["--set", "temprature=1"])  # a typo is an error, not a silently ignored value
    # a value a method sets itself would be overridden by it: an error, not a run of something else
    with pytest.raises(SystemExit):
        bench.parse_args(["--set", "smallest_share=0.75", "--methods", "plain", "random-depth-nested"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--set", "leader=none"])  # the default methods include the cooperative one (a Leader)
    assert bench.parse_args(["--set", "smallest_share=0.5", "--methods", "random-depth-nested"]).set  # the same value
    with pytest.raises(SystemExit):  # two-path trains the smallest depth and the full one, whatever --set says
        bench.parse_args(["--set", "scaling_factors=[0.5, 1.0]", "--methods", "two-path"])
    with pytest.raises(SystemExit):  # a value TrainingConfig refuses fails before any data is read
        bench.parse_args(["--set", "smallest_share=0.9", "--methods", "plain"])
    assert not set(bench.CHEAPER) & set(bench.DEFAULT_METHODS) and set(bench.DEFAULT_METHODS) <= set(bench.CHOICES)


def test_every_accuracy_benchmark_method_is_a_training_config_and_the_share_rows_say_their_share() -> None:
    bench = _script("accuracy")
    for method in bench.CHOICES:  # a row TrainingConfig refuses would fail only when a run reaches it
        assert bench.configs(method, TrainingConfig(), [0.25, 0.5, 1.0]), method
    expected = {"nested-smallest-quarter": 0.25, "random-depth-nested": 0.5, "nested-smallest-three-quarters": 0.75}
    for method, share in expected.items():
        assert bench.configs(method, TrainingConfig(), [0.25, 1.0])[0][0].smallest_share == share, method


def test_accuracy_benchmark_reports_the_mean_of_the_teammates_not_the_picked_one() -> None:
    bench = _script("accuracy")
    results = [
        DepthResult("A", 0.5, top1=80.0, top1_trained_norms=70.0, gflops=1.0),
        DepthResult("B", 0.5, top1=90.0, top1_trained_norms=None, gflops=1.0),
        DepthResult("A", 1.0, top1=84.0, top1_trained_norms=80.0, gflops=2.0),
        DepthResult("B", 1.0, top1=94.0, top1_trained_norms=90.0, gflops=2.0),
        DepthResult("leader", 1.0, top1=99.0, gflops=2.0),  # never part of the method's score
    ]
    scores = bench.teammate_scores(results, "B", [0.5, 1.0])
    # B was deployed (picked on these held-out images): reporting it would credit the method with the better draw
    assert scores["top1"] == {0.5: 85.0, 1.0: 89.0} and scores["deployed"] == {0.5: 90.0, 1.0: 94.0}
    assert scores["trained_norms"] == {0.5: 70.0, 1.0: 85.0} and scores["gflops"] == {0.5: 1.0, 1.0: 2.0}


def test_accuracy_runs_made_apart_merge_into_one_table(tmp_path: Path) -> None:
    bench = _script("accuracy")
    for seed in ("0", "1"):
        _accuracy(tmp_path / seed, "--methods", "plain", "random-depth", "--seeds", seed)
    parts = [tmp_path / seed / "accuracy.json" for seed in ("0", "1")]
    runs = bench.main(["--merge", *map(str, parts), "--output-dir", str(tmp_path / "all")])
    assert sorted((r.method, r.seed) for r in runs) == [
        ("plain", 0),
        ("plain", 1),
        ("random-depth", 0),
        ("random-depth", 1),
    ]
    table = (tmp_path / "all" / "accuracy.md").read_text()
    assert "seeds [0, 1]" in table and "| plain |" in table and " ± " in table  # a spread needs two seeds
    separate = {r.method: r.top1 for r in bench.load_runs(parts[:1])[0]}
    assert {r.method: r.top1 for r in runs if r.seed == 0} == separate  # the numbers pass through unchanged
    with pytest.raises(SystemExit, match="more than one file"):
        bench.main(["--merge", str(parts[0]), str(parts[0]), "--output-dir", str(tmp_path / "twice")])
    _accuracy(tmp_path / "other", "--methods", "plain", "--seeds", "2", "--epochs", "2")
    with pytest.raises(SystemExit, match=r"other settings \(epochs\)"):
        bench.main(["--merge", str(parts[0]), str(tmp_path / "other" / "accuracy.json"), "--output-dir", str(tmp_path)])
    budget_report = next((ROOT / "benchmarks" / "results" / "budgets").glob("*.json"))
    with pytest.raises(SystemExit, match="merge each apart"):  # told by their content, not by the file names
        bench.main(["--merge", str(parts[0]), str(budget_report), "--output-dir", str(tmp_path / "mixed")])


def test_the_committed_budget_results_merge_by_run(tmp_path: Path) -> None:
    """benchmarks/results/budgets/ holds the runs the docs quote: each run's seeds merge (same settings, same start
    weights), so a later session adds seeds to them instead of starting again."""
    bench = _script("accuracy")
    files = sorted((ROOT / "benchmarks" / "results" / "budgets").glob("*.json"))
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(path.stem.rsplit("-s", 1)[0], []).append(path)
    assert groups, "no committed results"
    for name, paths in groups.items():  # read as committed, under their own names (as benchmarks/results says)
        for path in paths:
            assert json.loads(path.read_text())["settings"]["start_weights"], path
        runs = bench.main(["--merge", *map(str, paths), "--output-dir", str(tmp_path / name / "merged")])
        assert len({r.seed for r in runs}) == len(paths), name


def test_the_merge_commands_the_docs_print_merge_the_committed_results() -> None:
    """Each ``--merge benchmarks/results/...`` of the docs, expanded by bash as a reader's shell expands it, names files
    that exist and merge: a pattern that also sweeps in runs from another checkpoint copy (once refused) fails here."""
    bench = _script("accuracy")
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "results" / "README.md"]
    commands = [
        re.findall(r"benchmarks/results/[^\s`]+", match.group(1))
        for page in pages
        for match in re.finditer(r"--merge\s+((?:benchmarks/results/[^\s`]+\s*(?:\\\s*)?)+)", page.read_text())
    ]
    assert len(commands) >= 5, commands  # the docs' Fashion-MNIST, R2 and digits-cluttered merges at least
    for patterns in commands:
        for pattern in patterns:
            assert re.fullmatch(r"[\w./{},*-]+", pattern), pattern  # only braces and globs reach the shell
        expanded = subprocess.run(
            ["bash", "-c", 'printf "%s\\n" ' + " ".join(patterns)], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        missing = [path for path in expanded if not (ROOT / path).is_file()]  # bash leaves a glob that matched nothing
        assert not missing, f"{patterns}: {missing}"
        try:
            runs, _ = bench.load_budget_runs([ROOT / path for path in expanded])
        except SystemExit as refused:  # --merge's refusal (other settings or weights, a run twice)
            pytest.fail(f"{patterns}: --merge refuses them: {refused}")
        assert len({r.seed for r in runs}) >= 2, patterns
