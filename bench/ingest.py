"""Ingest throughput: rtauto's storage SCP against dcmtk storescp and Orthanc.

dcmtk ``storescu`` pushes a synthetic CT series (``--slices`` slices of 512x512, cached under
``.bench/``) to each target, first over one association, then over 4 concurrent associations
(4 ``storescu`` processes, each sending a quarter of the slices). Targets:

* rtauto: :class:`rtauto.ingest.scp.StorageSCP` with its durable writes (fdatasync + folder
  fsync before success) and one job-store row per instance (committed in the background);
* dcmtk ``storescp`` (one association) and ``storescp --fork`` (4 associations);
* Orthanc;
* as context, not a target: the reference the issue was measured with, a bare pynetdicom
  handler in one process writing the raw data set bytes with ``fdatasync``
  (``bench/bare_pynetdicom_scp.py``): no validation, no index, no folder fsync;
* as context, not a target: ``storescp`` made durable like rtauto by an ``LD_PRELOAD`` shim
  (``bench/durable_writes.c``, built with gcc into ``.bench/``; left out without gcc) that
  flushes every file it writes and its folder before the C-STORE is answered. The figures
  against plain storescp compare rtauto's durable writes with writes left in the page cache;
  this one shows what the durability itself costs a C receiver on the same machine.

dcmtk servers, Orthanc and the ``storescu`` senders run with ``TCP_NODELAY=1``
(:func:`rtauto.testing.nodelay_env`): a receiver that delays its ACKs otherwise waits on the
sender's Nagle algorithm (storescp does, about 20 ms an image here; rtauto acknowledges before
it waits, so it does not), which would flatter rtauto. As context each round also measures
rtauto and storescp with a sender that keeps Nagle on. Every measurement gets a fresh receiver
(empty spool, store and storage), the order of the targets rotates every round, and images/s
and the ratios are medians over ``--rounds`` rounds measured in this one run.

    .venv/bin/python bench/ingest.py [--slices 300] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from rtauto.config import ScpSettings, Settings
from rtauto.ingest.scp import StorageSCP
from rtauto.store import Store
from rtauto.testing import OrthancServer, free_port, nodelay_env, wait_for_port, write_ct_series

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench"
CONCURRENCY = 4

# a running receiver: (port, called AE title, count of instances it holds)
Receiver = tuple[int, str, Callable[[], int]]
Target = Callable[[Path, int], AbstractContextManager[Receiver]]


def ct_series(slices: int) -> list[Path]:
    """The cached 512x512 CT series of ``slices`` slices (written on first use)."""
    folder = CACHE / f"ct512-{slices}"
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"writing {slices} CT slices of 512x512 to {folder} ...", flush=True)
        write_ct_series(folder, rows=512, cols=512, slices=slices, spacing=(0.9, 0.9, 2.0))
        done.touch()
    return sorted(folder.glob("CT.*.dcm"))


@contextmanager
def rtauto_target(work: Path, processes: int) -> Iterator[Receiver]:
    settings = Settings(
        home=work / "rtauto-home",
        scp=ScpSettings(ae_title="RTAUTO", port=0, processes=processes),
    )
    settings.ensure_dirs()
    url = settings.database_url
    store = Store(url, migrate=True)
    scp = StorageSCP(settings, url)
    port = scp.start()
    try:
        yield port, "RTAUTO", lambda: len(store.instance_paths())
    finally:
        scp.stop()
        store.close()


@contextmanager
def _server_process(
    cmd: list[str], port: int, ae_title: str, out: Path, env: dict[str, str] | None = None
) -> Iterator[Receiver]:
    """A receiver run as ``cmd`` on ``port``, holding one file in ``out`` per instance."""
    out.mkdir(parents=True)
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port, ae_title, lambda: sum(1 for _ in out.iterdir())
    finally:
        process.terminate()
        process.wait(timeout=20)


def storescp_target(
    work: Path, fork: bool, preload: Path | None = None
) -> AbstractContextManager[Receiver]:
    out = work / "storescp"
    port = free_port()
    env = nodelay_env()
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    cmd = ["storescp", *(["--fork"] if fork else []), "-od", str(out), str(port)]
    return _server_process(cmd, port, "STORESCP", out, env)


def bare_pynetdicom_target(work: Path) -> AbstractContextManager[Receiver]:
    """The issue's reference: a bare pynetdicom handler in one process (fdatasync per file)."""
    out = work / "bare"
    port = free_port()
    script = Path(__file__).with_name("bare_pynetdicom_scp.py")
    return _server_process([sys.executable, str(script), str(port), str(out)], port, "BARE", out)


