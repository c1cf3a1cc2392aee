"""The web console in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's
chromedriver, against the real API server, Celery worker and Redis. Skips (saying why) where no
Chromium is installed; `scripts/setup --test` installs it.

Screenshots of a job page at 1280 and 390 px go to $DEALREC_CONSOLE_SCREENSHOTS (default: the test's
temporary folder)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from svc_helpers import KEYS, tiny_dataset, write_dataset

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = os.environ.get("DEALREC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("DEALREC_CHROMEDRIVER") or shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver; "
           "scripts/setup --test does it)")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser-downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--lang=en-US"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    # The driver named explicitly: Selenium never looks for (or downloads) one of its own.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def wait(driver, cond, timeout: float = 60.0, what: str = ""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: cond(d))
    except TimeoutException:
        banner = driver.find_elements(By.ID, "error")
        shown = banner[0].text if banner and banner[0].is_displayed() else ""
        raise AssertionError(f"timed out waiting for {what}; error banner: {shown!r}; page: "
                             f"{driver.find_element(By.TAG_NAME, 'main').text[:1500]!r}") from None


def css(driver, selector: str):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver, selector: str) -> str:
    """The element's text, read in one step (the job page redraws itself every second)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
                                 selector)


def upload(driver, folder: Path, name: str) -> str:
    """Through the file input (several files at once); the result line's text."""
    driver.get(driver.current_url.split("#")[0] + "#/datasets")
    wait(driver, lambda d: css(d, "#upload-files"), what="the upload form")
    files = sorted(str(p) for p in folder.iterdir())
    css(driver, "#upload-files")[0].send_keys("\n".join(files))
    assert len(css(driver, "#upload-file-list li")) == len(files)
    field = css(driver, "#upload-name")[0]
    field.clear()
    field.send_keys(name)
    css(driver, "#upload-submit")[0].click()
    return wait(driver, lambda d: text_of(d, "#upload-result"), what="the upload's outcome")


def fill(driver, values: dict[str, object]) -> None:
    for sel, value in values.items():
        box = css(driver, sel)[0]
        box.clear()
        box.send_keys(str(value))


def start_job(driver, dataset_id: str, method: str, budget: int, seed: int, fast: bool,
              more: dict[str, object] | None = None, finetune: dict[str, object] | None = None) -> str:
    base = driver.current_url.split("#")[0]
    driver.get(base + "#/jobs")  # a hash change even when the form is open already: a fresh form
    driver.get(base + f"#/new?dataset={dataset_id}")
    wait(driver, lambda d: css(d, "#job-form #f-method"), what="the job form")
    assert Select(css(driver, "#f-dataset_id")[0]).first_selected_option.get_attribute("value") == dataset_id
    Select(css(driver, "#f-method")[0]).select_by_value(method)
    fill(driver, {"#f-budget": budget, "#f-seed": seed})
    for summary in css(driver, "#job-form details > summary"):
        summary.click()  # open the surrogate / influence / effort blocks
    if fast:
        fill(driver, {"#f-params__surrogate__epochs": 2, "#f-params__surrogate__eval_every": 1,
                      "#f-params__influence__lissa_steps": 200})
    fill(driver, more or {})
    if finetune is not None:
        css(driver, "#finetune-on")[0].send_keys(Keys.SPACE)  # the keyboard again
        fill(driver, finetune)
    css(driver, "#job-submit")[0].click()
    wait(driver, lambda d: "#/jobs/job_" in d.current_url, what="the job page")
    return driver.current_url.rsplit("/", 1)[1]


def wait_succeeded(driver, timeout: float = 120.0) -> None:
    wait(driver, lambda d: text_of(d, "#job-status") in ("succeeded", "failed", "cancelled"), timeout, "the job's end")
    assert text_of(driver, "#job-status") == "succeeded", text_of(driver, "#job-error")
    wait(driver, lambda d: css(d, "#report #features-figure"), what="the selection report")


