"""Dataset annotation loaders on tiny fixtures in the real formats (tests/fixtures/datasets)."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path

import av
import numpy as np
import pytest

from tb_reranker.data import LOADERS, VideoTextDataset, load_dataset
from tb_reranker.data.lsmdc import lsmdc_movie
from tb_reranker.errors import InvalidInputError, NotFoundError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "datasets"


@functools.cache
def _clip_bytes(suffix: str) -> bytes:
    """A real 4-frame 32x32 video in the container of ``suffix`` (encoded once per suffix)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"clip{suffix}"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for i in range(4):
                image = np.full((32, 32, 3), 40 * i, dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return path.read_bytes()


def _write_clip(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_clip_bytes(path.suffix))
    return path


def _copy_fixture(name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    return root


def _check_consistent(dataset: VideoTextDataset) -> None:
    """pairs / texts / text_to_video / texts_per_video agree with each other."""
    pairs = dataset.pairs()
    assert [text for text, _ in pairs] == dataset.texts
    assert [index for _, index in pairs] == dataset.text_to_video
    for video_index, text_indices in enumerate(dataset.texts_per_video):
        assert text_indices, "every video has a text"
        assert all(dataset.text_to_video[j] == video_index for j in text_indices)
    assert sum(map(len, dataset.texts_per_video)) == len(pairs)


# ---------------------------------------------------------------------------------- MSR-VTT


def test_msrvtt_1ka_test_uses_jsfusion_sentences(tmp_path: Path) -> None:
    videos_dir = tmp_path / "vids"
    for video_id in ("video7579", "video7010"):
        _write_clip(videos_dir / f"{video_id}.mp4")
    dataset = load_dataset("msrvtt", FIXTURES / "msrvtt", "test", videos_dir=videos_dir)
    assert dataset.name == "msrvtt" and dataset.split == "test"
    assert dataset.video_ids == ["video7579", "video7010"]  # CSV order
    assert dataset.videos[0].captions == (
        "a girl wearing red top and black trouser is putting a sweater on a dog",
    )
    assert dataset.videos[1].captions == ("people sit at a table, eating",)  # quoted comma
    assert dataset.videos_paths == [
        str(videos_dir / "video7579.mp4"),
        str(videos_dir / "video7010.mp4"),
    ]
    assert dataset.missing == []
    assert dataset.pairs() == [
        (dataset.videos[0].captions[0], 0),
        (dataset.videos[1].captions[0], 1),
    ]
    _check_consistent(dataset)


def test_msrvtt_train_and_official_splits_take_captions_from_data_json() -> None:
    root = FIXTURES / "msrvtt"
    train = load_dataset("msrvtt", root, "train", check_files=False)
    assert train.video_ids == ["video0", "video1", "video6513"]
    assert train.videos[0].captions == (
        "a car is shown",
        "a group is dancing",
        "a man drives a vehicle through the countryside",
    )
    assert len(train.texts) == 3 + 2 + 2
    assert train.texts_per_video == [[0, 1, 2], [3, 4], [5, 6]]
    assert load_dataset("msrvtt", root, "train7k", check_files=False).video_ids == [
        "video0",
        "video1",
    ]
    assert load_dataset("msrvtt", root, "val", check_files=False).video_ids == ["video6513"]
    full = load_dataset("msrvtt", root, "test_full", check_files=False)
    assert full.video_ids == ["video7010", "video7579"]
    assert full.videos[1].captions[1] == "a dog gets dressed"
    _check_consistent(full)


def test_msrvtt_missing_videos_are_reported_once(tmp_path: Path, caplog) -> None:
    videos_dir = tmp_path / "vids"
    _write_clip(videos_dir / "video0.mp4")
    _write_clip(videos_dir / "video1.avi")  # not the conventional .mp4: found by extension
    with caplog.at_level(logging.WARNING, logger="tb_reranker.data"):
        dataset = load_dataset("msrvtt", FIXTURES / "msrvtt", "train", videos_dir=videos_dir)
    assert dataset.video_ids == ["video0", "video1"]
    assert dataset.videos[1].path.endswith("video1.avi")
    assert dataset.missing == ["video6513"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 of 3" in warnings[0].getMessage() and "video6513" in warnings[0].getMessage()
    # check_files=False keeps every video at its first conventional path and reports nothing
    unchecked = load_dataset(
        "msrvtt", FIXTURES / "msrvtt", "train", videos_dir=videos_dir, check_files=False
    )
    assert unchecked.missing == [] and len(unchecked) == 3
    assert unchecked.videos[2].path == str(videos_dir / "video6513.mp4")


def test_msrvtt_default_videos_dir_and_aliases(tmp_path: Path) -> None:
    root = _copy_fixture("msrvtt", tmp_path)
    _write_clip(root / "MSRVTT_Videos" / "video7579.mp4")
    dataset = load_dataset("MSR-VTT", root)  # alias; default split "test"
    assert dataset.videos_dir == str(root / "MSRVTT_Videos")
    assert dataset.video_ids == ["video7579"] and dataset.missing == ["video7010"]
    assert dataset.summary()["num_missing"] == 1


# ---------------------------------------------------------------------------------- MSVD


def test_msvd_joins_caption_tokens(tmp_path: Path) -> None:
    root = _copy_fixture("msvd", tmp_path)
    _write_clip(root / "YouTubeClips" / "-8y1Q0rA3n8_108_115.avi")
    _write_clip(root / "YouTubeClips" / "00jrXRMlZOY_0_10.avi")
    dataset = load_dataset("msvd", root, "test")
    assert dataset.video_ids == ["-8y1Q0rA3n8_108_115", "00jrXRMlZOY_0_10"]
    assert dataset.videos[0].captions == (
        "a woman is slicing an onion",
        "someone is cutting onions",
        "a lady chops vegetables",
    )
    assert dataset.texts_per_video == [[0, 1, 2], [3, 4]]
    assert dataset.videos[1].path == str(root / "YouTubeClips" / "00jrXRMlZOY_0_10.avi")
    train = load_dataset("msvd", root, "train", check_files=False)
    assert train.videos[0].captions[0] == "a squirrel is eating a peanut in it's shell"
    _check_consistent(dataset)


def test_msvd_list_id_without_captions_is_malformed(tmp_path: Path) -> None:
    root = _copy_fixture("msvd", tmp_path)
    (root / "val_list.txt").write_text("not_a_video_1_2\n")
    with pytest.raises(InvalidInputError, match=r"raw-captions\.pkl.*not_a_video_1_2"):
        load_dataset("msvd", root, "val", check_files=False)


# ---------------------------------------------------------------------------------- DiDeMo


def test_didemo_paragraphs_and_extension_resolution(tmp_path: Path) -> None:
    videos_dir = tmp_path / "vids"
    _write_clip(videos_dir / "54322086@N00_2408598493_2f9e1a1d2e.mov")  # original name
    _write_clip(videos_dir / "10015567@N08_3655084291_d8b58466fa.mp4")  # converted copy
    dataset = load_dataset("didemo", FIXTURES / "didemo", "test", videos_dir=videos_dir)
    # test_list.txt restricts the split (the third annotated video is not listed)
    assert dataset.video_ids == [
        "54322086@N00_2408598493_2f9e1a1d2e.mov",
        "10015567@N08_3655084291_d8b58466fa.avi",
    ]
    assert dataset.videos[0].captions == (
        "the little girl jumps back up after falling girl in pink walks out of frame",
    )
    assert dataset.videos[1].captions == ("a dog runs toward the camera the dog sits down",)
    assert dataset.videos[1].path == str(videos_dir / "10015567@N08_3655084291_d8b58466fa.mp4")
    assert dataset.texts_per_video == [[0], [1]]


def test_didemo_without_list_file_uses_every_annotated_video(tmp_path: Path) -> None:
    root = _copy_fixture("didemo", tmp_path)
    (root / "test_list.txt").unlink()
    dataset = load_dataset("didemo", root, "test", check_files=False)
    assert len(dataset) == 3
    assert dataset.videos[2].captions == ("camera pans to the lake",)
    # no videos/ folder under root: the root itself is the default
    assert dataset.videos[2].path == str(root / "91724431@N05_8522110412_a3c58cce2b.mp4")
    with pytest.raises(NotFoundError, match="val_data.json"):
        load_dataset("didemo", root, "val", check_files=False)


# ---------------------------------------------------------------------------------- ActivityNet


def test_activitynet_paragraphs_and_both_file_namings(tmp_path: Path) -> None:
    videos_dir = tmp_path / "vids"
    _write_clip(videos_dir / "uqiMw7tQ1Cc.mp4")  # CLIP4Clip copies drop "v_"
    _write_clip(videos_dir / "v_bXdq2zI1Ms0.mkv")  # official downloader keeps it
    for split in ("val", "test"):  # both read val_1.json
        dataset = load_dataset(
            "activitynet", FIXTURES / "activitynet", split, videos_dir=videos_dir
        )
        assert dataset.video_ids == ["v_uqiMw7tQ1Cc", "v_bXdq2zI1Ms0"]
        assert dataset.missing == []
    assert dataset.videos[0].captions == (
        "A weight lifting tutorial is given. The coach helps the guy in red with the proper "
        "body placement and lifting technique.",
    )
    assert dataset.videos[0].path == str(videos_dir / "uqiMw7tQ1Cc.mp4")
    assert dataset.videos[1].path == str(videos_dir / "v_bXdq2zI1Ms0.mkv")
    train = load_dataset("activitynet", FIXTURES / "activitynet", "train", check_files=False)
    assert train.video_ids == ["v_QOlSCBRmfWY"] and len(train.texts) == 1


def test_activitynet_bad_ids_file(tmp_path: Path) -> None:
    root = _copy_fixture("activitynet", tmp_path)
    (root / "train_ids.json").write_text(json.dumps({"v_QOlSCBRmfWY": 1}))
    with pytest.raises(InvalidInputError, match=r"train_ids\.json.*list of video id"):
        load_dataset("activitynet", root, "train", check_files=False)


# ---------------------------------------------------------------------------------- VATEX


def test_vatex_official_files(tmp_path: Path) -> None:
    videos_dir = tmp_path / "vids"
    _write_clip(videos_dir / "Ptf_2VRj-V0_000122_000132.mp4")
    train = load_dataset("vatex", FIXTURES / "vatex", "train", videos_dir=videos_dir)
    assert train.video_ids == ["Ptf_2VRj-V0_000122_000132"]
    assert train.missing == ["Dm_BKaGXDgA_000004_000014"]
    assert train.videos[0].captions == (
        "People wearing harnesses using ropes to climb up a rock slope.",
        "A group of people are rock climbing on a cliff.",
    )  # English only
    test = load_dataset("vatex", FIXTURES / "vatex", "test", check_files=False)
    assert test.video_ids == ["G9zN5TTuGO4_000179_000189", "3qG4TJfWTT0_000020_000030"]
    assert test.texts_per_video == [[0, 1], [2, 3]]


def test_vatex_retrieval_split_list(tmp_path: Path) -> None:
    root = _copy_fixture("vatex", tmp_path)
    (root / "test_list.txt").write_text("3qG4TJfWTT0_000020_000030\nDm_BKaGXDgA_000004_000014\n")
    dataset = load_dataset("vatex", root, "test", check_files=False)
    assert dataset.video_ids == ["3qG4TJfWTT0_000020_000030", "Dm_BKaGXDgA_000004_000014"]
    assert dataset.videos[1].captions[1] == "Someone stirs batter with a whisk."
    (root / "test_list.txt").write_text("zzzzzzzzzzz_000000_000010\n")
    with pytest.raises(InvalidInputError, match=r"test_list\.txt.*zzzzzzzzzzz_000000_000010"):
        load_dataset("vatex", root, "test", check_files=False)


# ---------------------------------------------------------------------------------- LSMDC


def test_lsmdc_movie_folders(tmp_path: Path) -> None:
    videos_dir = tmp_path / "avi"
    _write_clip(videos_dir / "1004_Juno" / "1004_Juno_00.00.32.849-00.00.36.057.avi")
    _write_clip(videos_dir / "1004_Juno" / "1004_Juno_00.01.12.070-00.01.15.393.avi")
    _write_clip(videos_dir / "3001_21_JUMP_STREET_00.00.46.520-00.00.50.066.avi")  # flat layout
    dataset = load_dataset("lsmdc", FIXTURES / "lsmdc", "test", videos_dir=videos_dir)
    assert len(dataset) == 3 and dataset.missing == []
    assert dataset.videos[0].captions == ("SOMEONE walks along a suburban street.",)
    assert dataset.videos[1].path == str(
        videos_dir / "1004_Juno" / "1004_Juno_00.01.12.070-00.01.15.393.avi"
    )
    assert dataset.videos[2].path == str(
        videos_dir / "3001_21_JUMP_STREET_00.00.46.520-00.00.50.066.avi"
    )
    assert lsmdc_movie("3001_21_JUMP_STREET_00.00.46.520-00.00.50.066") == "3001_21_JUMP_STREET"
    assert lsmdc_movie("0001_American_Beauty_00.00.51.926-00.00.54.129") == "0001_American_Beauty"


def test_lsmdc_repeated_clip_ids_merge_and_bad_lines_fail(tmp_path: Path) -> None:
    train = load_dataset("lsmdc", FIXTURES / "lsmdc", "train", check_files=False)
    assert train.video_ids == [
        "0001_American_Beauty_00.00.51.926-00.00.54.129",
        "0001_American_Beauty_00.01.02.000-00.01.05.500",
    ]
    assert train.videos[0].captions == ("SOMEONE looks out of the window.", "He smiles.")
    assert train.videos[0].path.endswith(
        "0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129.avi"
    )
    root = _copy_fixture("lsmdc", tmp_path)
    with (root / "LSMDC16_annos_training.csv").open("a") as handle:
        handle.write("0001_American_Beauty_00.02.00.000-00.02.01.000\t00.02.00.000\tbroken\n")
    with pytest.raises(InvalidInputError, match=r"LSMDC16_annos_training\.csv: line 4: expected 6"):
        load_dataset("lsmdc", root, "train", check_files=False)


# ---------------------------------------------------------------------------------- folder


def test_folder_format_with_real_videos(tmp_path: Path) -> None:
    root = _copy_fixture("folder", tmp_path)
    for i in range(5):
        if i != 4:  # synth_00004 missing
            _write_clip(root / "videos" / f"synth_{i:05d}.mp4")
    test = load_dataset("generic", root, "test")
    assert test.name == "generic"
    assert test.video_ids == ["synth_00003"] and test.missing == ["synth_00004"]
    item = test.videos[0]
    assert (item.start_s, item.end_s) == (0.5, 2.0)
    assert item.captions == ("a yellow star spins", "a star turns around")
    with av.open(item.path) as container:  # the resolved path is a decodable video
        assert sum(1 for _ in container.decode(video=0)) == 4
    everything = load_dataset("synth", root, "all")
    assert len(everything) == 4 and everything.missing == ["synth_00004"]
    assert load_dataset("folder", root, "train").video_ids == ["synth_00000", "synth_00001"]
    _check_consistent(everything)
    # videos_dir override: file names from "path", looked up in the other folder
    other = tmp_path / "elsewhere"
    _write_clip(other / "synth_00004.mp4")
    moved = load_dataset("folder", root, "test", videos_dir=other)
    assert moved.video_ids == ["synth_00004"] and moved.missing == ["synth_00003"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"video_id": "a", "captions": ["x"], "split": "test"', "line 6: invalid JSON"),
        ('{"video_id": "synth_00000", "captions": ["x"], "split": "test"}', "duplicate video_id"),
        ('{"video_id": "b", "captions": "x", "split": "test"}', '"captions" must be a list'),
        ('{"video_id": "c", "captions": [""], "split": "test"}', "has no caption"),
        ('{"video_id": "d", "captions": ["x"], "split": "test", "path": "../d.mp4"}', "inside"),
        ('{"video_id": "e", "captions": ["x"]}', '"split" must be a string'),
        ('{"video_id": "f", "captions": ["x"], "split": "test", "start_s": -1}', "start_s"),
        ('["not", "an", "object"]', "expected a JSON object"),
    ],
)
def test_folder_malformed_lines(tmp_path: Path, line: str, problem: str) -> None:
    root = _copy_fixture("folder", tmp_path)
    with (root / "captions.jsonl").open("a") as handle:
        handle.write(line + "\n")
    with pytest.raises(InvalidInputError, match="captions.jsonl") as excinfo:
        load_dataset("folder", root, "test", check_files=False)
    assert problem in str(excinfo.value)


# ---------------------------------------------------------------------------------- errors


def test_unknown_dataset_and_split_name_the_choices(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="unknown dataset 'kinetics'") as excinfo:
        load_dataset("kinetics", tmp_path)
    for name in LOADERS:
        assert name in str(excinfo.value)
    with pytest.raises(InvalidInputError, match=r"no split 'dev'.*'train9k'"):
        load_dataset("msrvtt", FIXTURES / "msrvtt", "dev")


def test_missing_root_annotation_and_videos_dir(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="dataset directory not found"):
        load_dataset("msvd", tmp_path / "nope")
    with pytest.raises(NotFoundError, match="test_list.txt"):
        load_dataset("msvd", tmp_path)
    with pytest.raises(NotFoundError, match="videos directory not found"):
        load_dataset("msvd", FIXTURES / "msvd", videos_dir=tmp_path / "nope")


@pytest.mark.parametrize(
    ("name", "split", "file", "content", "problem"),
    [
        ("msrvtt", "train", "MSRVTT_data.json", '{"videos": [], "sentences": [', "invalid JSON"),
        ("msrvtt", "train", "MSRVTT_data.json", '{"videos": []}', '"sentences" list'),
        (
            "msrvtt",
            "test",
            "MSRVTT_JSFUSION_test.csv",
            "key,vid_key,video\nret0,msr1,video1\n",
            "column",
        ),
        ("msrvtt", "train", "MSRVTT_train.9k.csv", "video_id\nvideo404\n", "no caption"),
        ("didemo", "test", "test_data.json", '{"video": "x"}', "list of moment"),
        ("didemo", "test", "test_data.json", '[{"video": "x.mov", "description": 3}]', "string"),
        ("activitynet", "val", "val_1.json", '{"v_x": {"sentences": "a"}}', '"sentences" list'),
        ("vatex", "train", "vatex_training_v1.0.json", '[{"videoID": "x"}]', '"enCap" list'),
        ("msvd", "test", "raw-captions.pkl", None, "expected a dict"),
    ],
)
def test_malformed_annotation_files_name_file_and_problem(
    tmp_path: Path, name: str, split: str, file: str, content: str | None, problem: str
) -> None:
    root = _copy_fixture(name, tmp_path)
    if content is None:  # a well-formed pickle of the wrong shape
        import pickle

        (root / file).write_bytes(pickle.dumps(["not", "a", "dict"]))
    else:
        (root / file).write_text(content)
    with pytest.raises(InvalidInputError) as excinfo:
        load_dataset(name, root, split, check_files=False)
    message = str(excinfo.value)
    assert file in message and problem in message


def test_all_videos_missing_gives_one_warning_with_a_hint(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tb_reranker.data"):
        dataset = load_dataset("msvd", FIXTURES / "msvd", "test", videos_dir=tmp_path)
    assert len(dataset) == 0 and dataset.missing == ["-8y1Q0rA3n8_108_115", "00jrXRMlZOY_0_10"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 2" in warnings[0] and "videos_dir" in warnings[0]
