"""The capacity planner: recommendations a user can apply, and the replay that justifies them."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from emailqueue_operator import planner
from emailqueue_operator.planner import PlanError, PlanInput, recommend
from emailqueue_operator.spec import MAX_REPLICAS_LIMIT, parse_spec

INCIDENT = PlanInput(peak_rate=400, rate_per_replica=10, startup_seconds=30, base_rate=20, drain_seconds=60)


def test_incident_plan_covers_base_and_peak() -> None:
    plan = recommend(INCIDENT)
    assert plan.min_replicas == 3  # ceil(1.2 * 20 / 10)
    # The peak needs 40 workers; the backlog built during detection + start-up needs more.
    assert plan.max_replicas > 40
    assert plan.spec["target"]["drainSeconds"] == 60
    assert plan.backlog_per_replica == 600
    assert not plan.warnings


def test_manifest_is_an_emailqueue_the_operator_accepts() -> None:
    document = yaml.safe_load(planner.manifest(recommend(INCIDENT)))
    assert document["apiVersion"] == "emailqueue.dev/v1alpha1" and document["kind"] == "EmailQueue"
    parsed = parse_spec(document["spec"])
    assert (parsed.replicas.min, parsed.replicas.max) == (3, recommend(INCIDENT).max_replicas)
    assert parsed.behavior.scale_up.policies[0].value == parsed.replicas.max


def test_planned_settings_beat_keda_default_on_the_replayed_surge() -> None:
    results = planner.evaluate(recommend(INCIDENT))
    ours, keda, ideal = results["ours (planned)"], results["keda-queuelength"], results["ideal-reactive"]
    assert ours.p99_seconds <= 0.6 * keda.p99_seconds
    assert ours.replica_seconds <= 0.8 * keda.replica_seconds
    assert ours.p99_seconds <= 1.3 * ideal.p99_seconds


def test_provider_cap_lowers_max_and_says_why() -> None:
    plan = recommend(PlanInput(peak_rate=400, rate_per_replica=10, startup_seconds=30, base_rate=20,
                               drain_seconds=60, max_send_rate=250))
    assert plan.max_replicas == 25
    assert any("250" in w for w in plan.warnings)
    assert plan.spec["target"]["maxSendRate"] == 250


def test_age_slo_shorter_than_startup_is_flagged_as_unattainable() -> None:
    plan = recommend(PlanInput(peak_rate=400, rate_per_replica=10, startup_seconds=30, base_rate=20,
                               max_age_seconds=20))
    assert plan.spec["target"]["maxMessageAgeSeconds"] == 20 and "drainSeconds" not in plan.spec["target"]
    assert any("spec.schedule" in w for w in plan.warnings)


def test_age_slo_with_room_gives_the_remaining_budget_as_drain() -> None:
    plan = recommend(PlanInput(peak_rate=100, rate_per_replica=10, startup_seconds=30, base_rate=10,
                               max_age_seconds=300))
    assert plan.drain_seconds == 300 - 30 - plan.poll_seconds
    assert not plan.warnings


def test_bad_inputs_list_every_problem() -> None:
    with pytest.raises(PlanError) as err:
        recommend(PlanInput(peak_rate=10, rate_per_replica=0, startup_seconds=30, base_rate=20))
    text = str(err.value)
    assert "rate per replica" in text and "base rate" in text and "SLO" in text


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = planner.run_cli_plan(["--peak-rate", "400", "--base-rate", "20", "--rate-per-replica", "10",
                                 "--startup-seconds", "30", "--drain-seconds", "60", "--json", "--no-simulate"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommendation"]["min"] == 3 and out["simulation"] == {}


def test_cli_rejects_impossible_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    code = planner.run_cli_plan(["--peak-rate", "10", "--base-rate", "20", "--rate-per-replica", "10",
                                 "--startup-seconds", "30", "--drain-seconds", "60"])
    assert code == 2 and "base rate" in capsys.readouterr().err


@pytest.mark.parametrize("source, ref", [("prometheus", "prometheusSecretRef"), ("management", "managementSecretRef"),
                                         ("amqp", None)])
def test_plan_names_the_metrics_source_and_replays_what_it_sees(source, ref):
    plan = recommend(replace(INCIDENT, metrics_source=source))
    broker = plan.spec["broker"]
    assert parse_spec(plan.spec).broker.source == source
    assert (ref in broker) if ref else not ({"prometheusSecretRef", "managementSecretRef"} & set(broker))
    out = subprocess.run([sys.executable, "-m", "emailqueue_operator", "plan", "--peak-rate", "400",
                          "--base-rate", "20", "--rate-per-replica", "10", "--startup-seconds", "30",
                          "--drain-seconds", "60",
                          "--metrics-source", source, "--no-simulate"], capture_output=True, text=True, check=True)
    assert f"# metrics source {source}:" in out.stdout


# --------------------------------------------------------------------------- edge inputs (issue 12)
CRD_PATH = Path(__file__).resolve().parents[2] / "deploy" / "crds" / "emailqueue.dev_emailqueues.yaml"
BASE_ARGS = ["--base-rate", "20", "--rate-per-replica", "10", "--startup-seconds", "30"]


def plan_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = planner.run_cli_plan(args)
    return code, out.getvalue(), err.getvalue()


def warnings_of(stdout: str) -> list[str]:
    return [line[len("# WARNING: "):] for line in stdout.splitlines() if line.startswith("# WARNING: ")]


def test_planner_bounds_are_the_crds() -> None:
    target = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]["properties"]
    fields = target["target"]["properties"]
    assert fields["drainSeconds"]["minimum"] == fields["maxMessageAgeSeconds"]["minimum"] == planner.SLO_SECONDS_MINIMUM
    assert fields["startupSeconds"]["maximum"] == planner.STARTUP_SECONDS_LIMIT
    assert target["replicas"]["properties"]["max"]["maximum"] == MAX_REPLICAS_LIMIT


@pytest.mark.parametrize("args, says", [
    # Below the CRD's target.drainSeconds minimum: was a SpecError traceback (a rejected manifest with --no-simulate).
    (["--peak-rate", "400", *BASE_ARGS, "--drain-seconds", "0.5"], "drain seconds must be between 1 and"),
    (["--peak-rate", "400", *BASE_ARGS, "--max-age-seconds", "0.5"], "max age seconds must be between 1 and"),
    # Above the CRD's target.startupSeconds maximum: was a SpecError traceback.
    (["--peak-rate", "400", "--base-rate", "20", "--rate-per-replica", "10", "--startup-seconds", "5000",
      "--drain-seconds", "60"], "start-up seconds must be between 0 and 3600"),
    # Not a number: was an OverflowError traceback (inf) or a nonsense plan (nan).
    (["--peak-rate", "inf", *BASE_ARGS, "--drain-seconds", "60"], "peak rate must be a finite number"),
    (["--peak-rate", "nan", *BASE_ARGS, "--drain-seconds", "60"], "peak rate must be a finite number"),
    (["--peak-rate", "400", *BASE_ARGS, "--drain-seconds", "60", "--surge-seconds", "inf"],
     "surge seconds must be a finite number"),
    # 1e-9 emails/s per replica: was 24e9 replicas in the manifest.
    (["--peak-rate", "400", "--base-rate", "20", "--rate-per-replica", "1e-9", "--startup-seconds", "30",
      "--drain-seconds", "60"], "rate per replica must be between 1e-06 and"),
    # The base load alone needs more replicas than the CRD allows.
    (["--peak-rate", "400", "--base-rate", "20", "--rate-per-replica", "1e-3", "--startup-seconds", "30",
      "--drain-seconds", "60"], "the base rate 20/s needs 20,000 replicas"),
    # A provider cap under the base load: the queue never drains.
    (["--peak-rate", "400", *BASE_ARGS, "--drain-seconds", "60", "--max-send-rate", "10"],
     "max send rate 10/s is below the base rate 20/s"),
    (["--peak-rate", "400", *BASE_ARGS, "--drain-seconds", "60", "--deployment", "Email_Worker"],
     "deployment must be a Kubernetes name"),
])
def test_impossible_inputs_are_one_error_line_and_exit_2(args: list[str], says: str) -> None:
    for extra in ([], ["--no-simulate"], ["--json"]):
        code, out, err = plan_cli(args + extra)
        assert code == 2 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize("peak", ["1e6", "1e12", "1e15"])
@pytest.mark.timeout(60)  # a hang guard, not a speed target
def test_a_peak_beyond_the_crds_fleet_caps_max_skips_the_replay_and_says_so(peak: str) -> None:
    # Was `max: 154999` for 1e6 (the CRD allows 10,000) and a replay hanging for minutes for 1e12.
    code, out, _ = plan_cli(["--peak-rate", peak, *BASE_ARGS, "--drain-seconds", "60"])
    assert code == 0
    document = yaml.safe_load(out)
    assert document["spec"]["replicas"]["max"] == MAX_REPLICAS_LIMIT
    parse_spec(document["spec"])
    capped, skipped = warnings_of(out)
    assert "max capped at the CRD's 10,000" in capped and "no SLO holds" in capped
    assert skipped.startswith("replay skipped")


def test_a_drain_slo_the_crds_fleet_cannot_hold_says_what_it_does_hold() -> None:
    # 99,000/s at 10/s fits 10,000 replicas, but draining the surge backlog within 60 s would need 15,344.
    plan = recommend(PlanInput(peak_rate=99_000, rate_per_replica=10, startup_seconds=30, base_rate=20,
                               drain_seconds=60))
    assert plan.max_replicas == MAX_REPLICAS_LIMIT and plan.wanted_max_replicas > MAX_REPLICAS_LIMIT
    assert any("15,344 replicas" in w and "to clear once new pods send" in w for w in plan.warnings)


def test_a_drain_slo_shorter_than_startup_and_poll_is_flagged() -> None:
    # Was silent: the first messages of an unforeseen surge wait for new pods whatever max is.
    plan = recommend(PlanInput(peak_rate=400, rate_per_replica=10, startup_seconds=30, base_rate=20, drain_seconds=10))
    (warning,) = plan.warnings
    assert "10s drain SLO cannot hold" in warning and "about 33s" in warning and "= 40" in warning
    # A min that already sends the peak needs no new pods: nothing to flag.
    covered = recommend(PlanInput(peak_rate=30, rate_per_replica=10, startup_seconds=30, base_rate=30,
                                  drain_seconds=10))
    assert covered.min_replicas * 10 >= 30 and not covered.warnings


def test_a_replay_that_misses_the_slo_says_which_wait_the_plan_holds() -> None:
    # Was silent: max wait 88-93 s against a 60 s drain SLO.
    code, out, _ = plan_cli(["--peak-rate", "2000", "--base-rate", "20", "--rate-per-replica", "50",
                             "--startup-seconds", "90", "--drain-seconds", "60"])
    assert code == 0
    replayed = [w for w in warnings_of(out) if w.startswith("replayed surge")]
    assert len(replayed) == 1 and "over the 60s drain SLO" in replayed[0]
    held = int(replayed[0].split("holds a max wait of about ")[1].split("s")[0])
    ours = out.split("# ours (planned)")[1].split()
    assert held == int(ours[1]) > 60  # the table's max wait column


def test_a_replay_that_meets_the_slo_adds_no_warning() -> None:
    result = planner.replay(recommend(INCIDENT))
    assert result.results["ours (planned)"].max_seconds <= 60 and result.warnings == ()


def test_a_long_surge_is_replayed_in_bounded_time_and_says_so() -> None:
    # Bounded in work (the replayed duration is capped), not timed: a timed unit test is a
    # machine-load test (it measured 5.07 s against a 5 s bound on a busy 2-core machine).
    result = planner.replay(recommend(replace(INCIDENT, surge_seconds=1e8)))
    assert result.scenario is not None
    assert result.scenario.duration_seconds <= planner.REPLAY_MAX_SURGE_SECONDS + 1800
    assert any("of the 1e+08s surge" in w for w in result.warnings)


def test_replay_work_is_bounded_for_the_largest_fleet() -> None:
    plan = recommend(PlanInput(peak_rate=60_000, rate_per_replica=10, startup_seconds=0, base_rate=20,
                               drain_seconds=1000, surge_seconds=86_400))
    steps = planner.replayed_surge_seconds(plan) + planner.SURGE_START_SECONDS + planner.AFTER_SURGE_SECONDS
    assert plan.max_replicas > 6000 and steps * plan.max_replicas <= planner.REPLAY_POD_STEPS_BUDGET


def test_a_provider_cap_under_the_peak_is_flagged_even_when_max_stays() -> None:
    # One fast replica covers the peak, so max is not lowered; the cap still makes every surge queue up
    # (found by the property test: a plan without warnings that missed its SLO on the replay).
    plan = recommend(PlanInput(peak_rate=35, rate_per_replica=1000, startup_seconds=0, base_rate=5,
                               drain_seconds=2, max_send_rate=28))
    assert plan.max_replicas == 1
    (warning,) = plan.warnings
    assert "the provider cap 28/s is below the peak 35/s" in warning and "adds 0.25s of wait" in warning


@pytest.mark.parametrize("source, lag", [("prometheus", 0), ("management", 5), ("amqp", 1)])
def test_the_metrics_sources_lag_counts_in_the_surge_backlog_and_the_slo_check(source: str, lag: float) -> None:
    # Management counts are as of the broker's 5 s stats tick; AMQP estimates arrivals over a second poll.
    # Without the lag, a 4 s drain SLO passed unflagged and the replay waited 5 s (found by the property test).
    inputs = PlanInput(peak_rate=5, rate_per_replica=0.5, startup_seconds=0, base_rate=0, drain_seconds=4,
                       metrics_source=source)
    plan = recommend(inputs)
    assert planner.observation_lag_seconds(source, plan.poll_seconds) == lag
    flagged = any("cannot hold through an unforeseen surge" in w for w in plan.warnings)
    assert flagged == (0 + plan.poll_seconds + lag > 4)
    ours = planner.replay(plan).results["ours (planned)"]
    assert flagged or ours.max_seconds <= 4
