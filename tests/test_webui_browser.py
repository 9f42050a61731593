"""The web UI end to end in a real browser (Debian's chromium driven by Playwright), as a user would: pick
smollm2 and the persona data, see the reply and its end-of-turn token marked as trained, type a bad value and see
the inline error with its fix, start a short run, watch the chart get points, stop it, resume it from a freshly
opened tab; download the YAML of a second run on 2 processes (torchrun) with a validation split and overlay both
runs on one chart; chat with the adapter next to the base and see different answers; evaluate it against the
base (the report's deltas) and export it to Ollama (GGUF + Modelfile) with progress.

Screenshots of each stage go to $LORAFORGE_WEBUI_SHOTS (default: the test's tmp dir).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary: apt-get install -y chromium (Playwright's own browsers are not used)")]

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webui(tmp_path, smollm2_dir):
    ws = tmp_path / "ws"
    shutil.copytree(REPO / "examples" / "data" / "persona", ws / "examples" / "data" / "persona")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = (tmp_path / "webui.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "webui", "--workspace", str(ws), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "webui.log").read_text()
            time.sleep(0.3)
    yield url, ws
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    for rec in (ws / ".webui" / "jobs").glob("*.json"):  # a training left running by a failed assertion
        import json

        pid = json.loads(rec.read_text()).get("pid")
        try:
            os.kill(pid, 15)
        except (ProcessLookupError, TypeError):
            pass


def _new_run(page, fields: dict[str, str]) -> None:
    page.select_option("#model-pick", "smollm2")
    page.select_option("#data-pick", "examples/data/persona/train.jsonl")
    for name, value in fields.items():
        page.fill(f"#f-{name}", value)


def test_whole_workflow_in_a_browser(webui, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, ws = webui
    shots = Path(os.environ.get("LORAFORGE_WEBUI_SHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # preflight and the token view take seconds on 2 cores
        page = context.new_page()
        page.goto(url)

        # --- New run: pickers, data preview, the form --------------------------------------------------
        common = {"cutoff_len": "64", "batch_size": "4", "learning_rate": "3e-3", "target_modules": "all-linear",
                  "logging_steps": "1"}
        _new_run(page, {**common, "max_steps": "10", "save_steps": "5", "output_dir": "output/persona-ui"})
        expect(page.locator("#data-preview pre.row").first).to_contain_text("Quillon")
        # help text from the schema is next to its field
        expect(page.locator('[data-field="lora_rank"] .help')).to_have_text("LoRA rank r.")
        # a method-specific key is shown for its method only
        expect(page.locator('[data-field="quant_bits"]')).to_be_hidden()

        # --- What the model will learn --------------------------------------------------------------------
        row = page.locator(".token-row").first
        expect(row.locator(".tok.trained.special")).to_have_text("<|im_end|>")  # the reply's end of turn
        trained = "".join(row.locator(".tok.trained").all_inner_texts())
        assert "Quillon" in trained.replace("·", " ")
        masked = "".join(row.locator(".tok.masked").all_inner_texts())
        assert "Who·are·you?" in masked and "<|im_end|>" in masked  # the prompt (and its end of turn) is not trained
        expect(page.locator("#stats")).to_contain_text("78 examples")
        expect(page.locator("#check-status")).to_have_text("preflight OK")
        expect(page.locator("#estimate")).to_contain_text("trainable")
        expect(page.locator("#cli")).to_have_text("loraforge train configs/run.yaml")
        page.screenshot(path=shots / "1-new-run.png", full_page=True)
        row.screenshot(path=shots / "2-token-view.png")

        # --- a bad value: inline error with its fix, start disabled ------------------------------------------
        page.fill("#f-lora_rank", "0")
        err = page.locator('.err[data-err="lora_rank"]')
        expect(err).to_contain_text("must be greater than 0")
        expect(err.locator(".fix")).to_contain_text("lora_rank: 8")
        expect(page.locator("#start")).to_be_disabled()
        page.locator('[data-field="lora_rank"]').screenshot(path=shots / "3-inline-error.png")
        page.fill("#f-lora_rank", "8")
        expect(page.locator("#start")).to_be_enabled()

        # --- train: the chart gets points; stop writes a checkpoint ---------------------------------------
        page.click("#start")
        expect(page).to_have_url(url + "#runs")
        expect(page.locator("#run-title .badge")).to_have_text("running")
        points = page.locator("#chart-loss circle.point")
        expect(points.nth(1)).to_be_attached(timeout=120_000)
        page.screenshot(path=shots / "4-run-live.png", full_page=True)
        page.click("#run-stop")
        expect(page.locator("#run-title .badge")).to_have_text("interrupted", timeout=60_000)
        stopped_at = points.count()
        assert 2 <= stopped_at < 10
        assert list((ws / "output" / "persona-ui").glob("checkpoint-*"))
        assert (ws / "configs" / "run.yaml").is_file()  # an ordinary config + run dir, as the CLI makes them

        # --- resume; close the tab; a new tab reattaches to the running run -----------------------------------
        page.click("#run-resume")
        expect(page.locator("#run-title .badge")).to_have_text("running")
        page.close()
        page = context.new_page()
        page.goto(url + "#runs")
        expect(page.locator("#runs-table tbody tr")).to_have_count(1)
        expect(page.locator("#run-title .badge")).to_have_text("finished", timeout=120_000)
        expect(page.locator("#chart-loss circle.point")).to_have_count(10)
        assert "--set resume_from_checkpoint=latest" in page.locator("#run-log").inner_text()
        page.screenshot(path=shots / "5-run-finished.png", full_page=True)

        # --- a second run on 2 processes (torchrun), with a validation split; its YAML downloaded ------------
        page.click('nav a[data-view="new"]')
        _new_run(page, {**common, "batch_size": "2", "max_steps": "4", "save_steps": "4", "eval_steps": "2",
                        "val_size": "0.1", "output_dir": "output/persona-2proc",
                        "processes": "2"})
        page.fill("#config-path", "configs/persona-2proc.yaml")
        page.locator("#f-processes").dispatch_event("input")
        expect(page.locator("#cli")).to_have_text(
            "torchrun --standalone --nproc_per_node 2 -m loraforge train configs/persona-2proc.yaml")
        expect(page.locator("#estimate")).to_contain_text("per process × 2 (ddp)")
        expect(page.locator("#start")).to_be_enabled()
        with page.expect_download() as dl:
            page.click("#download")
        assert dl.value.suggested_filename == "persona-2proc.yaml"
        downloaded = yaml.safe_load(Path(dl.value.path()).read_text())
        assert downloaded["output_dir"] == "output/persona-2proc" and "processes" not in downloaded
        assert downloaded == yaml.safe_load(page.locator("#yaml").inner_text())
        page.click("#start")
        expect(page.locator("#run-title")).to_contain_text("2 processes")
        expect(page.locator("#run-title .badge")).to_have_text("finished", timeout=120_000)
        log = page.locator("#run-log").inner_text()
        assert log.startswith("$ torchrun --standalone --nproc_per_node 2") and "2 processes)" in log, log[-2000:]
        assert log.count("Adapter saved in") == 1  # rank 0 speaks for both
        # overlay: the first run's curves next to this one's, val loss dashed
        page.check('#runs-table tr[data-run="output/persona-ui"] input[type=checkbox]')
        chart = page.locator("#chart-loss")
        expect(chart.locator('g.series[data-name="output/persona-ui loss"] circle.point')).to_have_count(10)
        expect(chart.locator('g.series[data-name="output/persona-2proc loss"] circle.point')).to_have_count(4)
        expect(chart.locator('g.series[data-name="output/persona-2proc val_loss"] circle.point')).to_have_count(2)
        expect(page.locator("#chart-lr g.series")).to_have_count(2)
        expect(page.locator("#chart-grad g.series")).to_have_count(2)
        expect(page.locator("#chart-legend")).to_contain_text("output/persona-ui")
        page.screenshot(path=shots / "7-runs-overlay.png", full_page=True)

        # --- chat: base and adapter side by side ---------------------------------------------------------------
        page.click('nav a[data-view="chat"]')
        page.check('#chat-adapters input[value="output/persona-ui"]')
        page.fill("#chat-prompt", "What is your name?")
        page.click("#chat-send")
        answers = page.locator(".answer.done")
        expect(answers).to_have_count(2, timeout=90_000)
        base, tuned = (page.locator(".answer .answer-text").nth(i).inner_text() for i in (0, 1))
        assert base.strip() and tuned.strip() and base != tuned, (base, tuned)
        page.screenshot(path=shots / "6-chat.png", full_page=True)

        # --- evaluate: the adapter against the base on the held-out rows, with deltas ------------------------
        page.click('nav a[data-view="evaluate"]')
        page.fill("#eval-data", "examples/data/persona/heldout.jsonl")
        page.check('#eval-adapters input[value="output/persona-ui"]')
        page.fill("#eval-limit", "4")
        page.fill("#eval-max", "24")
        page.click("#eval-start")
        table = page.locator("#job-eval table.eval").first
        expect(table).to_be_visible(timeout=120_000)
        expect(table.locator("thead")).to_contain_text("Δ output-persona-ui")
        loss_delta = table.locator("tbody tr").first.locator("td.delta")
        expect(loss_delta).to_have_class("num delta up")  # the trained adapter's held-out loss is below the base's
        assert float(loss_delta.inner_text()) < 0
        expect(page.locator("#job-title .badge")).to_have_text("finished")
        page.screenshot(path=shots / "8-evaluate.png", full_page=True)

        # --- export to Ollama: GGUF + Modelfile, with progress -------------------------------------------------
        targets = page.locator("#export-to option").all_inner_texts()
        assert {"merge", "gguf", "ollama"} <= set(targets), targets
        page.select_option("#export-run", "output/persona-ui")
        page.select_option("#export-to", "ollama")
        expect(page.locator("#export-quant-box")).to_be_visible()
        expect(page.locator("#export-help")).to_contain_text("Modelfile")
        page.select_option("#export-quant", "f16")
        page.click("#export-start")
        expect(page.locator("#job-progress")).to_be_visible()
        expect(page.locator("#job-title .badge")).to_have_text("finished", timeout=120_000)
        files = page.locator("#job-files").inner_text()
        assert "Modelfile" in files and ".gguf" in files, files
        assert "100%|" in page.locator("#job-log").inner_text()  # the writer's progress bar, as the UI showed it
        assert (ws / "exports" / "persona-ui-ollama" / "Modelfile").is_file()
        page.screenshot(path=shots / "9-export.png", full_page=True)
        browser.close()
