"""Every command of README.md's "Long videos" section, in order, as a user runs them: a fresh
folder, the embedded defaults (Milvus Lite and the LMDB store under ./tb_data), real MP4 files
from ``tb synth --long``, a zero-shot checkpoint made with ``tb init`` on tiny local CLIP
weights (the section's ``models/zero-shot``, from "Your own videos").

The commands are read from the README itself, so the section and this test cannot drift apart.
One substitution, and only it: ``--no-progress`` is appended where a command has it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tb_reranker.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[list[str]]:
    section = README.read_text().split("\n## Long videos\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the section has no bash block"
    commands = []
    for line in block.group(1).splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def test_every_long_video_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_clip, capsys
) -> None:
    commands = readme_commands()
    assert all(c[0] == "tb" for c in commands)
    assert [c[1] for c in commands] == ["synth", "ingest", "search", "search", "search", "eval"]
    for name in ("TB_DATA_DIR", "TB_CHECKPOINT", "TB_MILVUS_URI", "TB_STORE", "TB_COLLECTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    weights = tiny_clip.save(tmp_path / "tiny_clip.safetensors")
    init = ["init", "--config", "tiny", "--pretrained", str(weights), "--out", "models/zero-shot"]
    assert main(init) == 0
    outputs = []
    for command in commands:
        args = command[1:] + (["--no-progress"] if command[1] in ("synth", "ingest") else [])
        code = main(args)
        out = capsys.readouterr()
        assert code == 0, (command, out.err)
        outputs.append(out.out)
    synth, ingest, as_json, moments, inside, evaluation = outputs

    annotations = json.loads((tmp_path / "data/long/moments.json").read_text())
    assert len(annotations) == 4 and all(v["duration"] > 30 for v in annotations.values())
    # every file is longer than 30 s: each was cut, one row per moment
    found = re.search(r"ingested 4 .* as (\d+) segments", ingest)
    assert found and int(found.group(1)) > 4, ingest

    hits = json.loads(as_json)[0]["hits"]
    assert sorted(h["id"] for h in hits) == sorted(annotations)  # limit counts videos
    for hit in hits:
        duration = annotations[hit["id"]]["duration"]
        assert 0 <= hit["start_s"] < hit["end_s"] <= duration + 1e-3
        assert hit["moments"][0]["start_s"] == hit["start_s"]  # the best moment first
        scores = [m["score"] for m in hit["moments"]]
        assert scores == sorted(scores, reverse=True) and 1 <= len(scores) <= 3
    # moments as hits: more rows than videos, each naming its span
    assert len(re.findall(r"\d+\.\d-\d+\.\ds\s+long_", moments)) > len(annotations)
    # inside one video: only that video
    assert "long_000001" in inside and not re.search(r"long_00000[023]", inside)

    report = json.loads(evaluation)
    for view in ("broad", "reranked"):
        assert report[view]["video"]["num_queries"] == sum(
            len(v["sentences"]) for v in annotations.values()
        )
        assert 0 <= report[view]["moment"]["R1@IoU0.5"] <= 100
    assert report["segmentation"]["segments"] == int(found.group(1))
