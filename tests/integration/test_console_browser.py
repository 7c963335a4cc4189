"""The console end to end in headless Chromium (Debian's `chromium`, driven by Playwright's
Python API): upload an adapter, compare playground columns with the API's greedy output, train
a small job on the tiny model while its loss chart grows, delete the adapter, and show markup
from the model as text. With LORAPLEX_SCREENSHOTS=<dir> the pages are also saved as PNGs.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL_NAME, adapter_name, serve_flags
from tests.integration.fine_tuning_data import jsonl, ordering_task
from tests.integration.live_server import ADMIN_KEY, API_KEY, LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need the `playwright` Python package"
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; see .ci/run)"
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = os.environ.get("LORAPLEX_SCREENSHOTS")
UPLOADED = "console-upload"
TIMEOUT_MS = 30_000
NUM_BULK = 60  # with the 4 others, more than the page's 50


@pytest.fixture(scope="module")
def console_server(
    model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server of its own (this module uploads, trains and deletes): 4 preloaded adapters,
    and NUM_BULK copies of one, so that the adapter list has more than a page."""
    preload = tmp_path_factory.mktemp("console-preload")
    for i in range(4):
        shutil.copytree(adapter_dirs[adapter_name(i)], preload / adapter_name(i))
    for i in range(NUM_BULK):
        shutil.copytree(adapter_dirs[adapter_name(0)], preload / f"bulk-{i:03d}")
    args = serve_flags(max_lora_rank=8, max_model_len=128, served_model_name=MODEL_NAME)
    args += ["--preload-adapters", str(preload)]
    live = LiveServer(model_dir, tmp_path_factory.mktemp("console") / "data", args).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    # Playwright gives every launch a fresh temporary profile (--user-data-dir).
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_console(browser, server: LiveServer, key: str, page_name: str, width: int = 1280):  # type: ignore[no-untyped-def]
    """A new page on the console with `key` entered, showing `page_name`."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_console(msg) -> None:  # type: ignore[no-untyped-def]
        # What the CSP blocks is logged, not raised.
        if msg.type == "error" and "Content Security Policy" in msg.text:
            errors.append(msg.text)

    page.on("console", on_console)
    page.on("dialog", lambda dialog: dialog.accept())
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(f"{server.url}/console/#/{page_name}")
    page.fill("#key-input", key)
    page.click("#key-form button")
    sync_api.expect(page.locator("#role")).to_have_text(
        "admin" if key == ADMIN_KEY else "read-only"
    )
    return page


def screenshot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def test_upload_an_adapter_through_the_page_and_see_it_listed(
    browser, console_server: LiveServer, adapter_dirs: dict[str, Path]
):
    page = open_console(browser, console_server, ADMIN_KEY, "adapters")
    source = adapter_dirs[adapter_name(5)]
    page.fill("#upload-name", UPLOADED)
    page.set_input_files(
        "#upload-files",
        [str(source / "adapter_config.json"), str(source / "adapter_model.safetensors")],
    )
    page.click("#upload-submit")
    sync_api.expect(page.locator("#upload-message")).to_contain_text(f"Registered {UPLOADED}")
    row = page.locator(f'#adapter-rows tr[data-name="{UPLOADED}"]')
    sync_api.expect(row).to_be_visible()
    page.fill("#adapter-search", "upload")
    sync_api.expect(page.locator("#adapter-rows tr")).to_have_count(1)
    row.click()
    sync_api.expect(page.locator("#details-name")).to_have_text(UPLOADED)
    screenshot(page, "adapters")
    assert page.errors == []  # type: ignore[attr-defined]


def test_an_archive_dropped_on_the_page_is_registered(
    browser, console_server: LiveServer, adapter_dirs: dict[str, Path]
):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(adapter_dirs[adapter_name(6)] / name, arcname=name)
    page = open_console(browser, console_server, ADMIN_KEY, "adapters")
    page.fill("#upload-name", "dropped-archive")
    # What a drag from the file manager delivers: a DataTransfer holding the file.
    transfer = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'adapter.tar.gz'));
            return transfer;
        }""",
        base64.b64encode(buffer.getvalue()).decode(),
    )
    page.dispatch_event("#upload-drop", "drop", {"dataTransfer": transfer})
    sync_api.expect(page.locator("#upload-picked")).to_contain_text("adapter.tar.gz")
    page.click("#upload-submit")
    sync_api.expect(page.locator("#upload-message")).to_contain_text("Registered dropped-archive")
    sync_api.expect(page.locator('#adapter-rows tr[data-name="dropped-archive"]')).to_be_visible()
    with console_server.client(admin=True) as admin:
        assert admin.get("/v1/adapters/dropped-archive").json()["source"] == "upload"
        assert admin.delete("/v1/adapters/dropped-archive").status_code == 200


