"""Cross-site writes to a keyless server, from a real browser (headless Debian chromium through
Playwright, as in test_console_browser.py): a page served from another origin, on another site
(`localhost`) or another port of the same host, posts an adapter upload as a multipart form and
a training file with fetch; the server stores neither (403), though `--allowed-hosts` lets its
Host through. A page from an origin in `--csrf-trusted-origins` may write, and the console,
served by the server itself, uploads and deletes as before."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.conftest import MODEL_NAME, serve_flags
from tests.integration.fine_tuning_data import jsonl, ordering_task
from tests.integration.live_server import LiveServer, free_port
from tests.integration.test_console_browser import CHROMIUM, CHROMIUM_ARGS, sync_api

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; see .ci/run)"
)
TIMEOUT_MS = 30_000
TRAIN_ROWS = jsonl(ordering_task(8, seed=0))
PAGE_PORT = free_port()  # the other origin's pages: any path serves an empty page
TRUSTED_PORT = free_port()  # served the same way, listed in --csrf-trusted-origins

# What a hostile page runs: a multipart form posted to the server (a navigation, as a form's
# submit button would), then a training file sent with fetch. Both are "simple" requests: no
# CORS preflight precedes them, so without the server's own check both would be stored.
ATTACK = """async ({server, name, config, weights, rows}) => {
    const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const training = new FormData();
    training.append('purpose', 'fine-tune');
    training.append('file', new File([bytes(rows)], 'train.jsonl'));
    await fetch(server + '/v1/files', {method: 'POST', body: training, mode: 'no-cors'});
    const form = document.createElement('form');
    form.method = 'POST';
    form.enctype = 'multipart/form-data';
    form.action = server + '/v1/adapters';
    const field = document.createElement('input');
    field.name = 'name';
    field.value = name;
    const files = document.createElement('input');
    files.type = 'file';
    files.name = 'files';
    files.multiple = true;
    const picked = new DataTransfer();
    picked.items.add(new File([bytes(config)], 'adapter_config.json'));
    picked.items.add(new File([bytes(weights)], 'adapter_model.safetensors'));
    files.files = picked.files;
    form.append(field, files);
    document.body.append(form);
    form.submit();
}"""


class _EmptyPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>elsewhere</title><body></body>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def other_origins() -> Iterator[None]:
    """Two page servers on 127.0.0.1: PAGE_PORT (hostile) and TRUSTED_PORT."""
    servers = [
        ThreadingHTTPServer(("127.0.0.1", port), _EmptyPage) for port in (PAGE_PORT, TRUSTED_PORT)
    ]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def keyless(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """No keys (a local development server), Host names limited as the issue's server was."""
    args = serve_flags(max_lora_rank=8, max_model_len=128, served_model_name=MODEL_NAME)
    args += ["--allowed-hosts", "127.0.0.1", "localhost"]
    args += ["--csrf-trusted-origins", f"https://tool.example,http://127.0.0.1:{TRUSTED_PORT}"]
    data = tmp_path_factory.mktemp("keyless") / "data"
    live = LiveServer(model_dir, data, args, api_key=None, admin_key=None).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as p:
        yield p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def stored(server: LiveServer) -> tuple[set[str], int]:
    """The adapters registered and the number of training files, as a non-browser client sees."""
    with server.client() as http:
        adapters = {a["id"] for a in http.get("/v1/adapters").json()["data"]}
        files = len(http.get("/v1/files").json()["data"])
    return adapters, files


def attack_from(browser, origin: str, server: LiveServer, name: str, adapter: Path):  # type: ignore[no-untyped-def]
    """Open a page at `origin` and run ATTACK against the server; the page it ends on."""
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{origin}/blog")
    args = {
        "server": server.url,
        "name": name,
        "config": base64.b64encode((adapter / "adapter_config.json").read_bytes()).decode(),
        "weights": base64.b64encode((adapter / "adapter_model.safetensors").read_bytes()).decode(),
        "rows": base64.b64encode(TRAIN_ROWS).decode(),
    }
    with page.expect_navigation(url=f"{server.url}/v1/adapters"):
        page.evaluate(ATTACK, args)
    return page


@pytest.mark.parametrize(
    "origin",
    [f"http://localhost:{PAGE_PORT}", f"http://127.0.0.1:{PAGE_PORT}"],
    ids=["another site", "another port of the same host"],
)
def test_a_page_from_another_origin_can_neither_upload_an_adapter_nor_a_training_file(
    browser, other_origins, keyless: LiveServer, spare_adapters: Path, origin: str
) -> None:
    before = stored(keyless)
    page = attack_from(browser, origin, keyless, "planted", spare_adapters / "spare-0")
    assert "cross_site_request" in page.content()  # the form's answer: 403, in the browser
    assert stored(keyless) == before
    page.close()


def test_a_page_from_a_trusted_origin_may_write(
    browser, other_origins, keyless: LiveServer, spare_adapters: Path
) -> None:
    _, files = stored(keyless)
    origin = f"http://127.0.0.1:{TRUSTED_PORT}"
    page = attack_from(browser, origin, keyless, "from-trusted", spare_adapters / "spare-1")
    adapters, now = stored(keyless)
    assert "from-trusted" in adapters and now == files + 1
    page.close()
    with keyless.client() as http:
        assert http.delete("/v1/adapters/from-trusted").status_code == 200


def test_the_console_still_uploads_and_deletes_on_a_keyless_server(
    browser, keyless: LiveServer, spare_adapters: Path
) -> None:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(f"{keyless.url}/console/#/adapters")
    sync_api.expect(page.locator("#role")).to_have_text("admin")
    source = spare_adapters / "spare-2"
    page.fill("#upload-name", "console-keyless")
    page.set_input_files(
        "#upload-files",
        [str(source / "adapter_config.json"), str(source / "adapter_model.safetensors")],
    )
    page.click("#upload-submit")
    sync_api.expect(page.locator("#upload-message")).to_contain_text("Registered console-keyless")
    page.locator('#adapter-rows tr[data-name="console-keyless"]').click()
    page.click("#delete-adapter")
    sync_api.expect(page.locator('#adapter-rows tr[data-name="console-keyless"]')).to_have_count(0)
    assert "console-keyless" not in stored(keyless)[0]
    page.close()
