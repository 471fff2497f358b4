"""The Prefect UI in a real browser: headless Chromium (Debian's), driven by playwright-core, finds
a failed training run, clicks Retry, and the run completes from its checkpoint; the lineage page,
after the failure and after the retry, shows the checkpoint table, the loss curve and where Retry resumes.

Screenshots are saved under test-artifacts/browser/ (git-ignored). The browser and driver are
installed by scripts/setup-browser.sh, which this module runs itself (idempotent).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ckpt import CheckpointStore

from .test_deployments import api, artifacts, flow_run, run_deployment, serving, wait_final

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / ".venv" / "browser" / "node_modules"
SHOTS = ROOT / "test-artifacts" / "browser"

# Flags as this machine needs them: without the background-networking ones Chromium keeps dialing
# out through a closed network; --no-sandbox because tests may run as root.
DRIVER = r"""
const { chromium } = require('playwright-core');
const [mode, ui, runId, runName, out, url, click] = process.argv.slice(2);
const args = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-dev-shm-usage',
              '--disable-background-networking', '--disable-component-update', '--disable-sync'];
(async () => {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.setDefaultTimeout(60000);
  // The UI learns its API address from /ui-settings, which defaults to port 4200 unless the server
  // was started with PREFECT_UI_API_URL (or PREFECT_SERVER_API_PORT) set: point it at this server.
  await page.route('**/ui-settings', async (route) => {
    const response = await route.fetch();
    route.fulfill({ response, json: { ...(await response.json()), api_url: `${ui}/api` } });
  });
  try {
    if (mode === 'retry') {
      await page.goto(`${ui}/runs`);
      await page.getByText(runName, { exact: true }).first().click();
      await page.waitForURL(`**/flow-run/${runId}**`);
      await page.getByText('Failed').first().waitFor();
      await page.screenshot({ path: `${out}/1-failed-run.png` });
      await page.getByRole('button', { name: 'Retry', exact: true }).first().click();
      await page.getByText('This will retry flow run').waitFor();
      await page.screenshot({ path: `${out}/2-retry-dialog.png` });
      const dialog = page.locator('.p-modal').filter({ hasText: 'This will retry flow run' });
      await dialog.getByRole('button', { name: 'Retry', exact: true }).click();
      await page.getByText('This will retry flow run').waitFor({ state: 'hidden' });
      await page.screenshot({ path: `${out}/3-retried.png` });
    } else if (mode.startsWith('lineage')) {
      // A lineage page: wait for the texts (runName: '|'-separated), then report what a person sees.
      await page.goto(url);
      for (const text of runName.split('|')) await page.getByText(text).first().waitFor();
      await page.waitForTimeout(1500);  // images decode after the text shows
      const seen = await page.evaluate(() => ({
        images: [...document.querySelectorAll('img')].filter((i) => i.src.startsWith('data:image/png'))
          .map((i) => ({ width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width })),
        tables: [...document.querySelectorAll('table')].map((t) => ({
          header: [...t.querySelectorAll('th')].map((th) => th.innerText.trim()),
          rows: [...t.querySelectorAll('tbody tr')].map((tr) => [...tr.querySelectorAll('td')].map((td) => td.innerText.trim())),
        })),
        text: document.body.innerText,
      }));
      await page.screenshot({ path: `${out}/${mode}.png`, fullPage: true });
      console.log(JSON.stringify(seen));
    } else {
      await page.goto(url);
      if (click) await page.getByText(click, { exact: true }).first().click();
      await page.getByText(runName).first().waitFor();
      await page.waitForTimeout(1500);  // images decode after the text shows
      await page.screenshot({ path: `${out}/${mode}.png`, fullPage: true });
    }
  } catch (err) {
    await page.screenshot({ path: `${out}/error-${mode}.png`, fullPage: true }).catch(() => {});
    throw err;
  } finally {
    await browser.close();
  }
})().catch((err) => { console.error(err); process.exit(1); });
"""


@pytest.fixture(scope="session")
def browser(tmp_path_factory) -> Path:
    """Installs Chromium and playwright-core if missing; returns the driver script."""
    setup = subprocess.run(["bash", str(ROOT / "scripts" / "setup-browser.sh")], capture_output=True, text=True,
                           timeout=900)
    assert setup.returncode == 0, f"scripts/setup-browser.sh failed:\n{setup.stdout}\n{setup.stderr}"
    assert shutil.which("node"), "node is needed for playwright-core"
    script = tmp_path_factory.mktemp("browser") / "drive.js"
    script.write_text(DRIVER)
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    return script


def drive(script: Path, mode: str, ui: str, run_id: str, run_name: str, url: str = "", click: str = "") -> str:
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
    out = subprocess.run(["node", str(script), mode, ui, run_id, run_name, str(SHOTS), url, click], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"browser ({mode}) failed, screenshots in {SHOTS}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def look_at_lineage(script: Path, mode: str, ui: str, url: str, texts: list[str]) -> dict:
    """Open a lineage page in the browser; what it shows: its PNG images, tables and text."""
    return json.loads(drive(script, mode, ui, "", "|".join(texts), url).strip().splitlines()[-1])


def newest_version(url: str, key: str) -> str:
    """The id of the newest version of a keyed artifact: the page the key's timeline links first."""
    found = api(url, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC",
                                                    "limit": 1})
    return found[0]["id"]


