"""The dashboard at / in headless Chromium (the OS package, driven by Playwright's Python
API; nothing is downloaded), against the app on uvicorn in a thread of this process:
submit an edit (naming its subject), wait for it to apply, ask the question, see the new
answer and the memory that gave it, retract it. A screenshot is kept in
``test-artifacts/`` (``$WISE_EDIT_ARTIFACTS``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import EDITS, tiny_model, tiny_tokenizer
from serving import TOKEN, Threaded, library_answers

ARTIFACTS = Path(
    os.environ.get("WISE_EDIT_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium on this machine (.ci/run installs the OS package)")


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    served = Threaded(str(folder), tmp_path / "state")
    yield served
    served.stop()


def test_dashboard_edits_asks_and_retracts(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    prompt, target = EDITS[0]
    before = server.complete(prompt, max_tokens=16)["text"]
    after = library_answers([EDITS[0]], [prompt], max_tokens=16)[prompt]
    assert after != before
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#edit-prompt", prompt)
        page.fill("#edit-target", target)
        page.fill("#edit-subject", "Lahti Town Hall")
        page.fill("#token", TOKEN)
        page.click("#edit-submit")
        row = page.locator("#edits tr[data-id='1']")
        row.locator(".status.applied").wait_for(timeout=60_000)
        page.fill("#ask-prompt", prompt)
        page.click("#ask-submit")
        page.wait_for_function("document.getElementById('answer-after').textContent !== ''")
        assert page.text_content("#answer-after") == after
        assert page.text_content("#answer-before") == before
        assert page.text_content("#answer-memory") == "memory 0"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        row.locator("button.retract").click()
        row.locator(".status.retracted").wait_for(timeout=60_000)
        browser.close()
    stored = server.client.get("/v1/edits/1").json()
    assert stored["status"] == "retracted" and stored["subject"] == "Lahti Town Hall"
