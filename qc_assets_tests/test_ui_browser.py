"""The Dagster UI end to end, in Debian's headless Chromium driven by Playwright (which never downloads a browser).

`qc ui` runs for real on a free loopback port against a fresh instance and the sample corpus. The test opens the
global asset graph and finds every asset of the Definitions there, launches a materialization of one corpus
partition through the asset's Materialize dialog, waits for the run to succeed and checks that the UI shows it, on
the run's page and on the asset's partition page. Screenshots go to test-output/browser/.
"""

from __future__ import annotations

import re
import shutil
import sys
import warnings

import dagster as dg
import pytest

from qc_assets.definitions import build_definitions
from qc_assets.paths import PROJECT_ROOT, SAMPLE_CORPUS
from qc_assets.settings import load_settings
from qc_assets.testing.dagster_ui import DagsterUI

OUTPUT = PROJECT_ROOT / "test-output" / "browser"
# Wide enough that the expanded graph fits at a zoom where nodes show their full names (Dagster draws
# name-truncated "minimal" nodes below 60% zoom).
VIEWPORT = {"width": 2560, "height": 1440}
# Hides Dagster's "Join the Dagster community" dialog, which covers the page on localhost.
DISMISS_COMMUNITY_DIALOG = "window.localStorage.setItem('communityNux', JSON.stringify('1'))"
UI_SETTINGS = {
    "QC_STUDENT_BASE_MODELS": "tiny",
    "QC_SCORER_MODEL": "tiny",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def skip_loudly(capsys, reason: str) -> None:
    message = (
        f"THE BROWSER TEST OF THE DAGSTER UI WAS SKIPPED: {reason}. "
        "Install Debian's chromium with `make chromium` (or `apt-get install chromium`) and run it again."
    )
    banner = "!" * 100
    with capsys.disabled():  # straight to the terminal, past pytest's capture
        print(f"\n{banner}\n{message}\n{banner}", file=sys.stderr, flush=True)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


@pytest.mark.long(45)
@pytest.mark.timeout(420)
def test_the_ui_shows_every_asset_and_a_corpus_partition_materialized_from_it(environment, capsys):
    chromium = shutil.which("chromium")
    if chromium is None:
        skip_loudly(capsys, "no `chromium` on PATH")
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)

    env = {**environment(SAMPLE_CORPUS), **UI_SETTINGS}
    definitions = build_definitions(load_settings(env))
    graph = definitions.resolve_asset_graph()
    asset_names = sorted(key.path[-1] for key in graph.get_all_asset_keys())
    groups = {graph.get(key).group_name for key in graph.get_all_asset_keys()}
    corpus = dg.AssetKey("corpus")
    partition = graph.get(corpus).partitions_def.get_partition_keys()[0]
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUT.glob("*.png"):
        stale.unlink()

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        except PlaywrightError as error:
            skip_loudly(capsys, f"Playwright could not launch {chromium}: {str(error).splitlines()[0]}")
        ui = DagsterUI(env, OUTPUT / "qc-ui.log")
        try:
            ui.start()
            ui.wait_until_loaded(timeout=180)
            # Started without --host: the webserver, daemon and code server listen on loopback only.
            listening = ui.listening_addresses()
            assert ("127.0.0.1", ui.port) in listening, listening
            assert {address for address, _ in listening} <= {"127.0.0.1", "::1"}, listening
            context = browser.new_context(viewport=VIEWPORT, base_url=ui.url)
            context.add_init_script(DISMISS_COMMUNITY_DIALOG)
            context.set_default_timeout(30_000)
            page = context.new_page()
            try:
                _find_every_asset_in_the_graph(page, expect, asset_names, len(groups) > 1)
                run_id = _materialize_partition_from_the_asset_page(page, expect, corpus.path[-1], partition)
                run = ui.wait_for_run(run_id, timeout=240)
                assert run["status"] == "SUCCESS", (
                    f"run {run_id} of {corpus.to_user_string()}[{partition}] ended {run['status']}:\n"
                    + "\n".join(ui.run_errors(run_id))
                )
                assert {tag["key"]: tag["value"] for tag in run["tags"]}.get("dagster/partition") == partition
                assert run["assetSelection"] == [{"path": corpus.path}]
                _the_ui_shows_the_successful_run(page, expect, run_id, corpus.path[-1], partition)
            except BaseException:
                try:
                    page.screenshot(path=OUTPUT / "failure.png")
                except PlaywrightError:
                    pass
                raise
        finally:
            browser.close()
            ui.stop()


