#!/usr/bin/env python
"""Browser check of the Swagger UI: open /docs in headless Chromium, "Try it out" on
POST /inspect, upload an image, execute, and check the response.

    python scripts/swagger_check.py --url http://127.0.0.1:8000 --screenshot swagger.png

Needs Debian's ``chromium`` and ``chromium-driver`` (scripts/ensure_chromium.sh) and
``selenium`` from PyPI. Exit status 0 = the UI answered 200 with a JSON score.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,2400",
]


def find_binaries() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return browser, driver


def make_image(path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img = np.full((96, 128, 3), 180, np.uint8)
    img[30:60, 40:90] = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)  # a "defect"
    Image.fromarray(img).save(path)


def run(url: str, image: Path, screenshot: Path, product: str, timeout_s: float, api_key: str | None) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = find_binaries()
    if browser is None or driver_path is None:
        raise RuntimeError("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="swagger-check-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    wait = WebDriverWait(driver, timeout_s)
    try:
        driver.get(f"{url.rstrip('/')}/docs")
        op = wait.until(
            ec.presence_of_element_located(
                (By.CSS_SELECTOR, "[id^='operations-inspection-'][id$='inspect_post']")
            )
        )
        if api_key:
            driver.find_element(By.CSS_SELECTOR, "button.authorize").click()
            box = wait.until(
                ec.presence_of_element_located((By.CSS_SELECTOR, ".modal-ux input[type='text']"))
            )
            box.send_keys(api_key)
            driver.find_element(By.CSS_SELECTOR, ".modal-ux button.authorize").click()
            driver.find_element(By.CSS_SELECTOR, ".modal-ux button.btn-done").click()
        op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(lambda d: op.find_elements(By.CSS_SELECTOR, "button.try-out__btn"))
        op.find_element(By.CSS_SELECTOR, "button.try-out__btn").click()
        product_input = wait.until(
            lambda d: op.find_element(By.CSS_SELECTOR, "tr[data-param-name='product'] input")
        )
        product_input.clear()
        product_input.send_keys(product)
        file_input = wait.until(lambda d: op.find_element(By.CSS_SELECTOR, "input[type='file']"))
        file_input.send_keys(str(image.resolve()))
        op.find_element(By.CSS_SELECTOR, "button.execute").click()
        status_cell = wait.until(
            lambda d: op.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status")
        )
        deadline = time.monotonic() + timeout_s
        body_text = ""
        while time.monotonic() < deadline:
            blocks = op.find_elements(
                By.CSS_SELECTOR, ".live-responses-table tbody .response-col_description pre"
            )
            body_text = blocks[0].text if blocks else ""
            if body_text.strip().startswith("{") and body_text.strip().endswith("}"):
                break
            time.sleep(0.2)
        status = status_cell.text.strip().split()[0]
        driver.execute_script(
            "arguments[0].scrollIntoView();", op.find_element(By.CSS_SELECTOR, ".live-responses-table")
        )
        driver.save_screenshot(str(screenshot))
        doc = json.loads(body_text)
        return {"status": int(status), "body": doc}
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--image", type=Path, help="image to upload (default: a generated PNG)")
    p.add_argument("--product", default="bottle")
    p.add_argument("--screenshot", type=Path, default=Path("swagger_check.png"))
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--api-key", help="X-API-Key to enter through Authorize")
    args = p.parse_args(argv)
    image = args.image
    if image is None:
        image = Path(tempfile.mkdtemp(prefix="swagger-img-")) / "part.png"
        make_image(image)
    try:
        result = run(args.url, image, args.screenshot, args.product, args.timeout, args.api_key)
    except Exception as exc:
        print(f"FAIL: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    body = result["body"]
    ok = (
        result["status"] == 200
        and isinstance(body.get("score"), float)
        and body.get("decision") in ("anomalous", "normal")
    )
    summary = {k: body.get(k) for k in ("score", "decision", "threshold", "method", "product", "demo")}
    print(json.dumps({"ok": ok, "status": result["status"], **summary, "screenshot": str(args.screenshot)}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