def test_console_end_to_end(browser, api_server, worker, api, downloads, tmp_path):
    d = browser
    d.get(api_server.url + "/")
    # Without a key: only the key form, no API data.
    wait(d, lambda x: css(x, "#api-key"), what="the key form")
    assert not css(d, "#datasets-table") and not css(d, "#upload-form") and not css(d, "#nav")[0].is_displayed()
    css(d, "#api-key")[0].send_keys("not-a-key-0123456789" + Keys.ENTER)
    wait(d, lambda x: "invalid API key" in text_of(x, "#key-status"), what="the refused key's message")
    key = css(d, "#api-key")[0]
    key.clear()
    key.send_keys(KEYS["acme"] + Keys.ENTER)  # the keyboard alone
    wait(d, lambda x: css(x, "#upload-form"), what="the datasets page")
    assert d.execute_script("return sessionStorage.getItem('dealrec.apiKey')") == KEYS["acme"]

    # Upload through the file input: ready, with statistics.
    result = upload(d, write_dataset(tmp_path / "good", tiny_dataset()), "tiny-browser")
    assert "ready" in result and "40 users" in result, result
    dataset_id = css(d, "#upload-result code")[0].text
    wait(d, lambda x: css(x, f'#datasets-table tr[data-id="{dataset_id}"]'), what="the dataset in the list")

    # A malformed file: refused at once with file/line/field; one the worker finds: the same.
    files = tiny_dataset()
    no_title = {**files, "items.tsv": b"item_id\tsource_item_id\n1\tB1\n"}
    result = upload(d, write_dataset(tmp_path / "bad-header", no_title), "bad-header")
    assert "items.tsv, line 1, field 'title'" in result, result
    bad = {**files, "sequential_train.txt": files["sequential_train.txt"].replace(b"\n2 ", b"\n2 x ", 1)}
    result = upload(d, write_dataset(tmp_path / "bad-row", bad), "bad-row")
    assert "invalid" in result and "sequential_train.txt, line 2, field 'item_id'" in result, result
    bad_id = css(d, "#upload-result code")[0].text
    # Delete it from the list (confirmed in the browser's dialog).
    row = wait(d, lambda x: css(x, f'#datasets-table tr[data-id="{bad_id}"]'), what="the invalid dataset's row")[0]
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    d.switch_to.alert.accept()
    wait(d, lambda x: not css(x, f'#datasets-table tr[data-id="{bad_id}"]'), what="the deleted row to go")
    assert api("GET", f"/v1/datasets/{bad_id}").status_code == 404

    # An API error is shown as the API's message, on the field it names.
    d.get(api_server.url + f"/#/new?dataset={dataset_id}")
    wait(d, lambda x: css(x, "#f-params__strata"), what="the job form")
    css(d, "#f-params__strata")[0].send_keys("0")
    css(d, "#job-submit")[0].click()
    wait(d, lambda x: "params.strata" in text_of(x, "#job-form-error"), what="the 422's message")
    assert css(d, "#f-params__strata")[0].get_attribute("aria-invalid") == "true"

    # A random job: succeeds; no score to plot, the feature comparison is drawn.
    random_id = start_job(d, dataset_id, "random", 8, 0, fast=False)
    wait_succeeded(d)
    assert css(d, "#scatter-none") and css(d, "#strata-none")
    assert len(css(d, "#features rect.box")) >= 6

    # An influence job: the scatter has every sample, the selection and the hard-pruned marked; the strata.
    job_id = start_job(d, dataset_id, "influence", 8, 3, fast=True)
    wait(d, lambda x: css(x, "#job-stages tbody tr"), what="the stage table")
    wait_succeeded(d)
    job = api("GET", f"/v1/jobs/{job_id}").json()
    assert job["request"]["params"]["surrogate"]["epochs"] == 2 and job["request"]["method"] == "influence"
    diag = api("GET", f"/v1/jobs/{job_id}/diagnostics").json()
    assert len(css(d, "#scatter circle.pt")) == 40
    assert len(css(d, "#scatter circle.pt.selected")) == 8
    assert len(css(d, "#scatter circle.pt.pruned")) == diag["n_hard_pruned"] == 4
    assert len(css(d, "#strata rect.size")) == len(css(d, "#strata rect.taken")) == diag["strata"]["count"] > 0
    assert len(css(d, "#job-events li")) >= 5 and "job succeeded" in text_of(d, "#job-events")
    stages = d.execute_script("return [...document.querySelectorAll('#job-stages tbody tr td:first-child')]"
                              ".map(e => e.textContent)")
    assert set(stages) >= {"surrogate", "influence", "selection"}, stages

    # The selection CSV downloaded by the page equals the API's.
    css(d, "#download-selection_csv")[0].click()
    target = downloads / "selection.csv"
    wait(d, lambda x: target.is_file() and target.stat().st_size > 0, 30, "the downloaded selection.csv")
    time.sleep(0.3)
    assert target.read_text() == api("GET", f"/v1/jobs/{job_id}/selection?format=csv").text

    # DEALRec with the tiny LLM the server offers, fine-tuned and evaluated (the form's fine-tuning
    # block): effort on the vertical axis, the metrics, the adapter's download.
    full_id = start_job(d, dataset_id, "dealrec", 8, 0, fast=True, more={"#f-params__effort__llm": "tiny"},
                        finetune={"#f-finetune__epochs": 1, "#f-finetune__batch_size": 8,
                                  "#f-finetune__evaluate__test_users": 4, "#f-finetune__evaluate__num_beams": 2,
                                  "#f-finetune__evaluate__max_new_tokens": 6})
    wait_succeeded(d, timeout=300)
    request = api("GET", f"/v1/jobs/{full_id}").json()["request"]
    assert request["finetune"]["epochs"] == 1 and request["finetune"]["evaluate"]["test_users"] == 4
    assert request["params"]["effort"]["llm"] == "tiny"
    assert len(css(d, "#scatter circle.pt")) == 40 and len(css(d, "#scatter circle.pt.selected")) == 8
    assert "computed no effort" not in text_of(d, "#scatter-figure figcaption")
    assert css(d, "#finetune-result") and len(css(d, "#eval-metrics tbody tr")) == 2
    assert css(d, "#download-adapter")

    # Screenshots of the job page, and no sideways scrolling at 390 px.
    shots = Path(os.environ.get("DEALREC_CONSOLE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    for width in (1280, 390):
        d.set_window_size(width, 1000)
        d.get(api_server.url + f"/#/jobs/{full_id}")
        d.refresh()
        wait_succeeded(d)
        assert d.execute_script("return document.documentElement.scrollWidth") <= width + 1, width
        height = d.execute_script("return document.documentElement.scrollHeight")
        d.set_window_size(width, min(height + 140, 6000))
        time.sleep(0.3)
        d.save_screenshot(str(shots / f"console-job-{width}.png"))
        if width == 1280:  # the selection report alone (docs/console-job.png is this one, made smaller)
            css(d, "#report")[0].screenshot(str(shots / "console-report-1280.png"))
    d.set_window_size(1280, 1000)

    # The jobs list, filtered: both jobs; each links to its page.
    d.get(api_server.url + "/#/jobs?status=succeeded")
    wait(d, lambda x: css(x, "#jobs-table"), what="the jobs list")
    listed = {a.text for a in css(d, "#jobs-table tbody a")}
    assert {random_id, job_id, full_id} <= listed

    # Forgetting the key leaves nothing of the tenant's on the page.
    css(d, "#forget-key")[0].click()
    wait(d, lambda x: css(x, "#api-key"), what="the key form again")
    assert not css(d, "#jobs-table")


# ---------------------------------------------------------------------------------------------------
# The API's documentation pages (app/routes/docs.py), in the same browser: they render, every request
# they make goes to this server, and their Content Security Policy blocks nothing they need.

REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
CSP_WATCH = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
             "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")


@pytest.mark.parametrize(("page", "rendered", "parts"), [("/docs", ".swagger-ui .info .title", ".opblock"),
                                                          ("/redoc", ".api-info h1", "[data-section-id]")])
def test_api_docs_render_from_this_server_alone(browser, api_server, page, rendered, parts):
    d = browser
    watch = d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_WATCH})
    try:
        d.get(api_server.url + page)
        wait(d, lambda x: any("dealrec" in e.text for e in css(x, rendered)), what=f"{page}: the API's title")
        wait(d, lambda x: len(css(x, parts)) >= 10, what=f"{page}: the operations")
        loaded = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert any(u.endswith("/openapi.json") for u in loaded), loaded
        elsewhere = [u for u in loaded if not u.startswith(api_server.url + "/")]
        # Only ReDoc's "powered by" logo is asked of another server, and the policy blocks that request
        # (ReDoc then hides the image); nothing the pages need is blocked.
        assert elsewhere == ([REDOC_LOGO] if page == "/redoc" else []), loaded
        assert d.execute_script("return window.__csp") == [f"img-src {u}" for u in elsewhere]
    finally:
        d.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": watch["identifier"]})
