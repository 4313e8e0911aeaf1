"""Every benchmark script runs end to end on CPU at toy sizes, so a refactor cannot leave one broken until the
next (rare, time-boxed) GPU session. Numbers are not checked: timing claims live in bench/results/*.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "bag_io": ["--bags", "3", "--n", "20", "--dim", "8", "--workers", "0", "--repeats", "1"],
    "ncmi_loss": ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--sizes", "8x3x6"],
    "aggregators": ["--device", "cpu", "--n", "16", "--infer-n", "32", "--dim", "16", "--repeats", "1",
                    "--warmup", "0", "--threads", "1"],
    "training --fit": ["--fit", "--bags", "4", "--val-bags", "4", "--instances", "8", "--dim", "16",
                       "--fit-epochs", "1", "2", "--models", "abmil", "--threads", "1"],
    "mil_benchmark": ["--families", "digits4", "--draws", "0", "--models", "abmil", "--seeds", "0", "--epochs", "1",
                      "--bags", "20", "--jobs", "1", "--objectives", "ce", "ce_lr", "ncmi",
                      "--ncmi-set", "model.centroid_lr=0.5"],
    "mil_families": ["--families", "digits4", "--draws", "0", "--scale", "0.1"],
    "training": ["--bags", "3", "--instances", "8", "--dim", "16", "--epochs", "1", "--precision", "32-true",
                 "--models", "abmil", "--threads", "1"],
    "natural_step": ["--model", "resnet18", "--batch", "4", "--size", "32", "--classes", "5", "--cifar-stem",
                     "--device", "cpu", "--no-amp", "--warmup", "0", "--repeats", "1", "--threads", "1"],
    "ood": ["--seeds", "0", "--epochs", "1", "--n-slides", "12", "--dim", "8", "--n-ood", "3", "--instances", "8",
            "--threads", "1"],
    "extract": ["--tiles", "40", "--tiles-per-slide", "20", "--slide-mpp", "0.5", "--encoders", "--batch-size", "16",
                "--workers", "0", "--device", "cpu"],
    "ncmi_equivalence": ["--models", "abmil", "--epochs", "1", "--natural-epochs", "1"],
    "extract --compare": ["--tiles", "32", "--tiles-per-slide", "16", "--encoders", "--batch-size", "16",
                          "--workers", "0", "--device", "cpu", "--compare", "--repeats", "2"],
    "extract --jpeg-decode": ["--tiles", "32", "--tiles-per-slide", "16", "--encoders", "test_resnet", "--patch-size",
                              "64", "--batch-size", "16", "--workers", "1", "--device", "cpu", "--read-path", "fast",
                              "--jpeg-decode", "both", "--ceiling-seconds", "0.2"],
    "read_path_diff": ["--tiles", "4", "--patch-size", "64", "--synthetic-side", "1024"],
    "read_budget": ["--tiles", "32", "--tiles-per-slide", "16", "--workers", "1", "--batch-size", "8",
                    "--repeats", "1"],
    "multi_gpu": ["--runs", "cpu", "cpu,cpu", "--device", "cpu", "--encoder", "test_resnet", "--tiles", "48",
                  "--tiles-per-slide", "16", "--workers", "0", "--batch-size", "16"],
    # two quick cases of the fault suite (the whole suite takes about a minute)
    "faults": ["-k", "natural_track or killed_writer"],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_script_runs_on_cpu(script: str, tmp_path: Path) -> None:
    args = list(CASES[script])
    if script == "aggregators":
        args += ["--out", str(tmp_path / "aggregators.md")]
    if script == "bag_io":
        args += ["--out", str(tmp_path / "bags")]
    if script == "faults":
        args += ["--out", str(tmp_path / "faults.md")]
    if script == "ncmi_equivalence":
        args += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "numbers.json")]
    if script == "mil_families":
        args += ["--work", str(tmp_path / "work")]
    if script == "mil_benchmark":
        args += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "mil_benchmark.md")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script.split()[0]}.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    marker = "/CE" if script == "natural_step" else "|"  # its ratio table / a markdown table
    assert marker in proc.stdout, proc.stdout[-2000:]
    if script == "aggregators":
        assert (tmp_path / "aggregators.md").read_text().count("\n") >= 3
    if script == "mil_benchmark":  # the CE control at the NCMI learning rate is trained and reported
        text = (tmp_path / "mil_benchmark.md").read_text()
        assert "CE head @ NCMI lr" in text and "CE-LP" in text and "tuning draws" in text
        # a tuning candidate reaches the NCMI run's fit only, and the report says the table is not the shipped recipe
        assert "`--model.centroid_lr 0.5` appended to the shipped leaf" in text
        runs = tmp_path / "work" / "runs"
        (ncmi_run,) = runs.glob("digits4-default_d0_abmil_ncmi-*_s0")  # named by a digest of the overrides
        assert "centroid_lr: 0.5" in (ncmi_run / "config.yaml").read_text()
        assert "centroid_lr: 0.1\n" in (runs / "digits4-default_d0_abmil_ce_s0" / "config.yaml").read_text()


def test_mil_benchmark_control_takes_the_ncmi_leafs_learning_rate() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import mil_benchmark
    finally:
        sys.path.remove(str(ROOT / "bench"))
    ce = mil_benchmark.shipped_fit_args("aem", "ce", "B", "S", 4, 2, "R")
    control = mil_benchmark.shipped_fit_args("aem", "ce_lr", "B", "S", 4, 2, "R")
    assert control[: len(ce)] == ce and control[1].endswith("aem_ce.yaml")  # the CE leaf ...
    assert control[len(ce):] == ["--model.lr", "0.0003", "--model.warmup_epochs", "1.0"]  # ... at AEM's NCMI lr



def test_mil_benchmark_does_not_train_a_control_identical_to_the_ce_run() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import mil_benchmark
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert mil_benchmark.ce_lr_is_ce("asmil") and not mil_benchmark.ce_lr_is_ce("abmil")  # shipped lr 1e-4 vs 3e-4
    jobs = [{"task": "t", "draw": 0, "model": m, "objective": o, "seed": s}
            for m in ("abmil", "asmil") for o in ("ce", "ce_lr", "ncmi") for s in (0, 1)]
    jobs.append({"task": "t", "draw": 0, "model": "asmil", "objective": "ce_lr", "seed": 2})  # no CE run to reuse
    run, dupes = mil_benchmark.split_duplicate_controls(jobs)
    assert [(j["model"], j["seed"]) for j in dupes] == [("asmil", 0), ("asmil", 1)]
    assert len(run) == len(jobs) - 2 and {"model": "asmil", "objective": "ce_lr", "seed": 2} == {
        k: run[-1][k] for k in ("model", "objective", "seed")}
    results = [{**j, "metrics": {"head": {"macro_f1": 0.5 + j["seed"]}}} for j in run if j["objective"] == "ce"]
    copies = mil_benchmark.copy_controls(results, dupes)
    assert [(c["objective"], c["same_as"], c["metrics"]["head"]["macro_f1"]) for c in copies] == [
        ("ce_lr", "ce", 0.5), ("ce_lr", "ce", 1.5)]
