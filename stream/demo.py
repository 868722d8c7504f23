"""`streamrec demo` (`make demo`): the whole pipeline on the embedded broker, live.

broker → topics → synthetic data → train (progress bar) → export bundle → processor →
replay at a steady rate (with a little malformed input) → live view → clean shutdown.
Every child process is stopped in `finally`, whatever happens; nothing is left running.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from export.bundle import load_bundle
from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.watch import Watcher, run_watch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path(".demo")
    duration_s: float = 60.0  # live view; the demo ends by itself
    rate: float = 300.0  # replayed events/s: enough to see lists change, little enough to read
    train_seconds: float = 60.0  # the training budget (≤ 90 s with start-up on 2 cores)
    partitions: int = 6
    bad_ratio: float = 0.005  # a malformed record now and then shows the dead-letter path
    group: str = "streamrec-demo"


def _streamrec(*args: str) -> list[str]:
    return [sys.executable, "-m", "stream", *args]


def _step(console: Console, title: str) -> None:
    console.rule(f"[bold]{title}")


def _stop_process(proc: subprocess.Popen[bytes], name: str, timeout_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop within %ss; killing it", name, timeout_s)
        proc.kill()
        proc.wait()


def _prepare_bundle(config: DemoConfig, console: Console) -> Path:
    data, train_dir, bundle = (config.workdir / n for n in ("data", "train", "bundle"))
    _step(console, "1/4 synthetic catalogue and click stream")
    subprocess.run(_streamrec("generate", "--out", str(data)), check=True)
    _step(console, f"2/4 training SASRec (budget {config.train_seconds:.0f}s)")
    subprocess.run(
        _streamrec(
            "train",
            "--data",
            f"synthetic:{data}",
            "--out",
            str(train_dir),
            "--max-seconds",
            str(config.train_seconds),
        ),
        check=True,
    )
    _step(console, "3/4 export to an ONNX bundle")
    subprocess.run(
        _streamrec("export", "--checkpoint", str(train_dir / "ckpt.pt"), "--out", str(bundle)),
        check=True,
    )
    return bundle


def run_demo(config: DemoConfig) -> int:
    console = Console()
    config.workdir.mkdir(parents=True, exist_ok=True)
    stopping: list[int] = []
    with ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker())
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        topics = TopicSettings(partitions=config.partitions)
        create_topics(kafka, topics)
        console.print(f"embedded broker on {broker.bootstrap_servers}, topics ready")
        bundle = _prepare_bundle(config, console)

        _step(console, "4/4 processor + replay + live view")
        common = ["--bootstrap-servers", broker.bootstrap_servers]
        state_dir = config.workdir / f"state-{int(time.time())}"
        proc_log = (config.workdir / "processor.log").open("wb")
        stack.callback(proc_log.close)
        processor = subprocess.Popen(
            _streamrec(
                "run", *common, "--bundle", str(bundle), "--state-dir", str(state_dir),
                "--group", config.group,
            ),
            stdout=proc_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        stack.callback(_stop_process, processor, "processor")
        replay_log = (config.workdir / "replay.log").open("wb")
        stack.callback(replay_log.close)
        replayer = subprocess.Popen(
            _streamrec(
                "replay", *common, "--source", str(config.workdir / "data"),
                "--rate", str(config.rate), "--bad-ratio", str(config.bad_ratio),
            ),
            stdout=replay_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        stack.callback(_stop_process, replayer, "replay")

        def on_signal(signum: int, frame: object) -> None:
            stopping.append(signum)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        titles = load_bundle(bundle).title_map()
        watcher = Watcher(kafka, topics, config.group)
        state = run_watch(
            watcher,
            titles,
            config.duration_s,
            console,
            should_stop=lambda: bool(stopping) or processor.poll() is not None,
        )
        if processor.poll() is not None:
            console.print(f"[red]processor exited with {processor.returncode}; see processor.log")
            return 1
    console.rule("[bold]demo finished")
    console.print(
        f"outputs {state.outputs:,}, dead letters {sum(state.dlq.values())}, "
        f"final lag {state.total_lag}, latency p50 {state.latency_p(0.5):.0f} ms "
        f"p99 {state.latency_p(0.99):.0f} ms; logs in {config.workdir}/"
    )
    return 0
