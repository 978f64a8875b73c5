"""The capacity planner: recommendations a user can apply, and the replay that justifies them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from emailqueue_operator import planner
from emailqueue_operator.planner import PlanError, PlanInput, recommend
from emailqueue_operator.spec import parse_spec

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
    from dataclasses import replace


    plan = recommend(replace(INCIDENT, metrics_source=source))
    broker = plan.spec["broker"]
    assert parse_spec(plan.spec).broker.source == source
    assert (ref in broker) if ref else not ({"prometheusSecretRef", "managementSecretRef"} & set(broker))
    out = subprocess.run([sys.executable, "-m", "emailqueue_operator", "plan", "--peak-rate", "400", "--base-rate", "20",
                          "--rate-per-replica", "10", "--startup-seconds", "30", "--drain-seconds", "60",
                          "--metrics-source", source, "--no-simulate"], capture_output=True, text=True, check=True)
    assert f"# metrics source {source}:" in out.stdout
