"""The streaming ``shards`` source: formats, locations, resume, rank/worker splits, bad data."""

import functools
import gzip
import http.server
import json
import os
import shutil
import threading
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka.data import DataConfig, DataConfigError, DataFailureError, build_dataset, make_loader, streaming
from matryoshka.data.streaming import SAMPLE_BITS

from . import synthetic as syn


def sample_members(shard: int, count: int, size=(20, 16)) -> list[tuple[str, bytes]]:
    members = []
    for i in range(count):
        key = f"s{shard:03d}/{i:04d}"
        members.append((f"{key}.png", syn.encode(syn.solid_image("RGB", size, (shard * 40 % 256, i * 9 % 256, 7)))))
        members.append((f"{key}.cls", str((shard + i) % 3).encode()))
        members.append((f"{key}.txt", f"shard {shard} sample {i}".encode()))
    return members


def make_shards(folder: Path, counts: list[int]) -> str:
    for s, n in enumerate(counts):
        syn.write_tar(folder / f"shard-{s:03d}.tar", sample_members(s, n))
    return str(folder / f"shard-{{000..{len(counts) - 1:03d}}}.tar")


def config(path: str, **kw) -> DataConfig:
    return DataConfig(**{"source": "shards", "path": path, "resolution": 8, "captions": True, **kw})


def stream_ids(cfg, steps, batch_size=4, start_step=0, seed=3, **kw) -> list[list[int]]:
    loader = make_loader(build_dataset(cfg), batch_size=batch_size, seed=seed, start_step=start_step, **kw)
    try:
        return [next(loader)["index"].tolist() for _ in range(steps)]
    finally:
        loader.close()


def all_ids(counts) -> set[int]:
    return {(s << SAMPLE_BITS) | i for s, n in enumerate(counts) for i in range(n)}


def test_samples_labels_captions_and_json(tmp_path):
    syn.write_tar(
        tmp_path / "a.tar",
        [
            ("x/1.jpg", syn.encode(syn.solid_image("RGB", (24, 16), (255, 0, 0)), "JPEG")),
            ("x/1.cls", b"2"),
            ("x/1.json", json.dumps({"caption": " red "}).encode()),
            ("x/2.png", syn.encode(syn.solid_image("RGB", (16, 16), (0, 0, 255)))),
            ("x/2.cls", b"0"),
            ("x/2.txt", b"blue"),
        ],
    )
    ds = build_dataset(config(str(tmp_path / "a.tar"), label="cls", num_classes=3, shuffle_buffer=0))
    assert ds.class_names == ["0", "1", "2"] and ds.urls == [str(tmp_path / "a.tar")]
    batch = next(make_loader(ds, batch_size=2, seed=0, shuffle=False))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["label"].tolist() == [2, 0]
    assert batch["caption"] == ["red", "blue"] and batch["index"].tolist() == [0, 1]
    assert batch["image"][0, 0].mean() > 0.9 and batch["image"][1, 2].mean() > 0.9
    assert ds.describe(1) == f"{tmp_path / 'a.tar'}#1"