def test_the_adapter_list_pages_and_searches_on_the_server(browser, console_server: LiveServer):
    page = open_console(browser, console_server, API_KEY, "adapters")
    with console_server.client() as client:
        total = len(client.get("/v1/adapters").json()["data"])
    assert total > 50
    rows = page.locator("#adapter-rows tr")
    sync_api.expect(rows).to_have_count(50)
    sync_api.expect(page.locator("#adapter-count")).to_have_text(f"50 of {total} adapters")
    page.click("#adapter-more")
    sync_api.expect(rows).to_have_count(total)
    sync_api.expect(page.locator("#adapter-more")).to_be_hidden()
    page.fill("#adapter-search", "bulk-05")
    sync_api.expect(rows).to_have_count(10)
    assert rows.first.get_attribute("data-name") == "bulk-050"


def test_an_invalid_upload_shows_the_servers_message(
    browser, console_server: LiveServer, spare_adapters: Path
):
    page = open_console(browser, console_server, ADMIN_KEY, "adapters")
    source = spare_adapters / "too-big-rank"  # rank 16 over --max-lora-rank 8
    files = [source / "adapter_config.json", source / "adapter_model.safetensors"]
    page.fill("#upload-name", "too-big")
    page.set_input_files("#upload-files", [str(f) for f in files])
    page.click("#upload-submit")
    message = page.locator("#upload-message.error")
    sync_api.expect(message).to_be_visible()
    with console_server.client(admin=True) as admin:
        response = admin.post(
            "/v1/adapters",
            data={"name": "too-big"},
            files=[("files", (f.name, f.read_bytes())) for f in files],
        )
        assert response.status_code == 400
        assert admin.get("/v1/adapters/too-big").status_code == 404
    sync_api.expect(message).to_have_text(response.json()["error"]["message"])


def test_the_read_only_key_cannot_upload_or_delete(browser, console_server: LiveServer):
    page = open_console(browser, console_server, API_KEY, "adapters")
    sync_api.expect(page.locator("#upload-submit")).to_be_disabled()
    page.fill("#adapter-search", adapter_name(0))
    page.locator(f'#adapter-rows tr[data-name="{adapter_name(0)}"]').click()
    sync_api.expect(page.locator("#delete-adapter")).to_be_disabled()


def test_playground_columns_equal_the_apis_greedy_output(browser, console_server: LiveServer):
    models = [MODEL_NAME, adapter_name(1), adapter_name(2)]
    prompt = "The quick brown fox"
    page = open_console(browser, console_server, API_KEY, "playground")
    page.fill("#pg-prompt", prompt)
    page.fill("#pg-max-tokens", "12")
    page.fill("#pg-temperature", "0")
    for _ in models[1:]:
        page.click("#pg-add")
    inputs = page.locator(".pg-model")
    for i, model in enumerate(models):
        inputs.nth(i).fill(model)
    page.click("#pg-run")
    columns = page.locator("#pg-columns .column")
    for i in range(len(models)):
        sync_api.expect(columns.nth(i)).to_have_attribute("data-state", "done")
    with console_server.client() as client:
        for i, model in enumerate(models):
            body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
            expected = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            assert columns.nth(i).locator(".pg-output").text_content() == expected, model
            assert "tokens/s" in (columns.nth(i).locator(".pg-stats").text_content() or "")
    texts = {columns.nth(i).locator(".pg-output").text_content() for i in range(len(models))}
    assert len(texts) > 1  # the adapters change the answer
    page.locator(".pg-curl").first.click()
    sync_api.expect(page.locator("#pg-code")).to_contain_text("/v1/completions")
    screenshot(page, "playground")
    assert page.errors == []  # type: ignore[attr-defined]


