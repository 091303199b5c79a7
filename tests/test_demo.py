"""`emoq demo --quick`: the README's main job in CI's reduced-time mode, every stage for real.

The first run synthesizes the corpus, trains stage 1 and stage 2, exports and verifies the
bundle, serves it on 127.0.0.1 and streams the demo utterances; the second run must reuse the
cached bundle and only serve and query it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from export.demo import DEMO_PRESETS

pytestmark = pytest.mark.slow


def run_demo(cache: Path) -> str:
    env = {**os.environ, "EMOQ_CACHE": str(cache), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "emoq_serve.cli", "demo", "--quick"],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def check_conversation_timeline(output: str) -> None:
    """The one-minute conversation, streamed without transcripts: ASR supplies them, every turn
    has its segment and each segment's line shows its ground truth beside it."""
    section = output[output.index("conversation timeline"):].splitlines()
    segments = [line for line in section[2:] if line[:1].isdigit()]
    summary = re.search(r"^conversation: (\d+) segment\(s\) for (\d+) turn\(s\); labels matching the ground "
                        r"truth: \d+/\d+; transcripts from asr: (\d+)$", output, re.MULTILINE)
    assert summary and int(summary[2]) >= 10 and summary[1] == summary[2] == summary[3], section
    assert len(segments) == int(summary[1]) and all("(asr)" in line and " | " in line for line in segments), section
    assert "(missed" not in output and "false segment" not in output, section


def test_demo_builds_serves_and_reuses_its_bundle(tmp_path: Path) -> None:
    first = run_demo(tmp_path)
    for step in ("synthesizing", "stage 1", "stage 2", "export", "starting the gRPC server", "stopping the server"):
        assert step in first, f"step {step!r} missing from the demo output"
    rows = [line for line in first.splitlines() if line.startswith("demo-")]
    assert len(rows) == 5, first  # one per emotion plus the prosody-only utterance
    assert all(" final " in row for row in rows)
    # The one-minute conversation, streamed without transcripts: ASR supplies them, every turn has
    # its segment and the timeline shows ground truth beside each.
    check_conversation_timeline(first)

    report = json.loads((tmp_path / "demo" / DEMO_PRESETS["quick"].key / "report.json").read_text())
    assert report["parity"]["posterior_max_abs"] < 1e-4
    assert report["stage2_test"]["wa"] > 0.4  # 4 classes: chance is 0.25

    second = run_demo(tmp_path)
    assert "building the demo bundle" not in second
    assert len([line for line in second.splitlines() if line.startswith("demo-")]) == 5
    check_conversation_timeline(second)


def test_llm_flag_picks_the_smollm2_build_and_refuses_quick() -> None:
    """`emoq demo --llm smollm2` builds its own cached bundle (the real LLM), never the toy one's."""
    smol, toy = DEMO_PRESETS["smollm2"], DEMO_PRESETS["full"]
    assert smol.preset == "smollm2" and smol.clips_per_class == toy.clips_per_class and smol.key != toy.key
    done = subprocess.run([sys.executable, "-m", "emoq_serve.cli", "demo", "--quick", "--llm", "smollm2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "argument --llm: not allowed with argument --quick" in done.stderr
