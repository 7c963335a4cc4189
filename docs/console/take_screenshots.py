"""Take the console screenshots in this folder: a server over the default model, a short job
trained through the fine-tuning page, its adapter beside the base in the playground, and some
traffic for the overview's charts.

    python docs/console/take_screenshots.py [--model DIR] [--out docs/console]

Needs the dev extras (playwright) and Debian's chromium; without --model it uses the default
model, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright

ADMIN_KEY = "console-admin"
MODEL_NAME = "SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "Order: 7 2 9 4\nAnswer:"


def ordering_rows(n: int) -> str:
    """Prompt/completion pairs: put four digits in order (learnable in seconds)."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        nums = rng.sample(range(10), 4)
        prompt = "Order: " + " ".join(map(str, nums)) + "\nAnswer:"
        rows.append({"prompt": prompt, "completion": " " + " ".join(map(str, sorted(nums)))})
    return "\n".join(json.dumps(r) for r in rows)


def start_server(model: Path, data_dir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model)]
    cmd += ["--quantize", "none", "--dtype", "float32", "--device", "cpu", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--admin-api-key", ADMIN_KEY, "--log-level", "warning"]
    cmd += ["--served-model-name", MODEL_NAME]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not become ready")


def traffic(url: str, models: list[str], stop: threading.Event) -> None:
    """A few requests at a time, so the overview has something to draw."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        i = 0
        while not stop.is_set():
            body = {"model": models[i % len(models)], "prompt": PROMPT, "max_tokens": 48}
            client.post("/v1/completions", json=body)
            i += 1


def shoot(page: Page, out: Path, name: str) -> None:
    page.wait_for_timeout(500)
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    print(f"wrote {out / name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(REPO))
        import torch

        from server.model.resolve import resolve_model

        args.model = resolve_model(None, torch.float32)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium on PATH (apt-get install chromium)")
    data_dir = Path(tempfile.mkdtemp(prefix="console-shots-"))
    proc, url = start_server(args.model, data_dir)
    stop = threading.Event()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(600_000)
            expect.set_options(timeout=600_000)
            page.on("dialog", lambda d: d.accept())
            page.goto(f"{url}/console/#/finetune")
            page.fill("#key-input", ADMIN_KEY)
            page.click("#key-form button")
            expect(page.locator("#role")).to_have_text("admin")

            dataset = data_dir / "order.jsonl"
            dataset.write_text(ordering_rows(256))
            page.set_input_files("#ft-dataset", str(dataset))
            page.click("#ft-upload")
            expect(page.locator("#ft-dataset-message")).to_contain_text("Stored")
            fields = {"r": "8", "lora_alpha": "16", "learning_rate": "0.003", "max_steps": "200"}
            fields |= {"batch_size": "8", "checkpoint_steps": "50"}
            for field, value in fields.items():
                page.fill(f"#ft-{field}", value)
            page.fill("#ft-extra", '{"quantize": "none"}')
            page.fill("#ft-suffix", "order")
            page.click("#ft-start")
            status = page.locator("#ft-job-status")
            expect(status).to_have_attribute("data-status", "succeeded")
            page.wait_for_timeout(2500)
            shoot(page, args.out, "fine-tuning")
            adapter = status.text_content().split("→ ")[1].split(" ")[0]  # type: ignore[union-attr]

            for _ in range(3):
                models = [MODEL_NAME, adapter]
                threading.Thread(target=traffic, args=(url, models, stop), daemon=True).start()
            page.click("#ft-try")
            page.fill("#pg-prompt", PROMPT)
            page.fill("#pg-max-tokens", "24")
            page.click("#pg-run")
            for i in range(2):
                expect(page.locator("#pg-columns .column").nth(i)).to_have_attribute(
                    "data-state", "done"
                )
            page.locator(".pg-python").nth(1).click()
            shoot(page, args.out, "playground")

            page.goto(f"{url}/console/#/adapters")
            page.locator("#adapter-rows tr").first.click()
            expect(page.locator("#details-name")).to_be_visible()
            shoot(page, args.out, "adapters")

            page.goto(f"{url}/console/#/overview")
            page.wait_for_timeout(40_000)  # a minute of traffic on the charts
            shoot(page, args.out, "overview")
            page.set_viewport_size({"width": 390, "height": 900})
            page.wait_for_timeout(2500)
            shoot(page, args.out, "overview-390")
            browser.close()
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