def test_one_epoch_reads_every_sample_once_local_gz_and_pipe(tmp_path):
    counts = [5, 3, 6, 4]
    make_shards(tmp_path, counts)
    for s in (1, 3):  # a compressed shard is read the same way
        plain = tmp_path / f"shard-{s:03d}.tar"
        with open(plain, "rb") as src, gzip.open(tmp_path / f"shard-{s:03d}.tar.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()
    spec = "::".join(
        [
            str(tmp_path / "shard-000.tar"),
            str(tmp_path / "shard-001.tar.gz"),
            f"pipe:cat {tmp_path / 'shard-002.tar'}",
            str(tmp_path / "shard-003.tar.gz"),
        ]
    )
    ids = [i for b in stream_ids(config(spec, shuffle_buffer=7), steps=6, batch_size=3) for i in b]  # one epoch
    assert sorted(ids) == sorted(all_ids(counts))
    assert sorted(streaming.shard_urls(str(tmp_path))) == [
        str(tmp_path / n) for n in ("shard-000.tar", "shard-001.tar.gz", "shard-002.tar", "shard-003.tar.gz")
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_next_unseen_sample(tmp_path, workers, monkeypatch):
    counts = [7, 5, 9, 6]
    cfg = config(make_shards(tmp_path, counts), shuffle_buffer=5)
    full = stream_ids(cfg, steps=14, batch_size=4, num_workers=workers)
    assert sorted(i for b in full for i in b)[:27] != [i for b in full for i in b][:27]  # shuffled
    assert full[:3] != stream_ids(cfg, 3, seed=4, num_workers=workers)
    loader = make_loader(build_dataset(cfg), batch_size=4, seed=3, num_workers=workers)
    for _ in range(9):
        next(loader)
    state = loader.state_dict()
    loader.close()
    assert state["step"] == 9 and state["shard_counts"]
    real, opened = streaming.open_shard, {}
    for resume_state in (state, None):  # with the checkpoint's shard counts, or by reading past them
        mine = opened[resume_state is None] = []
        monkeypatch.setattr(streaming, "open_shard", lambda url, mine=mine: mine.append(url) or real(url))
        resumed = make_loader(
            build_dataset(cfg), batch_size=4, seed=3, start_step=9, num_workers=workers, state=resume_state
        )
        try:
            assert [next(resumed)["index"].tolist() for _ in range(5)] == full[9:]
        finally:
            resumed.close()
    if workers == 0:  # shards known to be done are not opened again (workers open theirs in their own process)
        assert len(opened[False]) < len(opened[True]), opened


def test_ranks_split_shards_without_overlap_and_uneven_counts_keep_going(tmp_path):
    counts = [4, 6, 3, 5, 8]
    # shuffle_buffer=0: a window may mix the end of one epoch with the start of the next
    cfg = config(make_shards(tmp_path, counts), shuffle_buffer=0)
    seen = []
    for rank in range(2):
        ds = build_dataset(cfg)
        loader = make_loader(ds, batch_size=2, seed=5, rank=rank, world_size=2)
        mine = []
        while len(mine) < sum(counts):  # past the end of this rank's first epoch
            mine += next(loader)["index"].tolist()
        order = ds.shard_order(0)[rank::2]
        first_epoch = sum(counts[s] for s in order)
        seen.append(mine[:first_epoch])
        assert {i >> SAMPLE_BITS for i in mine[:first_epoch]} == set(order)
    assert sorted(seen[0] + seen[1]) == sorted(all_ids(counts))


def test_too_few_shards_for_the_readers_is_a_clear_error(tmp_path):
    cfg = config(make_shards(tmp_path, [3]))
    with pytest.raises(ValueError, match=r"1 shard.*2 readers"):
        next(make_loader(build_dataset(cfg), batch_size=2, seed=0, rank=1, world_size=2))


def test_ten_thousand_shard_pattern_starts_in_seconds(tmp_path, monkeypatch):
    make_shards(tmp_path / "real", [6])
    for s in range(10_000):  # links are cheap; what matters is that nothing walks all of them
        os.symlink(tmp_path / "real" / "shard-000.tar", tmp_path / f"big-{s:05d}.tar")
    opened = []
    real = streaming.open_shard
    monkeypatch.setattr(streaming, "open_shard", lambda url: opened.append(url) or real(url))
    start = time.perf_counter()
    ds = build_dataset(config(str(tmp_path / "big-{00000..09999}.tar"), shuffle_buffer=10))
    batch = next(make_loader(ds, batch_size=8, seed=0))
    elapsed = time.perf_counter() - start
    assert len(ds.urls) == 10_000 and batch["image"].shape[0] == 8
    assert len(opened) <= 3 and elapsed < 5, (len(opened), elapsed)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=tmp_path))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_shards_match_local_and_missing_ones_are_retried_and_counted(http_root):
    root, url = http_root
    counts = [4, 5, 3]
    make_shards(root, counts)
    # a small window: the default (1000) would read this tiny set ~80 times before the first batch
    local = stream_ids(config(str(root / "shard-{000..002}.tar"), shuffle_buffer=8), steps=3)
    remote = stream_ids(config(url + "/shard-{000..002}.tar", shuffle_buffer=8), steps=3)
    assert remote == local
    # a shard the server does not have: retried, then skipped and counted; the rest is read
    ds = build_dataset(config(url + "/shard-{000..003}.tar", retries=2, retry_delay=0.01, shuffle=False))
    loader = make_loader(ds, batch_size=4, seed=0, shuffle=False)
    ids = [i for _ in range(6) for i in next(loader)["index"].tolist()]
    assert set(ids) == all_ids(counts)
    assert ds.skipped["by_reason"] == {"unreadable_shard": 1} and "shard-003.tar" in ds.skip_report()


