"""The Dagster UI in a real headless Chromium (Debian's package, driven by Playwright): the loop's asset graph,
its sensors and schedule, its jobs, and the fleet (devices) as a list of partitions."""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tinyml_dagster.dev import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def webserver_and_run(tmp_path_factory):
    import dagster as dg

    tmp = tmp_path_factory.mktemp("ui")
    env = dict(os.environ, DAGSTER_HOME=str(tmp / "dagster_home"), TINYML_DATA_DIR=str(tmp / "data"),
               TINYML_SYNTHETIC_FILES="240")
    (tmp / "dagster_home").mkdir()
    # the loop once, recorded in the webserver's instance: the sensor's replacement run and its deploy
    code = (
        "import json, os, dagster as dg\n"
        "from tinyml_dagster.demo import run_loop\n"
        "from tinyml_dagster.dev import ensure_pool_inputs\n"
        "from tinyml_dagster.defs.models.assets import candidate_models\n"
        "from tinyml_dagster.defs.gateway import GatewayResource\n"
        "from tinyml_dagster.defs.models.resources import ModelRepositoryResource\n"
        "inst = dg.DagsterInstance.get()\n"
        "os.environ['TINYML_DATA_DIR'] = %r\n"
        "ensure_pool_inputs(log=lambda m: None)  # make dev's preparation\n"
        "# the README: materialise candidate_models with its default config\n"
        "assert dg.materialize([candidate_models], instance=inst, resources={'model_repository': "
        "ModelRepositoryResource(gateway=GatewayResource())}).success\n"
        "res = run_loop(%r, source_dir=%r, timeout_s=150, log=lambda m: None, instance=inst)\n"
        "runs = [e['run_id'] for e in res.events if e['event'] == 'replace_champion_job' and e['status'] == 'done']\n"
        "inst.add_dynamic_partitions('devices', ['esp32-1'])\n"
        "print('RUN', runs[0])\n" % (str(tmp / "src"), str(tmp / "data"), str(tmp / "src")))
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300, capture_output=True, text=True)
    run_id = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("RUN ")][0]
    port = free_port()
    log = open(tmp / "webserver.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "dagster_webserver", "-w", str(ROOT / "workspace.yaml"),
                          "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = "http://127.0.0.1:%d" % port
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/server_info", timeout=2)
            break
        except OSError:
            assert p.poll() is None, (tmp / "webserver.log").read_text()[-2000:]
            assert time.time() < deadline, "webserver did not come up"
            time.sleep(0.3)
    yield url, run_id
    p.terminate()
    p.wait(timeout=30)
    del dg


@pytest.fixture(scope="module")
def page(webserver_and_run):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page()
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def webserver(webserver_and_run):
    return webserver_and_run[0]


def text_of(page, url: str, must_show: str) -> str:
    page.goto(url)
    page.get_by_text(must_show, exact=True).first.wait_for(timeout=60_000)
    return page.inner_text("body")


def test_loop_asset_graph(page, webserver):
    body = text_of(page, webserver + "/locations/tinyml_dagster/asset-groups/loop", "pool_decisions")
    for asset in ("pool_decisions", "device_champions", "champion_package", "deployed_champion",
                  "retrained_candidate_models", "candidate_models", "fleet"):
        assert asset in body
    # champion_package carries the two Release checks
    page.get_by_text(re.compile(r"\d / 2 Passed")).first.wait_for(timeout=60_000)


def test_sensors_and_schedule(page, webserver):
    body = text_of(page, webserver + "/automation", "false_positive_sensor")
    assert "device_uploads_sensor" in body and "false_positive_sensor" in body and "fleet_sensor" in body
    assert "retrain_schedule" in body


def test_jobs(page, webserver):
    body = text_of(page, webserver + "/jobs", "replace_champion_job")
    for job in ("pool_decisions_job", "replace_champion_job", "retrain_job"):
        assert job in body


def test_fleet_is_a_list_of_partitions(page, webserver):
    body = text_of(page, webserver + "/assets/champion_package?view=partitions", "esp32-1")
    assert "esp32-demo" in body and "esp32-1" in body


def test_the_replacement_run_and_its_deploy(page, webserver_and_run):
    url, run_id = webserver_and_run
    body = text_of(page, url + "/runs", "replace_champion_job")
    assert "pool_decisions_job" in body
    body = text_of(page, url + "/runs/" + run_id, "deployed_champion")
    assert "champion_package" in body and "Success" in body
    # the run's log shows the deploy through the link service
    page.get_by_text("waiting for the link service", exact=False).first.wait_for(timeout=60_000)


def test_the_fleet_view(page, webserver):
    """The fleet table: the device, the champion the replacement deployed, its predecessor the device trained."""
    body = text_of(page, webserver + "/assets/fleet", "fleet")
    page.get_by_text("esp32-demo", exact=False).first.wait_for(timeout=60_000)
    body = page.inner_text("body")
    assert "esp32-demo" in body and "deployed" in body
    assert "replaced" in body and "false-positive episode" in body
    # the device's partition of deployed_champion carries the same row as metadata
    body = text_of(page, webserver + "/assets/deployed_champion?view=events&partition=esp32-demo", "esp32-demo")
    page.get_by_text("last_deploy_link_s", exact=False).first.wait_for(timeout=60_000)
    assert "previous_champion" in page.inner_text("body")


def test_assets_plot_their_own_runs_data(page, webserver):
    """candidate_models carries a plot drawn from its run's data, a PNG in Markdown that the UI opens."""
    text_of(page, webserver + "/assets/candidate_models", "candidate_models")
    page.get_by_text("anomaly_rates", exact=False).first.wait_for(timeout=60_000)
