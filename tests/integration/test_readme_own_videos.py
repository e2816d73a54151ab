"""Every command of README.md's "Your own videos" section, in order, on tiny local CLIP weights
and real MP4 files (Milvus Lite and the LMDB store under ./tb_data, as a user gets them).

The commands are read from the README itself, so the section and this test cannot drift apart.
One substitution, and only it: ``--config vit-b-32 --pretrained openai`` (ViT-B/32 weights,
hundreds of MB from the network) becomes ``--config tiny --pretrained <a tiny open_clip
.safetensors file>``; ``--no-progress`` is appended where a command has it (quiet logs).
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
    text = README.read_text()
    section = text.split("\n## Your own videos\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the section has no bash block"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def _substituted(command: list[str], weights: Path) -> list[str]:
    args = list(command[1:])
    if args[0] == "init":
        args[args.index("--config") + 1] = "tiny"
        args[args.index("--pretrained") + 1] = str(weights)
    if args[0] in ("ingest", "train"):
        args.append("--no-progress")
    return args


def test_every_readme_command_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mp4_writer,
    tiny_clip,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tb_reranker.model import load_checkpoint

    commands = readme_commands()
    verbs = [c[1] for c in commands]
    assert all(c[0] == "tb" for c in commands)
    assert verbs == ["init", "ingest", "search", "train", "search"], verbs
    for name in ("TB_DATA_DIR", "TB_CHECKPOINT", "TB_MILVUS_URI", "TB_STORE", "TB_COLLECTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    weights = tiny_clip.save(tmp_path / "downloads" / "tiny_clip.safetensors")
    captions = []
    for i, (colour, words) in enumerate(
        zip(mp4_writer.colours, ["red", "green", "blue", "yellow"], strict=False)
    ):
        mp4_writer(tmp_path / "my_videos" / f"clip{i}.mp4", colour, frames=8 + 2 * i)
        captions.append(
            {
                "video_id": f"clip{i}",
                "path": f"clip{i}.mp4",
                "captions": [f"a {words} square moves right", f"a {words} box on grey"],
                "split": "train",
            }
        )
    (tmp_path / "my_videos" / "captions.jsonl").write_text(
        "".join(json.dumps(c) + "\n" for c in captions)
    )

    outputs = []
    for command in commands:
        args = _substituted(command, weights)
        code = main(args)
        out = capsys.readouterr()
        assert code == 0, (command, out.err)
        outputs.append(out.out)
        if args[0] == "init":  # the checkpoint holds the weights: the file is needed no more
            weights.unlink()

    # ingest decoded the four videos once
    assert "ingested 4" in outputs[1]
    zero_shot = load_checkpoint("models/zero-shot")
    trained = load_checkpoint("models/trained/epoch-5")
    # the swap needed no re-ingest: the vision side is the same, the query side was trained
    assert trained.vision_fingerprint() == zero_shot.vision_fingerprint()
    assert trained.query_fingerprint() != zero_shot.query_fingerprint()
    for output in (outputs[2], outputs[4]):
        assert output.count("clip") == 4  # every video found, by both checkpoints
    # the table row: ... delta, the moment (start-end s), the id
    zero_shot_deltas = re.findall(r"([+-]\d\.\d{4})\s+[\d.]+-[\d.]+s\s+clip", outputs[2])
    assert zero_shot_deltas and {float(d) for d in zero_shot_deltas} == {0.0}