class FlakyHandler(QuietHandler):
    """Cuts the first download of each shard off half-way, as a dropped connection would."""

    cut: typing.ClassVar[set[str]] = set()

    def copyfile(self, source, outputfile):
        if self.path in self.cut:
            return super().copyfile(source, outputfile)
        self.cut.add(self.path)
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        self.close_connection = True


def test_dropped_connections_are_retried_and_resume_inside_the_shard(tmp_path):
    counts = [5, 6]
    make_shards(tmp_path, counts)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FlakyHandler, directory=tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000..001}}.tar"
        ds = build_dataset(config(url, retry_delay=0.01, shuffle_buffer=8))
        loader = make_loader(ds, batch_size=4, seed=3)
        remote = [next(loader)["index"].tolist() for _ in range(4)]
        assert remote == stream_ids(config(str(tmp_path / "shard-{000..001}.tar"), shuffle_buffer=8), steps=4)
        assert FlakyHandler.cut == {"/shard-000.tar", "/shard-001.tar"} and ds.skipped["total"] == 0
    finally:
        server.shutdown()


def test_bad_shards_and_members_are_skipped_and_counted(tmp_path):
    counts = [6, 6, 6]
    make_shards(tmp_path, counts)
    data = (tmp_path / "shard-001.tar").read_bytes()
    (tmp_path / "shard-001.tar").write_bytes(data[: len(data) // 2])  # truncated
    syn.write_tar(tmp_path / "shard-002.tar", [*sample_members(2, 5), ("s002/0005.png", syn.corrupt_bytes())])
    ds = build_dataset(config(str(tmp_path / "shard-{000..004}.tar"), shuffle=False))  # 003, 004 missing
    loader = make_loader(ds, batch_size=5, seed=0, shuffle=False)
    batches = [next(loader) for _ in range(4)]
    by_reason = ds.skipped["by_reason"]
    assert by_reason["unreadable_shard"] == 2 and by_reason["truncated_shard"] == 1
    assert by_reason["not_an_image"] == 1 or by_reason.get("corrupt") == 1
    ids = torch.cat([b["index"] for b in batches]).tolist()
    # the bad member keeps its place, filled with the previous good sample
    bad = ids.index((2 << SAMPLE_BITS) | 4) + 1
    assert ids[bad] == (2 << SAMPLE_BITS) | 4
    assert "skipped" in ds.skip_report()


def test_mostly_broken_data_stops_with_a_clear_error(tmp_path):
    make_shards(tmp_path, [2])
    cfg = config(str(tmp_path / "shard-{000..039}.tar"), shuffle=False)  # 39 of 40 missing
    loader = make_loader(build_dataset(cfg), batch_size=2, seed=0, shuffle=False)
    with pytest.raises(DataFailureError, match=r"failed on .* of .*unreadable_shard"):
        for _ in range(5):
            next(loader)


def test_text_embedding_cache_fills_on_the_fly_from_the_stream(tmp_path):
    from matryoshka.text import TextEmbeddingCache

    from .test_text_encoders import FakeEncoder

    cfg = config(make_shards(tmp_path / "shards", [5, 5]), shuffle_buffer=4)
    encoder = FakeEncoder()
    cache = TextEmbeddingCache(tmp_path / "cache", encoder, shard_size=4)
    loader = make_loader(build_dataset(cfg), batch_size=3, seed=0)
    captions = []
    for _ in range(4):
        batch = next(loader)
        captions += batch["caption"]
        assert cache.get(batch["caption"]).tokens.shape[0] == 3
    cache.flush()
    encoded = [c for call in encoder.calls for c in call]
    assert sorted(encoded) == sorted(set(captions))  # each caption computed once, when first seen
    assert len(list(cache.folder.glob("shard-*.safetensors"))) >= 2  # written as it goes, not held


def test_config_checks_name_the_field():
    with pytest.raises(DataConfigError, match=r"data.num_classes"):
        DataConfig(source="shards", path="x.tar", label="cls")
    with pytest.raises(DataConfigError, match=r"data.shuffle_buffer"):
        DataConfig(source="shards", path="x.tar", shuffle_buffer=-1)
    with pytest.raises(DataConfigError, match=r"data.retry_delay"):
        DataConfig(source="shards", path="x.tar", retry_delay=True)
    with pytest.raises(DataConfigError, match=r"data.path"):
        DataConfig(source="shards")


def test_mdm_data_shards_from_an_image_folder_round_trips(tmp_path, capsys):
    from matryoshka.cli.main import main

    for i in range(7):
        cls = "cats" if i % 2 else "dogs"
        syn.write(tmp_path / "pets" / cls / f"{i}.png", syn.solid_image("RGB", (30 + i, 20), (i * 30, 0, 0)))
        syn.write(tmp_path / "pets" / cls / f"{i}.txt", f"pet {i}")
    out = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "shards",
                "--from",
                str(tmp_path / "pets"),
                "--out",
                str(out),
                "--per-shard",
                "3",
                "--label",
                "folder",
            ]
        )
        == 0
    )
    info = json.loads((out / "info.json").read_text())
    assert info["count"] == 7 and info["shards"] == 3 and info["class_names"] == ["cats", "dogs"]
    assert "data.source=shards" in capsys.readouterr().out
    ds = build_dataset(config(info["pattern"], label="cls", num_classes=2, shuffle_buffer=0))
    loader = make_loader(ds, batch_size=7, seed=0, shuffle=False)
    batch = next(loader)
    assert sorted(batch["caption"]) == [f"pet {i}" for i in range(7)]
    pairs = sorted(zip(batch["caption"], batch["label"].tolist(), strict=True))
    assert pairs == [(f"pet {i}", 1 - i % 2) for i in range(7)]  # cats (odd) are class 0
    assert ds.skipped["total"] == 0
    assert main(["data", "shards", "--from", str(tmp_path / "pets"), "--out", str(out), "--per-shard", "3"]) == 2


