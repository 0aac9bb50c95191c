from collections import Counter

import pytest
import torch

from matryoshka.data import DataConfig, ShardPlan, build_dataset, collate, make_loader

from . import synthetic as syn


class TinyDataset(torch.utils.data.Dataset):
    """Image pixels encode the index, the label its parity; keys may carry a seed."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, -1)
        img = torch.full((3, 2, 2), float(i))
        img[1] = float(seed % 1000)
        return {"image": img, "label": i % 2, "caption": f"item {i}", "index": i}


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(
        torch.equal(x["image"], y["image"])
        and torch.equal(x["index"], y["index"])
        and torch.equal(x["label"], y["label"])
        and x["caption"] == y["caption"]
        for x, y in zip(a, b)
    )


def test_collate_and_batch_values():
    batch = next(make_loader(TinyDataset(10), batch_size=4, seed=0, shuffle=False))
    assert batch["image"].shape == (4, 3, 2, 2) and batch["image"].dtype == torch.float32
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["index"].dtype == torch.long
    assert batch["label"].tolist() == [0, 1, 0, 1] and batch["label"].dtype == torch.long
    assert batch["caption"] == ["item 0", "item 1", "item 2", "item 3"]
    assert batch["image"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    c = collate([{"image": torch.zeros(3, 1, 1), "label": -1, "caption": "", "index": 5}])
    assert c["label"].tolist() == [-1] and c["index"].tolist() == [5] and c["caption"] == [""]


def test_deterministic_and_seed_dependent():
    ds = TinyDataset(37)
    a = take(make_loader(ds, 5, seed=1), 12)
    b = take(make_loader(ds, 5, seed=1), 12)
    c = take(make_loader(ds, 5, seed=2), 12)
    assert same(a, b)
    assert not all(torch.equal(x["index"], y["index"]) for x, y in zip(a, c))


def test_epochs_are_permutations_and_differ():
    ds = TinyDataset(20)
    loader = make_loader(ds, batch_size=4, seed=3)
    e0 = torch.cat([b["index"] for b in take(loader, 5)]).tolist()
    assert loader.position == (1, 0) and loader.step == 5
    e1 = torch.cat([b["index"] for b in take(loader, 5)]).tolist()
    assert sorted(e0) == list(range(20)) and sorted(e1) == list(range(20)) and e0 != e1
    assert e0 != list(range(20))


def test_batches_span_epoch_boundaries_without_loss():
    ds = TinyDataset(7)
    loader = make_loader(ds, batch_size=3, seed=0)
    stream = torch.cat([b["index"] for b in take(loader, 7)]).tolist()  # 21 samples = 3 epochs
    for e in range(3):
        assert sorted(stream[7 * e : 7 * (e + 1)]) == list(range(7))
    assert loader.position == (3, 0)
    assert loader.state_dict()["step"] == 7 and loader.steps_per_epoch == pytest.approx(7 / 3)


@pytest.mark.parametrize("n, world", [(12, 3), (10, 3), (5, 4), (9, 1)])
def test_sharding_covers_dataset(n, world):
    for epoch in range(3):
        per_rank = [ShardPlan(n, seed=9, rank=r, world_size=world).rank_indices(epoch).tolist() for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # same count on every rank
        allidx = [i for p in per_rank for i in p]
        assert set(allidx) == set(range(n))
        padding = -n % world
        assert len(allidx) == n + padding
        assert sum(c - 1 for c in Counter(allidx).values()) == padding  # only the wrapped padding repeats
        for p in per_rank:
            assert len(set(p)) == len(p)  # no duplicates within a rank's epoch


def test_ranks_read_disjoint_batches():
    ds = TinyDataset(24)
    loaders = [make_loader(ds, 4, seed=5, rank=r, world_size=3) for r in range(3)]
    seen = [torch.cat([b["index"] for b in take(loader, 2)]).tolist() for loader in loaders]  # one epoch each
    flat = [i for s in seen for i in s]
    assert sorted(flat) == list(range(24))


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_resume_matches_uninterrupted(k):
    ds = TinyDataset(11)
    full = take(make_loader(ds, 4, seed=7, rank=1, world_size=2), 14)
    resumed = make_loader(ds, 4, seed=7, rank=1, world_size=2, start_step=k)
    assert resumed.position == divmod(k * 4, 6)
    assert same(take(resumed, 14 - k), full[k:])
    assert resumed.indices_for_step(k) == full[k]["index"].tolist()


def test_indices_for_step_matches_batches():
    ds = TinyDataset(9)
    loader = make_loader(ds, 4, seed=2)
    for step, batch in enumerate(take(loader, 6)):
        assert batch["index"].tolist() == loader.indices_for_step(step)


def test_augmentation_resumes_exactly(tmp_path):
    for k in range(6):
        syn.write(tmp_path / f"{k}.png", syn.gradient_image((40 + 4 * k, 24)))
    ds = build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=16, crop="random", hflip=True))
    full = take(make_loader(ds, 4, seed=11), 6)
    again = take(make_loader(ds, 4, seed=11, start_step=3), 3)
    assert same(again, full[3:])
    # the augmentation actually varies between epochs for the same image
    by_index = {}
    for b in full:
        for i, img in zip(b["index"].tolist(), b["image"]):
            by_index.setdefault(i, []).append(img)
    assert any(not torch.equal(v[0], v[1]) for v in by_index.values() if len(v) > 1)


def test_workers_give_the_same_batches():
    ds = TinyDataset(13)
    a = take(make_loader(ds, 3, seed=4, start_step=2), 6)
    loader = make_loader(ds, 3, seed=4, start_step=2, num_workers=2)
    b = take(loader, 6)
    loader.close()
    assert same(a, b)


def test_bad_arguments():
    ds = TinyDataset(4)
    with pytest.raises(ValueError, match="rank"):
        make_loader(ds, 2, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, 0)
    with pytest.raises(ValueError, match="start_step"):
        make_loader(ds, 2, 0, start_step=-1)
    with pytest.raises(ValueError, match="empty"):
        make_loader(TinyDataset(0), 2, 0)
