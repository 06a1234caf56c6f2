"""The method benchmark: its statistics on known numbers, which models a rerun trains, the
scheduler's order, and the report."""
import json
import os

import pytest

from helpers import tool
from msad.benchmark import compare
from msad.benchmark.paired import paired_difference, t_quantile, verdict


@pytest.mark.parametrize("dof, quantile", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764),
                                           (9, 2.2622), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_tables(dof, quantile):
    assert t_quantile(0.95, dof) == pytest.approx(quantile, abs=1e-4)


def test_t_quantile_of_other_confidences():
    assert t_quantile(0.99, 4) == pytest.approx(4.6041, abs=1e-4)
    assert t_quantile(0.90, 7) == pytest.approx(1.8946, abs=1e-4)
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.95, 0)


def test_paired_interval_on_known_numbers():
    # Differences 1, 2, 3, 4, 5: mean 3, sample std sqrt(2.5), t(0.975, 4) = 2.7764.
    d = paired_difference([11, 12, 13, 14, 15], [10, 10, 10, 10, 10])
    half = 2.7764451 * 2.5 ** 0.5 / 5 ** 0.5
    assert d["n"] == 5 and d["mean"] == 3 and d["std"] == pytest.approx(2.5 ** 0.5)
    assert (d["low"], d["high"]) == pytest.approx((3 - half, 3 + half))
    assert d["differences"] == [1, 2, 3, 4, 5]
    assert verdict(d) == "above 0"
    assert verdict(paired_difference([1, 2, 3], [2, 4, 5])) == "below 0"
    assert verdict(paired_difference([1, 3, 2], [2, 2, 2])) == "includes 0"
    one = paired_difference([1.5], [1.0])
    assert one["mean"] == 0.5 and one["low"] is None and verdict(one) == "one seed"
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1, 2], [1])


def test_pairing_removes_what_the_seed_puts_into_both():
    """Seeds that move both models by the same amount leave the difference exact."""
    seed_effect = [0.0, 5.0, -3.0, 2.0, 8.0]
    d = paired_difference([20 + e + 1 for e in seed_effect], [20 + e for e in seed_effect])
    assert d["mean"] == pytest.approx(1) and d["std"] == pytest.approx(0, abs=1e-12)


def test_copypaste_metrics_reads_the_last_evaluation():
    log = "\n".join(["x copypaste: Task: bbox", "x copypaste: AP,AP50,AP75,APs,APm,APl",
                     "x copypaste: 1.0,2.0,3.0,4.0,nan,nan", "noise",
                     "x copypaste: Task: bbox", "x copypaste: AP,AP50,AP75,APs,APm,APl",
                     "x copypaste: 5.5,6.0,7.0,8.0,9.0,nan"])
    assert compare.copypaste_metrics(log) == {"AP": 5.5, "AP50": 6.0, "AP75": 7.0, "APs": 8.0,
                                              "APm": 9.0, "APl": None}
    assert compare.copypaste_metrics("no evaluation") is None