def test_playground_chat_mode_matches_the_chat_api(browser, console_server: LiveServer):
    page = open_console(browser, console_server, API_KEY, "playground")
    page.select_option("#pg-mode", "chat")
    page.fill("#pg-prompt", "Say hello")
    page.fill("#pg-max-tokens", "8")
    page.locator(".pg-model").first.fill(adapter_name(3))
    page.click("#pg-run")
    column = page.locator("#pg-columns .column").first
    sync_api.expect(column).to_have_attribute("data-state", "done")
    with console_server.client() as client:
        body = {
            "model": adapter_name(3),
            "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        reply = client.post("/v1/chat/completions", json=body).json()
    expected = reply["choices"][0]["message"]["content"]
    assert column.locator(".pg-output").text_content() == expected


def test_a_job_started_from_the_page_draws_its_loss_and_finishes(
    browser, console_server: LiveServer, tmp_path: Path
):
    dataset = tmp_path / "order.jsonl"
    dataset.write_bytes(jsonl(ordering_task(64, seed=0)))
    page = open_console(browser, console_server, ADMIN_KEY, "finetune")
    page.set_input_files("#ft-dataset", str(dataset))
    page.click("#ft-upload")
    sync_api.expect(page.locator("#ft-dataset-message")).to_contain_text("Stored order.jsonl")
    # Eight micro-batches per step keep the job's training near 12 s here, six of the page's 2 s
    # polls: with one, it trained in about 3 s and a run could see only 0 and then all 240 points.
    hyperparameters = {
        "r": "8",
        "max_steps": "240",
        "batch_size": "2",
        "gradient_accumulation_steps": "8",
        "checkpoint_steps": "80",
    }
    for field, value in hyperparameters.items():
        page.fill(f"#ft-{field}", value)
    page.fill("#ft-extra", '{"quantize": "none"}')
    page.fill("#ft-suffix", "order")
    page.click("#ft-start")
    sync_api.expect(page.locator("#ft-start-message")).to_contain_text("Started ftjob-")
    chart = page.locator("#ft-loss-chart")
    status = page.locator("#ft-job-status")
    seen: set[int] = set()  # the train points the chart showed, as the page polled
    deadline = time.monotonic() + 240
    while status.get_attribute("data-status") != "succeeded":
        assert time.monotonic() < deadline, f"job still {status.get_attribute('data-status')}"
        seen.add(int(chart.get_attribute("data-train-points") or 0))
        page.wait_for_timeout(200)
    # The page's next poll after the final status draws every step.
    sync_api.expect(chart).to_have_attribute("data-train-points", "240", timeout=15_000)
    assert len(seen - {0, 240}) >= 1, f"the chart never grew while the job ran: {seen}"
    assert int(chart.get_attribute("data-valid-points") or 0) >= 1
    sync_api.expect(page.locator("#ft-checkpoints tr").first).to_be_visible()
    sync_api.expect(page.locator("#ft-try")).to_be_visible()
    screenshot(page, "fine-tuning")
    page.click("#ft-try")
    sync_api.expect(page.locator(".pg-model")).to_have_count(2)
    assert page.locator(".pg-model").nth(1).input_value().startswith(f"ft:{MODEL_NAME}:order:")
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_bad_dataset_shows_the_line_it_fails_on(browser, console_server: LiveServer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    page = open_console(browser, console_server, ADMIN_KEY, "finetune")
    page.set_input_files("#ft-dataset", str(bad))
    page.click("#ft-upload")
    message = page.locator("#ft-dataset-message.error")
    sync_api.expect(message).to_contain_text("line 2")
    with console_server.client(admin=True) as admin:
        response = admin.post(
            "/v1/files",
            files={"file": ("bad.jsonl", bad.read_bytes())},
            data={"purpose": "fine-tune"},
        )
    assert response.status_code == 400
    sync_api.expect(message).to_have_text(response.json()["error"]["message"])


def test_cancel_stops_a_job_from_the_page(browser, console_server: LiveServer, tmp_path: Path):
    dataset = tmp_path / "order.jsonl"
    dataset.write_bytes(jsonl(ordering_task(32, seed=1)))
    page = open_console(browser, console_server, ADMIN_KEY, "finetune")
    page.set_input_files("#ft-dataset", str(dataset))
    page.click("#ft-upload")
    sync_api.expect(page.locator("#ft-dataset-message")).to_contain_text("Stored order.jsonl")
    page.fill("#ft-r", "8")
    page.fill("#ft-max_steps", "5000")
    page.fill("#ft-batch_size", "2")
    page.fill("#ft-checkpoint_steps", "0")
    page.fill("#ft-extra", '{"quantize": "none"}')
    page.click("#ft-start")
    chart = page.locator("#ft-loss-chart")
    sync_api.expect(chart).not_to_have_attribute("data-train-points", "0", timeout=120_000)
    page.click("#ft-cancel")
    status = page.locator("#ft-job-status")
    sync_api.expect(status).to_have_attribute("data-status", "cancelled", timeout=60_000)
    sync_api.expect(page.locator("#ft-cancel")).to_be_hidden()
    sync_api.expect(page.locator("#ft-try")).to_be_hidden()


def test_delete_the_adapter_through_the_page(browser, console_server: LiveServer):
    page = open_console(browser, console_server, ADMIN_KEY, "adapters")
    page.fill("#adapter-search", UPLOADED)
    page.locator(f'#adapter-rows tr[data-name="{UPLOADED}"]').click()
    page.click("#delete-adapter")
    sync_api.expect(page.locator(f'#adapter-rows tr[data-name="{UPLOADED}"]')).to_have_count(0)
    with console_server.client() as client:
        assert client.get(f"/v1/adapters/{UPLOADED}").status_code == 404


def test_markup_from_the_server_shows_as_text(browser, console_server: LiveServer):
    page = open_console(browser, console_server, API_KEY, "playground")
    # A real server message that echoes what the user typed.
    evil_name = '<img src=x id=pwned-img onerror="window.pwned=1">'
    page.locator(".pg-model").first.fill(evil_name)
    page.fill("#pg-prompt", "hi")
    page.click("#pg-run")
    output = page.locator(".pg-output").first
    sync_api.expect(output).to_contain_text(evil_name)
    # A completion holding a script: the test answers the stream itself (the tiny model's
    # random weights never write one), so the page's rendering is what is checked.
    script = "<script>window.pwned = 1</script><b>bold</b>"
    event = httpx.Response(200, json={"choices": [{"index": 0, "text": script}]}).text
    page.route(
        "**/v1/completions",
        lambda route: route.fulfill(
            status=200,
            content_type="text/event-stream",
            body=f"data: {event}\n\ndata: [DONE]\n\n",
        ),
    )
    page.locator(".pg-model").first.fill(MODEL_NAME)
    page.click("#pg-run")
    sync_api.expect(output).to_have_text(script)
    assert output.locator("script, b, img").count() == 0
    assert page.evaluate("window.pwned") is None
    assert page.locator("#pwned-img").count() == 0
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", [1280, 390])
def test_every_page_fits_the_width(browser, console_server: LiveServer, width: int):
    with console_server.client() as client:  # hot now, whatever ran before this test
        body = {"model": adapter_name(1), "prompt": "Hi", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200
    page = open_console(browser, console_server, ADMIN_KEY, "overview", width=width)
    for name in ("overview", "adapters", "playground", "finetune"):
        page.goto(f"{console_server.url}/console/#/{name}")
        sync_api.expect(page.locator(f"#page-{name}")).to_be_visible()
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name} at {width}px overflows by {overflow}px"
    page.goto(f"{console_server.url}/console/#/overview")
    sync_api.expect(page.locator("#stats-now")).to_contain_text("tokens/s")
    assert page.locator("#pool-bar rect").count() >= 3
    sync_api.expect(page.locator("#hot-adapters")).to_contain_text(adapter_name(1))
    screenshot(page, "overview" if width == 1280 else "overview-390")
    assert page.errors == []  # type: ignore[attr-defined]