def test_trainer_streams_shards_and_resumes_exactly(tmp_path):
    from matryoshka.cli.main import main

    from .test_cli import metrics

    pattern = make_shards(tmp_path / "data", [6, 5, 7])
    common = [
        "data.source=shards",
        f"data.path={pattern}",
        "data.shuffle_buffer=4",
        "train.batch_size=4",
        "train.log_every=1",
        "train.sample_every=1000",
        "train.warmup_steps=2",
        "train.checkpoint_every=3",
        "sample.steps=2",
        "sample.num=2",
    ]
    assert main(["train", "tiny", f"run_dir={tmp_path / 'straight'}", "train.steps=6", *common]) == 0
    assert main(["train", "tiny", f"run_dir={tmp_path / 'resumed'}", "train.steps=3", *common]) == 0
    state = torch.load(tmp_path / "resumed/checkpoints/step_00000003/state.pt", weights_only=True)
    assert state["data"]["step"] == 3 and state["data"]["shard_counts"]
    assert main(["train", "tiny", f"run_dir={tmp_path / 'resumed'}", "train.steps=6", *common]) == 0
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in straight], rel=1e-5)


RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from matryoshka.data import build_dataset, make_loader
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ds = build_dataset({"source": "shards", "path": sys.argv[1], "resolution": 8, "shuffle_buffer": 0})
loader = make_loader(ds, batch_size=2, seed=7, rank=rank, world_size=world, num_workers=2)
ids = [next(loader)["index"].tolist() for _ in range(int(sys.argv[3]))]
order = ds.shard_order(0)
json.dump({"ids": ids, "order": order}, open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w"))
loader.close()
dist.barrier()
dist.destroy_process_group()
"""


def test_torchrun_two_ranks_two_workers_read_each_sample_once(tmp_path):
    import subprocess
    import sys

    counts = [4, 6, 2, 4, 6, 4, 2, 4]  # 8 shards for 2 ranks x 2 workers; 2 shards (even sizes) per reader
    pattern = make_shards(tmp_path, counts)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    steps = 12
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(script),
            pattern,
            str(tmp_path),
            str(steps),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    order = per_rank[0]["order"]
    first_epoch = []
    for rank, got in enumerate(per_rank):
        assert len(got["ids"]) == steps  # the same number of steps on both ranks
        for worker in range(2):
            slot = rank * 2 + worker
            mine = [i for b in got["ids"][worker::2] for i in b]  # workers take turns
            size = sum(counts[s] for s in order[slot::4])
            assert {i >> SAMPLE_BITS for i in mine[:size]} == set(order[slot::4])
            first_epoch += mine[:size]
    assert sorted(first_epoch) == sorted(all_ids(counts))


def test_first_captions_over_http_stop_early_quietly(http_root, capfd):
    root, url = http_root
    make_shards(root, [5, 5])
    ds = build_dataset(config(url + "/shard-{000..001}.tar"))
    assert ds.first_captions(3) == ["shard 0 sample 0", "shard 0 sample 1", "shard 0 sample 2"]
    assert "Exception ignored" not in capfd.readouterr().err


def test_torchrun_training_on_streamed_shards(tmp_path):
    from .test_distributed import COMMON, torchrun

    pattern = make_shards(tmp_path / "data", [5, 7, 6, 4])
    run = tmp_path / "run"
    result = torchrun(
        f"run_dir={run}",
        "train.steps=3",
        "train.batch_size=2",
        "train.checkpoint_every=3",
        "data.source=shards",
        f"data.path={pattern}",
        "data.num_workers=1",
        *COMMON,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 streamed shards" in result.stdout + result.stderr
    state = torch.load(run / "checkpoints/step_00000003/state.pt", weights_only=True)
    assert state["data"]["world_size"] == 2 and state["data"]["step"] == 3


def pooled_features():
    from matryoshka.evaluation.features import FeatureExtractor

    class Pooled(torch.nn.Module):
        """12 features: a fixed 1x1 convolution averaged over each quarter of the image."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def features(self, images):
            return torch.nn.functional.adaptive_avg_pool2d(self.conv(images), 2).flatten(1)

    return FeatureExtractor("pooled", 12, Pooled(), preprocess=lambda x: x)


def test_reference_train_reads_the_stream_like_the_indexed_shards(tmp_path):
    from matryoshka.evaluation.errors import EvaluationError
    from matryoshka.evaluation.reference import compute_reference_stats

    counts = [4, 5, 3]
    pattern = make_shards(tmp_path, counts)
    extractor = pooled_features()

    def stats(source, max_images, max_features=100):
        data = DataConfig(source=source, path=pattern, resolution=8, shuffle_buffer=4)
        return compute_reference_stats("train", extractor, 8, [8, 4], max_images, max_features, 5, run_data=data)

    indexed, streamed = stats("webdataset", None), stats("shards", None)
    for size in (8, 4):  # the whole first epoch, each sample once: the same statistics in another order
        assert streamed.levels[size].count == indexed.levels[size].count == sum(counts)
        np.testing.assert_allclose(streamed.levels[size].mean, indexed.levels[size].mean, atol=1e-6)
        np.testing.assert_allclose(streamed.levels[size].cov, indexed.levels[size].cov, atol=1e-6)
        assert streamed.levels[size].features.shape == (sum(counts), 12)
    first = stats("shards", 6)  # the first six samples in shard order: shard 0, then two of shard 1
    indexed_set = build_dataset(DataConfig(source="webdataset", path=pattern, resolution=8))
    first_six = torch.stack([indexed_set[i]["image"] for i in range(6)])
    assert first.levels[8].count == 6 and first.meta["images"] == 6
    np.testing.assert_allclose(first.levels[8].mean, extractor(first_six).mean(0), atol=1e-6)
    assert stats("shards", 50).levels[8].count == sum(counts)  # more than an epoch holds: the epoch
    # a corrupt image's stand-in (the sample before it, same id) is neither counted twice nor an epoch's end
    members = [(name, b"not a png" if name == "s000/0001.png" else data) for name, data in sample_members(0, 4)]
    syn.write_tar(tmp_path / "shard-000.tar", members)
    assert stats("shards", None).levels[8].count == sum(counts) - 1
    with pytest.raises(EvaluationError, match="no length"):
        stats("shards", None, max_features=None)
