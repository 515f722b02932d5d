"""Screenshots of what a person sees of rgan-dist runs in the MLflow 3.17 UI, for the README's MLflow section
(docs/ui/*.png), taken in headless Chromium (Debian's `chromium` package driven by Playwright's Python client: no
browser download). It trains three loss variants of a short run on the embedded digits and a two-trial sweep
into a fresh store in a temporary folder, serves it with `mlflow server`, and photographs:

    docs/ui/grids_side_by_side.png   the chart view: each variant's sample grid at the same step
    docs/ui/fid_vs_step.png          the chart view: FID against the step
    docs/ui/fid_vs_time.png          the chart view: FID against eval/elapsed_s (wall-clock seconds)
    docs/ui/runs_table.png           the runs table: the Dataset and Models columns filled
    docs/ui/sweep_trials.png         a sweep's parent run expanded to its trials

    python scripts/ui_screenshots.py [--out docs/ui] [--steps 8] [--work DIR]   # about 10 minutes on 2 CPU cores

The committed screenshots are of the default, 8-step runs (their grids are still noise: enough to show the
layout, not what the variants learn; a larger --steps shows that, at more cost).

tests/test_mlflow_ui.py drives the same UI with the pieces defined here (store, server, browser, page helpers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ELAPSED = "eval/elapsed_s"  # rgan_dist.tracking.ELAPSED: seconds from the run's start to each evaluation
CHROMIUM = os.environ.get("RGAN_CHROMIUM", "/usr/bin/chromium")  # Debian's package; apt-get install chromium
VARIANTS = ("rsgan", "rasgan", "ralsgan")
VARIANTS_EXPERIMENT, SWEEP_EXPERIMENT = "ui-variants", "ui-sweep"
# A tiny generator on the embedded digits: seconds per run on a CPU, a real grid of 8 x 8 16-pixel samples.
TINY = ["model.resolution=16", "model.width=8", "model.z_dim=16", "train.batch_size=16", "train.log_every=1",
        "train.progress=false", "checkpoint.every=0", "tracking.log_checkpoints=none", "tracking.system_metrics=false",
        "data.workers=0"]


def store_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def train_variants(root: Path, *, steps: int, sample_every: int, eval_every: int = 0,
                   losses: tuple[str, ...] = VARIANTS, extra: tuple[str, ...] = ()) -> None:
    """One short `rgan train` run per loss in `losses`, all in the experiment VARIANTS_EXPERIMENT of the store
    in `root`; FID every `eval_every` steps on a tiny N (0: none)."""
    for loss in losses:
        cmd = [sys.executable, "-m", "launcher", "train", "--config", str(ROOT / "configs" / "demo.yaml"), *TINY,
               f"loss.name={loss}", f"train.steps={steps}", f"train.sample_every={sample_every}",
               f"eval.every={eval_every}", "eval.num_samples=16", "eval.batch_size=16", "eval.kid=false",
               f"run.name=digits-{loss}", f"run.out_dir={root / 'runs' / loss}",
               f"tracking.mlflow_uri={store_uri(root)}", f"tracking.experiment={VARIANTS_EXPERIMENT}", *extra]
        _run(cmd, root)


def run_sweep(root: Path, *, steps: int, losses: tuple[str, ...] = ("rsgan", "rasgan")) -> None:
    """A sweep of one trial per loss (FIFO: every trial to the end) into SWEEP_EXPERIMENT of the same store."""
    import yaml

    tiny = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in TINY)}
    sweep = {"name": "ui-sweep", "base": str(ROOT / "configs" / "demo.yaml"),
             "overrides": {**tiny, "train.steps": steps, "train.sample_every": 0,
                           "eval.every": steps, "eval.num_samples": 8, "eval.batch_size": 8, "eval.kid": False,
                           "tracking.experiment": SWEEP_EXPERIMENT, "tracking.mlflow_uri": store_uri(root)},
             "space": {"loss.name": {"grid": list(losses)}}, "scheduler": {"name": "fifo"},
             "max_concurrent_trials": 2, "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
             "out_dir": str(root / "sweep")}
    path = root / "ui-sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    _run([sys.executable, "-m", "launcher", "sweep", "--config", str(path), "--num-cpus", "2", "--verbose", "0"], root)


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(root: Path, timeout_s: float = 180) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (a free port) over the store in `root`; yields its base URL, stops it after."""
    port = free_port()
    log = open(root / "mlflow-server.log", "w")  # noqa: SIM115 (closed below, after the server)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri(root),
           "--default-artifact-root", str(root / "mlruns"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'mlflow-server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextlib.contextmanager
def browser(width: int = 1500, height: int = 950) -> Iterator[Any]:
    """A page of headless Chromium (CHROMIUM), driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # CI runs as root
        try:
            page = b.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            b.close()


def experiment_ids(root: Path) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(store_uri(root))
    return {e.name: e.experiment_id for e in client.search_experiments()}


def open_page(page: Any, url: str, ready_text: str) -> None:
    """Go to `url`, wait for `ready_text`, and close the MLflow Assistant side panel 3.17 opens on first visit
    (it covers the right third of the page)."""
    page.goto(url)
    page.get_by_text(ready_text).first.wait_for()
    with contextlib.suppress(Exception):
        page.locator("button[aria-label='Close']").first.click(timeout=10_000)  # the assistant panel's X
    time.sleep(1)


def runs_listed(page: Any) -> None:
    """Wait until the runs table has loaded its rows ("N matching runs", N > 0)."""
    page.wait_for_function("() => /[1-9][0-9]* matching runs?/.test(document.body.innerText)")
    time.sleep(1)


def expand_parent(page: Any) -> None:
    """Unfold the first parent run in the runs table (the chevron left of its name) to show its nested runs."""
    page.locator("button[data-component-id$='runnamecellrenderer.tsx_46']").first.click()
    time.sleep(1)


def image_cards_in_view(page: Any) -> None:
    """Scroll a run page's Model metrics tab to its image cards (the last section; cards render when in view)."""
    page.get_by_text("Add section").first.scroll_into_view_if_needed()
    time.sleep(2)


def card_last_step(page: Any) -> None:
    """Move every image card's step slider to its last logged step (a click at the end of its track)."""
    for track in page.locator("span.TRACK").all():
        box = track.bounding_box()
        page.mouse.click(box["x"] + box["width"] - 1, box["y"] + box["height"] / 2)
    time.sleep(2)


def image_card_images(page: Any) -> list[dict[str, Any]]:
    """The image cards' <img> elements that show a logged image (by its `images/` artifact path)."""
    return page.evaluate("""() => [...document.images]
        .filter(i => decodeURIComponent(i.src).includes('images/'))
        .map(i => ({src: decodeURIComponent(i.src), naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
                    width: i.width, height: i.height, complete: i.complete}))""")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "ui")
    p.add_argument("--steps", type=int, default=8, help="G steps per variant (grids and FID every steps/2)")
    p.add_argument("--work", type=Path, default=None, help="keep the store here (default: a temporary folder)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        root = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "mlflow.db").exists():
            half = max(1, args.steps // 2)
            train_variants(root, steps=args.steps, sample_every=half, eval_every=half)
            run_sweep(root, steps=4)
        ids = experiment_ids(root)
        base = stack.enter_context(mlflow_server(root))
        page = stack.enter_context(browser())
        shoot(page, base, ids, args.out)
    print(json.dumps(sorted(str(p) for p in args.out.glob("*.png"))))
    return 0


def shoot(page: Any, base: str, ids: dict[str, str], out: Path) -> None:
    from rgan_dist.mlflow_view import ui_link

    variants = ui_link(base, ids[VARIANTS_EXPERIMENT])
    open_page(page, variants, "digits-rsgan")
    runs_listed(page)
    page.screenshot(path=str(out / "runs_table.png"))

    open_page(page, ui_link(base, ids[SWEEP_EXPERIMENT]), "ui-sweep")
    runs_listed(page)
    expand_parent(page)
    page.get_by_text("ui-sweep-000").first.wait_for()
    page.screenshot(path=str(out / "sweep_trials.png"))

    open_page(page, variants.replace("?", "?compareRunsMode=CHART&"), "digits-rsgan")
    fid = chart_card(page, "eval/fid")
    fid.wait_for()
    time.sleep(2)
    fid.screenshot(path=str(out / "fid_vs_step.png"))
    page.locator("button[aria-label='Configure charts']").first.click()  # the gear: every line chart's x-axis
    page.get_by_role("menuitem", name="Metric").first.focus()
    page.keyboard.press("ArrowRight")  # opens the metric list, its first item focused
    time.sleep(1)
    for _ in range(40):  # to eval/elapsed_s, by keyboard (the list re-renders under a moving mouse)
        if page.evaluate("() => document.activeElement && document.activeElement.innerText") == ELAPSED:
            break
        page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    time.sleep(3)
    chart_card(page, "eval/fid").screenshot(path=str(out / "fid_vs_time.png"))

    for _ in range(20):  # cards render when scrolled into view; the image card comes last
        if chart_card(page, "samples").count():
            break
        page.mouse.move(900, 600)
        page.mouse.wheel(0, 1500)
        time.sleep(1)
    grids = chart_card(page, "samples")
    grids.scroll_into_view_if_needed()
    grids.locator("[data-testid='experiment-view-compare-runs-card-menu']").click()
    page.get_by_role("menuitem", name="Configure").click()
    page.get_by_role("switch", name="Show run parameters").click()
    page.get_by_role("dialog").get_by_role("button", name=re.compile("^(Save|Save changes|OK)$")).click()
    time.sleep(2)
    card_last_step(page)
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    chart_card(page, "samples").locator("[data-component-id='fullscreen_button_chartcard']").click()
    time.sleep(3)  # the card full screen: the variants' grids in a row
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    page.get_by_role("dialog").last.screenshot(path=str(out / "grids_side_by_side.png"))


def chart_card(page: Any, title: str) -> Any:
    """The chart card titled `title` in the experiment's chart view."""
    return page.locator("[data-testid='experiment-view-compare-runs-card']").filter(
        has=page.get_by_text(title, exact=True)).first


if __name__ == "__main__":
    sys.exit(main())