def _find_every_asset_in_the_graph(page, expect, asset_names: list[str], expand_groups: bool) -> None:
    page.goto("/asset-groups")
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    if expand_groups:
        # With several groups the graph starts with each group collapsed into one box: expand them all from
        # the graph's settings menu, then reload so that the expanded graph is fitted into the viewport.
        settings = page.get_by_role("button").filter(has=page.get_by_role("img", name="settings", exact=True))
        settings.filter(has_not_text="Settings").click()
        page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
        expect(page).to_have_url(re.compile(r"[?&]expanded="))
        page.reload()
    # Asset nodes are the graph's foreignObjects that are not group boxes; each names its asset in data-tooltip.
    nodes = page.locator("svg foreignObject:not(.group)")
    named = nodes.locator("[data-tooltip]")
    try:
        expect(named).to_have_count(len(asset_names))
    except AssertionError:
        shown = sorted(named.evaluate_all("nodes => nodes.map(node => node.getAttribute('data-tooltip'))"))
        message = (
            f"the asset graph does not show the Definitions' assets: missing {sorted(set(asset_names) - set(shown))}, "
            f"unexpected {sorted(set(shown) - set(asset_names))}; it shows {shown}"
        )
        if not shown:  # below 60% zoom nodes are drawn without their full names
            message += f"; asset node texts: {[text.strip() for text in nodes.all_text_contents() if text.strip()]}"
        raise AssertionError(message) from None
    for name in asset_names:
        node = nodes.locator(f'[data-tooltip="{name}"]')
        expect(node, f"asset {name!r} is not visible in the asset graph").to_have_text(name)
        expect(node, f"asset {name!r} is outside the graph's viewport").to_be_in_viewport()
    page.screenshot(path=OUTPUT / "asset-graph.png")


def _materialize_partition_from_the_asset_page(page, expect, asset: str, partition: str) -> str:
    page.goto(f"/assets/{asset}")
    page.get_by_role("button", name=re.compile("Materialize…")).click()
    title = f"Launch runs to materialize {asset}"
    # The partition menu is a role=dialog popover inside the dialog: pick the dialog by its title.
    dialog = page.get_by_role("dialog").filter(has_text=title)
    expect(dialog.get_by_text(title)).to_be_visible()
    dialog.get_by_role("button", name="Custom", exact=True).click()
    # The dialog starts with no partition or with all of them, depending on what it has loaded: open the
    # partition menu, clear the selection with "Select all", then tick the one partition.
    dialog.get_by_role("img", name="expand_more").click()
    select_all = page.locator("label").filter(has_text=re.compile(r"^Select all \(\d+\)$"))
    select_all_box = select_all.get_by_role("checkbox")
    if not select_all_box.is_checked():
        select_all.click()
    expect(select_all_box).to_be_checked()
    select_all.click()
    expect(select_all_box).not_to_be_checked()
    page.locator("label").filter(has=page.locator(f'[data-tooltip="{partition}"]')).click()
    dialog.get_by_text(title).click()  # closes the partition menu
    expect(page.get_by_placeholder("Filter partitions")).to_be_hidden()
    expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
    page.screenshot(path=OUTPUT / "materialize-dialog.png")
    dialog.get_by_role("button", name="Launch 1 run", exact=True).click()
    # The toast names the run and links to it.
    view = page.get_by_role("link", name="View", exact=True)
    expect(view).to_have_attribute("href", re.compile(r"/runs/[0-9a-f-]{36}$"))
    run_id = view.get_attribute("href").rsplit("/", 1)[1]
    expect(page.get_by_text(f"Launched run {run_id[:8]}")).to_be_visible()
    view.click()
    expect(page).to_have_url(re.compile(f"/runs/{run_id}$"))
    return run_id


def _the_ui_shows_the_successful_run(page, expect, run_id: str, asset: str, partition: str) -> None:
    # The run page, opened while the run was queued, updates itself.
    expect(page.get_by_text("Success", exact=True), f"run page of {run_id} does not show Success").to_be_visible(
        timeout=60_000
    )
    expect(page.get_by_text(f"partition: {partition}", exact=True)).to_be_visible()
    page.screenshot(path=OUTPUT / "run-success.png")

    page.goto(f"/assets/{asset}?view=partitions&partition={partition}")
    expect(page.get_by_text("Materialized (1)", exact=True)).to_be_visible()
    # The partition's header: its key with a "Materialized" tag; below it the run of its latest materialization.
    header = page.locator(f'[data-tooltip="{partition}"]').filter(has=page.locator('[data-tooltip="Materialized"]'))
    expect(header, f"partition {partition} is not shown as materialized").to_be_visible()
    expect(page.get_by_role("link", name=run_id[:8], exact=True)).to_have_attribute("href", re.compile(run_id))
    page.screenshot(path=OUTPUT / "partition-materialized.png")