def durable_writes_shim() -> Path | None:
    """``bench/durable_writes.c`` built into ``.bench/`` (None where gcc is missing)."""
    source = Path(__file__).with_name("durable_writes.c")
    built = CACHE / "durable_writes.so"
    if built.exists() and built.stat().st_mtime >= source.stat().st_mtime:
        return built
    if shutil.which("gcc") is None:
        return None
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(built), str(source), "-ldl"], check=True
    )
    return built


@contextmanager
def orthanc_target(work: Path) -> Iterator[Receiver]:
    with OrthancServer(work / "orthanc") as orthanc:
        yield orthanc.dicom_port, orthanc.aet, lambda: len(orthanc.instances())


def push(
    port: int, called_ae: str, files: Sequence[Path], associations: int, nodelay: bool = True
) -> float:
    """Seconds for ``associations`` concurrent storescu processes to send ``files``
    (``nodelay``: storescu with TCP_NODELAY=1, so no receiver waits on Nagle's algorithm)."""
    env = nodelay_env() if nodelay else {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    groups = [list(files[i::associations]) for i in range(associations)]
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", called_ae, "-aet", "BENCH", "127.0.0.1", str(port), *group],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        for group in groups
    ]
    failures = []
    for sender in senders:
        _, err = sender.communicate(timeout=900)
        if sender.returncode != 0:
            failures.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError("storescu failed:\n" + "\n".join(failures))
    return elapsed


def measure(
    name: str,
    target: Target,
    files: Sequence[Path],
    associations: int,
    results: dict,
    nodelay: bool = True,
) -> None:
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="run-") as tmp:
        with target(Path(tmp), associations) as (port, called_ae, held):
            seconds = push(port, called_ae, files, associations, nodelay)
            # every instance must be held (rtauto's index rows follow the success status
            # within tens of milliseconds; the files were durable before it)
            deadline = time.monotonic() + 30
            while (stored := held()) < len(files) and time.monotonic() < deadline:
                time.sleep(0.05)
        if stored < len(files):
            raise RuntimeError(f"{name} holds {stored} of {len(files)} instances after the push")
    rate = len(files) / seconds
    results.setdefault((name, associations if nodelay else "nagle"), []).append(rate)
    sender = "" if nodelay else ", sender without TCP_NODELAY"
    print(
        f"  {name:<22} {associations} assoc  {rate:8.1f} images/s  ({seconds:.2f} s{sender})",
        flush=True,
    )


def measure_job_start_latency(series_count: int = 5, quiet: float = 1.0) -> float:
    """Median seconds from the last instance received to the job's start, beyond the
    workflow's quiet period: the daemon (in this process, SCP on a free port) receives
    ``series_count`` small CT series with storescu, one after the other."""
    from rtauto.daemon import Daemon
    from rtauto.testing import storescu

    with tempfile.TemporaryDirectory(prefix="rtauto-latency-") as tmp:
        work = Path(tmp)
        (work / "workflows").mkdir()
        (work / "out").mkdir()
        (work / "workflows" / "latency.yaml").write_text(
            "name: latency\n"
            "trigger: {modality: CT}\n"
            f"completion: {{series_quiet: {quiet}}}\n"
            "steps:\n"
            "  - id: save\n"
            "    uses: route.folder\n"
            f"    with: {{path: {work / 'out'}}}\n"
        )
        settings = Settings(
            home=work / "home",
            workflows_dir=work / "workflows",
            scp={"port": 0, "processes": 2},
            executor={"workers": 1, "poll_seconds": 0.2},
        )
        daemon = Daemon(settings)
        daemon.start()
        latencies = []
        try:
            for n in range(series_count):
                series = write_ct_series(work / f"ct{n}", rows=64, cols=64, slices=10)
                storescu(daemon.scp_port, series.files)
                store = daemon.store
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    jobs = [
                        j for j in store.list_jobs() if j.series_uid == series.series_instance_uid
                    ]
                    if jobs and jobs[0].started_at:
                        break
                    time.sleep(0.05)
                else:
                    raise RuntimeError("the latency job did not start within 120 s")
                last = max(
                    i.received_at for i in store.instances_of_series(series.series_instance_uid)
                )
                latencies.append(jobs[0].started_at - last - quiet)
                print(
                    f"  series {n + 1}: job started {latencies[-1]:.2f} s after the quiet period",
                    flush=True,
                )
        finally:
            daemon.stop()
    return statistics.median(latencies)