class FakeRun:
    """Stands for a training: finishes at its second poll, writing a result whose AP is known."""

    log = []

    def __init__(self, job, ap, fail=False):
        self.job, self.ap, self.fail, self.polls = job, ap, fail, 0
        FakeRun.log.append(("start", job.seed, job.model.name))

    def poll(self):
        self.polls += 1
        if self.polls < 2:
            return None
        if self.fail:
            return 3
        FakeRun.log.append(("end", self.job.seed, self.job.model.name))
        result = {"seed": self.job.seed, "model": self.job.model.name, "seconds": 0.0,
                  "metrics": {"AP": self.ap, "APs": self.ap - 1, "AP50": self.ap * 2},
                  "evals": {"hr": {"AP": self.ap - 0.5, "APs": 0.0, "AP50": 0.0}}
                  if self.job.model.evals else {}}
        with open(os.path.join(self.job.directory, compare.RESULT), "w") as f:
            json.dump(result, f)
        logged = {"teacher": [{"fusion_hr_weight/p3": 0.6}, {"fusion_hr_weight/p3": 0.8}],
                  "student": [{"grad_share/distill": 0.9, "iteration": 19},
                              {"grad_share/distill": 0.5, "iteration": 39}]}
        with open(os.path.join(self.job.directory, "metrics.json"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in logged.get(self.job.model.name, []))
        return 0

    def progress(self):
        return None

    def kill(self):
        pass


# AP = base of the model + the seed's effect (the same for every model of a seed) + noise.
BASE = {"hr": 20.0, "teacher": 22.0, "lr": 12.0, "lr_long": 13.0, "lr_teacher_init": 17.0,
        "student": 18.0}
NOISE = [0.1, -0.2, 0.0, 0.3, -0.2]  # sums to 0


def fake_start(fail=()):
    def start(job):
        return FakeRun(job, BASE[job.model.name] + 3 * job.seed + NOISE[job.seed] *
                       (job.model.name == "student"), fail=job.tag in fail)
    return start


def core_models():
    return [m for m in compare.MODELS if m.name in BASE]


def test_scheduler_starts_a_model_after_what_it_starts_from(tmp_path):
    FakeRun.log = []
    jobs = compare.plan(core_models(), [0, 1], str(tmp_path))
    assert compare.run_jobs(jobs, fake_start(), parallel=3, report=lambda s: None,
                            poll_every=0) == []
    for seed in (0, 1):
        end_teacher = FakeRun.log.index(("end", seed, "teacher"))
        for name in ("student", "lr_teacher_init"):
            assert FakeRun.log.index(("start", seed, name)) > end_teacher
    assert all(compare.is_finished(j) for j in jobs)


def test_a_rerun_trains_only_what_is_missing_and_what_starts_from_it(tmp_path):
    jobs = compare.plan(core_models(), [0, 1, 2], str(tmp_path))
    assert compare.to_run(jobs) == jobs
    failed = compare.run_jobs(jobs, fake_start(fail={"seed 1 teacher"}), parallel=1,
                              report=lambda s: None, poll_every=0)
    assert failed == ["seed 1 teacher"]  # and nothing was started after it
    done = {(j.seed, j.model.name) for j in jobs if compare.is_finished(j)}
    assert done == {(0, m.name) for m in core_models()} | {(1, "hr")}
    todo = compare.to_run(jobs)
    assert {(j.seed, j.model.name) for j in todo} == {
        (j.seed, j.model.name) for j in jobs} - done
    # A finished student whose teacher is trained again is trained again too.
    os.remove(os.path.join(jobs[1].directory, compare.RESULT))  # seed 0's teacher
    again = {(j.seed, j.model.name) for j in compare.to_run(jobs[:len(core_models())])}
    assert again == {(0, "teacher"), (0, "lr_teacher_init"), (0, "student")}
    FakeRun.log = []
    assert compare.run_jobs(compare.to_run(jobs), fake_start(), parallel=2,
                            report=lambda s: None, poll_every=0) == []
    assert ("start", 0, "hr") not in FakeRun.log  # kept
    assert all(compare.is_finished(j) for j in jobs)
    # A run that must retrain a teacher and stops after it (another model failed) leaves no
    # result of a student trained from the old teacher.
    os.remove(os.path.join(jobs[1].directory, compare.RESULT))
    todo = compare.to_run(jobs)
    failed = compare.run_jobs(todo, fake_start(fail={"seed 0 teacher"}), parallel=1,
                              report=lambda s: None, poll_every=0)
    assert failed == ["seed 0 teacher"]
    assert not any(compare.is_finished(j) for j in todo)
    assert {(j.seed, j.model.name) for j in compare.to_run(jobs)} == {
        (0, "teacher"), (0, "lr_teacher_init"), (0, "student")}


def test_summary_gives_each_comparison_its_paired_interval(tmp_path):
    seeds = [0, 1, 2, 3, 4]
    jobs = compare.plan(core_models(), seeds, str(tmp_path))
    compare.run_jobs(jobs, fake_start(), parallel=2, report=lambda s: None, poll_every=0)
    summary = compare.summarise(compare.read_results(jobs), seeds)
    rows = {(r["a"], r["b"]): r for r in summary["comparisons"]}
    assert ("thumbdet_4x", "bicubic_4x") not in rows  # not trained: not reported
    distill = rows[("student", "lr_teacher_init")]["AP"]
    want = paired_difference([18 + 3 * s + NOISE[s] for s in seeds], [17 + 3 * s for s in seeds])
    assert distill["mean"] == pytest.approx(1.0) and distill["low"] == pytest.approx(want["low"])
    assert distill["verdict"] == "above 0"
    assert rows[("lr", "hr")]["AP"]["mean"] == pytest.approx(-8)
    assert rows[("lr", "hr")]["AP"]["std"] == pytest.approx(0, abs=1e-9)  # the seed cancels
    assert rows[("teacher:hr", "hr")]["AP"]["mean"] == pytest.approx(1.5)
    assert summary["models"]["teacher"]["diagnostics"] == {
        "fusion_hr_weight/p3": {"last": 0.8, "mean": pytest.approx(0.7)}}
    assert summary["models"]["student"]["diagnostics"]["grad_share/distill"] == {
        "last": 0.5, "mean": pytest.approx(0.7)}
    assert summary["models"]["hr"]["AP_all"] == [20.0, 23.0, 26.0, 29.0, 32.0]
    table = compare.markdown(summary, {m.name: m.label for m in compare.MODELS})
    assert "| distillation alone (student - LR FCOS, teacher init) | 5 | +1.00 [" in table
    assert "MSAD teacher (HR branch alone)" in table and "p3 0.80" in table
    assert "share of the gradient at the FPN outputs, 0.70 over training, 0.50 at the end" in table
    path = compare.plot(summary, str(tmp_path / "compare.png"), "test")
    assert os.path.getsize(path) > 10_000


def test_plan_needs_what_a_model_starts_from(tmp_path):
    student = [m for m in compare.MODELS if m.name == "student"]
    with pytest.raises(ValueError, match=r"student starts from \['teacher'\]"):
        compare.plan(student, [0], str(tmp_path))


def test_a_failing_report_fails_its_job_only(tmp_path):
    hr = next(m for m in compare.MODELS if m.name == "hr")
    job = compare.Job(0, hr, str(tmp_path / "seed0" / "hr"))
    os.makedirs(job.directory)
    run = compare.Run.__new__(compare.Run)  # a finished training whose log has no metrics
    run.job, run.threads, run.start, run.returncode = job, 1, 0.0, None
    run.steps, run.log_path = [("train", [])], job.directory + ".log"
    run.logs = {"train": run.log_path}
    open(run.log_path, "w").write("no evaluation here\n")
    run.proc = type("Done", (), {"poll": lambda self: 0})()
    assert run.poll() == 1 and not compare.is_finished(job)
    assert "no COCO metrics" in open(run.log_path).read()


def test_job_overrides_set_seed_output_weights_and_scaled_schedule(tmp_path):
    lr_long = next(m for m in compare.MODELS if m.name == "lr_long")
    student = next(m for m in compare.MODELS if m.name == "student")
    job = compare.Job(3, student, str(tmp_path / "seed3" / "student"))
    opts = compare.job_overrides(job, ("A", "1"), iters=100)
    pairs = dict(zip(opts[::2], opts[1::2]))
    assert pairs["A"] == "1" and pairs["SEED"] == "3" and pairs["SOLVER.MAX_ITER"] == "100"
    assert pairs["MODEL.TEACHER.WEIGHTS"] == str(tmp_path / "seed3" / "teacher" / "model_final.pth")
    long_opts = compare.job_overrides(compare.Job(0, lr_long, str(tmp_path)), (), iters=100)
    assert dict(zip(long_opts[::2], long_opts[1::2]))["SOLVER.MAX_ITER"] == "200"
    own = compare.job_overrides(compare.Job(0, lr_long, str(tmp_path)), (), iters=0)
    assert dict(zip(own[::2], own[1::2]))["SOLVER.MAX_ITER"] == "1200"  # the config's 600, x2


def test_a_variant_is_its_base_with_its_own_overrides_sources_and_comparisons(tmp_path):
    models = core_models()
    teacher_v = compare.parse_variant("teacher_lr01=teacher x2 SOLVER.BASE_LR 0.01", models)
    assert (teacher_v.config, teacher_v.evals, teacher_v.iter_scale) == (
        "configs/quickstart/teacher.yaml", {"hr": ("MODEL.MSAD.TEST_BRANCH", "hr"),
                                            "lr": ("MODEL.MSAD.TEST_BRANCH", "lr")}, 2)
    assert teacher_v.opts == ("SOLVER.BASE_LR", "0.01")
    student_v = compare.parse_variant(
        "student_t=student MODEL.TEACHER.WEIGHTS=teacher_lr01 MODEL.MSAD.KD_ALPHA 1", models + [teacher_v])
    assert student_v.sources == {"MODEL.TEACHER.WEIGHTS": "teacher_lr01"}
    rows = compare.variant_comparisons(models + [teacher_v, student_v])
    assert ("teacher_lr01", "teacher", "teacher_lr01 - teacher") in rows
    assert ("teacher_lr01:hr", "hr", "teacher's HR branch alone - HR FCOS [teacher_lr01]") in rows
    assert ("student_t", "lr_teacher_init",
            "distillation alone (student - LR FCOS, teacher init) [student_t]") in rows
    for spec, message in (("x=nothing", "NAME=BASE"), ("hr=teacher", "is taken"),
                          ("t2=teacher MODEL.WEIGHTS=none", "not a model here"),
                          ("t2=teacher SOLVER.BASE_LR", "has no value")):
        with pytest.raises(ValueError, match=message):
            compare.parse_variant(spec, models)
    # The variant trains after the model it takes its teacher from.
    jobs = compare.plan(models + [teacher_v, student_v], [0], str(tmp_path))
    FakeRun.log = []
    BASE.update(teacher_lr01=23.0, student_t=19.5)
    try:
        compare.run_jobs(jobs, fake_start(), parallel=4, report=lambda s: None, poll_every=0)
    finally:
        del BASE["teacher_lr01"], BASE["student_t"]
    assert FakeRun.log.index(("start", 0, "student_t")) > FakeRun.log.index(("end", 0, "teacher_lr01"))


def compare_main(*argv):
    return tool("compare_methods").main([str(a) for a in argv])


def test_the_tool_refuses_bad_arguments_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    for args, message in ((["--seeds", 1], "--seeds must be at least 2"),
                          (["SEED", 3], "set SEED with --first-seed"),
                          (["OUTPUT_DIR", tmp_path], "set OUTPUT_DIR with --output"),
                          (["SOLVER.BASE_LR"], "KEY VALUE pairs"),
                          (["--models", "student"], "student starts from ['teacher']"),
                          (["--variant", "t=nothing"], "NAME=BASE"),
                          (["--compare", "hr", "nothing"], "--compare names ['nothing']")):
        with pytest.raises(SystemExit) as stop:
            compare_main("--output", out, *args)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_report_only_reads_the_finished_models_and_a_changed_protocol_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    seeds = [0, 1, 2]
    jobs = compare.plan(core_models(), seeds, str(out))
    compare.run_jobs(jobs, fake_start(), parallel=2, report=lambda s: None, poll_every=0)
    # What a training run of the defaults records, which a report does not.
    (out / "settings.json").write_text(json.dumps(
        {"protocol": "detail", "iters": 900, "overrides": [], "variants": {}}))
    compare_main("--output", out, "--seeds", 3, "--report-only")
    report = json.loads((out / "compare.json").read_text())
    assert report["seeds"] == seeds and report["settings"]["protocol"] == "detail"
    rows = {(r["a"], r["b"]): r for r in report["comparisons"]}
    assert rows[("student", "lr")]["AP"]["mean"] == pytest.approx(6.0, abs=0.2)
    assert "| student - LR FCOS | 3 |" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="holds models trained with"):
        compare_main("--output", out, "--seeds", 3, "--report-only", "--iters", 300)
    compare_main("--output", out, "--seeds", 3, "--report-only", "--compare", "teacher", "lr")
    assert "| teacher - lr | 3 | +10.00 [" in (out / "compare.md").read_text()
    # The same from an arguments file: shell quoting, several per line, comments.
    args_file = tmp_path / "more.args"
    args_file.write_text('# a comparison\n--compare teacher lr  # teacher - LR\n'
                         '--models hr teacher lr lr_long lr_teacher_init student\n')
    (out / "compare.md").unlink()
    compare_main(f"@{args_file}", "--output", out, "--seeds", 3, "--report-only")
    assert "| teacher - lr | 3 | +10.00 [" in (out / "compare.md").read_text()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["variants"] == {}
    settings["variants"] = {"s2": "s2=student"}  # as a run that trained it writes
    (out / "settings.json").write_text(json.dumps(settings))
    compare_main("--output", out, "--seeds", 3, "--report-only", "--variant", "s2=student")
    with pytest.raises(SystemExit, match="variant s2 was trained"):
        compare_main("--output", out, "--seeds", 3, "--report-only",
                     "--variant", "s2=student MODEL.MSAD.KD_ALPHA 1")