def _checkpoint_table(seen: dict) -> dict:
    tables = [t for t in seen["tables"] if t["header"][:3] == ["checkpoint", "epoch", "step"]]
    assert len(tables) == 1, seen["tables"]
    return tables[0]


def _shows_a_curve(seen: dict) -> None:
    assert seen["images"], "no curve image on the lineage page"
    assert all(i["width"] >= 300 and i["height"] >= 150 and i["shown"] > 0 for i in seen["images"]), seen["images"]


def test_clicking_retry_in_the_prefect_ui_completes_a_failed_run_from_its_checkpoint(
        browser, cluster_env, prefect_server, workdir):
    ui = prefect_server.removesuffix("/api")
    store = str(workdir / "ckpts")
    config = {"store": store, "lineage": "clicked", "epochs": 2, "epochs_per_block": 1, "workers": 2,
              "recipe": "tasks.recipes:digits", "checkpoint_every_steps": 10, "max_failures": 0,
              "block_retries": 0, "fail": {"action": "raise", "epoch": 1, "batch": 15}}
    with serving(cluster_env, workdir, "--store", store) as (proc, log):
        run_id = run_deployment("train/on-demand", {"config": config}, cluster_env, workdir)
        failed = wait_final(prefect_server, run_id, 300, proc, log)
        assert failed["state"]["type"] == "FAILED", failed["state"]
        latest = CheckpointStore(store).list("clicked")[-1]
        assert latest.epoch == 1 and not latest.position.epoch_complete

        # The lineage page after the failure: where Retry resumes, the checkpoints, the loss curve.
        lineage_url = f"{ui}/artifacts/artifact/{newest_version(prefect_server, 'clicked-lineage')}"
        seen = look_at_lineage(browser, "lineage-1-failed", ui, lineage_url, ["Retry resumes there"])
        assert f"latest committed checkpoint is {latest.id}" in seen["text"].replace("`", "")
        assert [row[0] for row in _checkpoint_table(seen)["rows"]][0] == latest.id  # newest first
        _shows_a_curve(seen)

        drive(browser, "retry", ui, run_id, failed["name"])
        assert flow_run(prefect_server, run_id)["state"]["type"] != "FAILED"  # the click took
        done = wait_final(prefect_server, run_id, 300, proc, log)
        assert done["state"]["type"] == "COMPLETED", done["state"]

    after = CheckpointStore(store).list("clicked")
    resumed = [m for m in after if m.id > latest.id]
    assert resumed and resumed[0].parent == latest.id
    assert [m.epoch for m in after if m.position.epoch_complete] == [0, 1]

    # The lineage page after the retry: every checkpoint, naming the run that committed it.
    lineage_url = f"{ui}/artifacts/artifact/{newest_version(prefect_server, 'clicked-lineage')}"
    seen = look_at_lineage(browser, "lineage-2-retried", ui, lineage_url, ["completed", after[-1].id])
    rows = _checkpoint_table(seen)["rows"]
    assert [row[0] for row in rows] == [m.id for m in reversed(after)]
    assert all(failed["name"] in row[-2] for row in rows), rows
    _shows_a_curve(seen)
    # One progress bar for the run, moved on by the retry to the end (not a stale one left at 50%).
    progress = [a for a in artifacts(prefect_server, run_id) if a["type"] == "progress"]
    assert len(progress) == 1 and progress[0]["data"] == 100.0, progress

    # What a person sees afterwards: the run's artifacts, and the summary with its curves.
    drive(browser, "4-artifacts", ui, run_id, "clicked-summary", f"{ui}/runs/flow-run/{run_id}", "Artifacts")
    summary = next(a for a in artifacts(prefect_server, run_id) if a["key"] == "clicked-summary")
    drive(browser, "5-summary", ui, run_id, "Loss by epoch", f"{ui}/artifacts/artifact/{summary['id']}")
    assert {"1-failed-run.png", "2-retry-dialog.png", "3-retried.png", "4-artifacts.png", "5-summary.png",
            "lineage-1-failed.png", "lineage-2-retried.png"} <= {p.name for p in SHOTS.iterdir()}
    assert api(prefect_server, "GET", f"/flow_runs/{run_id}")["run_count"] == 2