def _median_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="40 slices, one round (smoke run)")
    parser.add_argument(
        "--processes",
        type=int,
        default=ScpSettings().processes,
        help="rtauto's receiving processes (default: the configuration's default)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.rounds = 40, 1
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            print(f"{tool} is not installed (make install installs it)", file=sys.stderr)
            return 2
    CACHE.mkdir(exist_ok=True)
    files = ct_series(args.slices)

    def rtauto(work: Path, associations: int) -> AbstractContextManager[Receiver]:
        return rtauto_target(work, args.processes)

    def storescp(work: Path, associations: int) -> AbstractContextManager[Receiver]:
        return storescp_target(work, fork=associations > 1)

    def orthanc(work: Path, associations: int) -> AbstractContextManager[Receiver]:
        return orthanc_target(work)

    def bare(work: Path, associations: int) -> AbstractContextManager[Receiver]:
        return bare_pynetdicom_target(work)

    targets: list[tuple[str, Target]] = [
        ("rtauto", rtauto),
        ("storescp", storescp),
        ("orthanc", orthanc),
        ("bare pynetdicom", bare),
    ]
    shim = durable_writes_shim()
    if shim is not None:

        def durable_storescp(work: Path, associations: int) -> AbstractContextManager[Receiver]:
            return storescp_target(work, fork=associations > 1, preload=shim)

        targets.append(("storescp, durable", durable_storescp))
    else:
        print("gcc not found: storescp with durable writes is left out", flush=True)
    results: dict[tuple[str, int], list[float]] = {}
    print(
        f"{len(files)} CT slices 512x512, {args.rounds} round(s), "
        f"rtauto receiving processes: {args.processes}",
        flush=True,
    )
    for round_no in range(args.rounds):
        order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
        print(f"round {round_no + 1}: {', '.join(name for name, _ in order)}", flush=True)
        for associations in (1, CONCURRENCY):
            for name, target in order:
                measure(name, target, files, associations, results)
        # context, not a target: a sender that keeps Nagle's algorithm on, as many do
        for name, target in order:
            if name in ("rtauto", "storescp"):
                measure(name, target, files, 1, results, nodelay=False)

    def median(name: str, associations: int | str) -> float:
        return statistics.median(results[(name, associations)])

    print("\nmedian images/s")
    for associations in (1, CONCURRENCY):
        label = "storescp --fork" if associations > 1 else "storescp"
        print(
            f"  {associations} assoc: rtauto {median('rtauto', associations):.1f}  "
            f"{label} {median('storescp', associations):.1f}  "
            f"orthanc {median('orthanc', associations):.1f}"
        )
    print("ratios (median over rounds of the per-round ratio; target in brackets)")
    for associations, reference, goal in (
        (1, "storescp", 0.6),
        (CONCURRENCY, "storescp", 1.0),
        (1, "orthanc", 2.0),
        (CONCURRENCY, "orthanc", 2.0),
    ):
        ratios = [
            ours / theirs
            for ours, theirs in zip(
                results[("rtauto", associations)], results[(reference, associations)], strict=True
            )
        ]
        label = "storescp --fork" if reference == "storescp" and associations > 1 else reference
        value = statistics.median(ratios)
        verdict = "ok" if value >= goal else "BELOW TARGET"
        print(
            f"  rtauto / {label:<15} {associations} assoc: {value:5.2f}x  "
            f"[>= {goal}x] {verdict}   rounds: {', '.join(f'{r:.2f}' for r in ratios)}"
        )
    nagle = _median_ratio(results[("rtauto", "nagle")], results[("storescp", "nagle")])
    print(
        f"  context, sender without TCP_NODELAY, 1 assoc: rtauto "
        f"{median('rtauto', 'nagle'):.1f} images/s, storescp {median('storescp', 'nagle'):.1f}"
        f" ({nagle:.2f}x; storescp waits on delayed ACKs, rtauto does not)"
    )
    if shim is not None:
        for associations in (1, CONCURRENCY):
            durable = results[("storescp, durable", associations)]
            ours = _median_ratio(results[("rtauto", associations)], durable)
            cost = _median_ratio(durable, results[("storescp", associations)])
            print(
                f"  context, storescp{' --fork' if associations > 1 else ''} with durable writes "
                f"(LD_PRELOAD), {associations} assoc: {statistics.median(durable):.1f} images/s, "
                f"{cost:.2f}x plain storescp; rtauto / it: {ours:.2f}x"
            )
    for associations in (1, CONCURRENCY):
        bare_rates = results[("bare pynetdicom", associations)]
        label = "storescp --fork" if associations > 1 else "storescp"
        print(
            f"  context, the issue's reference (bare pynetdicom handler, one process, fdatasync)"
            f", {associations} assoc: {statistics.median(bare_rates):.1f} images/s, "
            f"{_median_ratio(bare_rates, results[('storescp', associations)]):.2f}x {label}; "
            f"rtauto / it: {_median_ratio(results[('rtauto', associations)], bare_rates):.2f}x"
        )
    try:
        latency = measure_job_start_latency()
        print(f"median job start latency beyond the quiet period: {latency:.2f} s")
    except RuntimeError as exc:
        print(f"job start latency: not measured ({exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