@pytest.mark.slow
def test_the_tool_trains_evaluates_each_branch_and_keeps_what_it_trained(tmp_path, capsys):
    """End to end on the real scripts, 6 iterations: the teacher of two seeds, its HR and LR
    branches evaluated alone; a rerun trains nothing."""
    out = tmp_path / "out"
    compare_main("--output", out, "--seeds", 2, "--iters", 6, "--protocol", "synth",
                 "--models", "teacher", "--", "SOLVER.IMS_PER_BATCH", 2)
    printed = capsys.readouterr().out
    assert "training 2, 2 at a time" in printed and "seed 1 teacher: done" in printed
    result = json.loads((out / "seed1" / "teacher" / compare.RESULT).read_text())
    assert set(result["evals"]) == {"hr", "lr"} and result["threads"] >= 1
    assert set(result["metrics"]) >= {"AP", "AP50", "APs"}
    assert sorted(compare.training_scalars(str(out / "seed1" / "teacher" / "metrics.json"))) == [
        f"fusion_hr_weight/p{i}" for i in range(3, 8)]
    for branch in ("hr", "lr"):
        cfg = (out / "seed1" / "teacher" / f"eval_{branch}" / "config.yaml").read_text()
        assert f"TEST_BRANCH: {branch}" in cfg
    compare_main("--output", out, "--seeds", 2, "--iters", 6, "--protocol", "synth",
                 "--models", "teacher", "--", "SOLVER.IMS_PER_BATCH", 2)
    assert "2 of 2 models already trained" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["defaults.args", "hypotheses.args"])
def test_the_recorded_benchmark_arguments_still_parse_and_build_their_configs(name, tmp_path):
    """benchmarks/*.args are what the README's figures were trained with: each must still run."""
    import shlex

    from msad.config import load_config

    path = os.path.join(compare.REPO, "benchmarks", name)
    compare_main(f"@{path}", "--output", tmp_path / "out", "--seeds", 2, "--report-only")
    with open(path) as f:
        tokens = [t for line in f for t in shlex.split(line, comments=True)]
    models = [m for m in compare.MODELS if m.name in tokens[tokens.index("--models") + 1:]]
    for i, token in enumerate(tokens):
        if token == "--variant":
            models.append(compare.parse_variant(tokens[i + 1], models))
    assert len(models) > len(compare.MODELS)
    for m in models:  # an unknown key or a value of the wrong type raises
        load_config(os.path.join(compare.REPO, m.config), [*compare.PROTOCOLS["detail"], *m.opts])
