"""Caption / prompt draws and the training order depend only on (seed, epoch, index)."""

from __future__ import annotations

import random

import torch
from accelerate.data_loader import prepare_data_loader
from data_fixtures import data_cfg, source, write_coco

from vlm_tune.data import build_dataset, build_train_sampler
from vlm_tune.data.sampler import EpochShuffleSampler

PROMPTS = ["Describe the image.", "What is shown here?", "Write a caption."]


def _captions_dataset(tmp_path, train: bool, seed: int = 0):
    captions = {f"{i}.png": [f"caption {i} {k}" for k in range(5)] for i in range(12)}
    path = write_coco(tmp_path, captions)
    return build_dataset(
        source(path, images=str(tmp_path / "val2017")), data_cfg(prompt=PROMPTS), train=train, seed=seed
    )


def _draws(dataset, epoch: int) -> list[tuple[str, str]]:
    dataset.set_epoch(epoch)
    return [(item["caption"], item["prompt"]) for item in dataset]


def test_training_draws_are_a_function_of_seed_epoch_and_index(tmp_path):
    first, second = _captions_dataset(tmp_path, True), _captions_dataset(tmp_path, True)
    random.seed(1234)
    epoch0 = _draws(first, 0)
    random.seed(99)  # global random state plays no part
    torch.manual_seed(99)
    assert _draws(second, 0) == epoch0
    assert _draws(first, 1) != epoch0 and _draws(first, 0) == epoch0  # back to epoch 0: same again
    assert len({caption for caption, _ in _draws(first, 0) + _draws(first, 1) + _draws(first, 2)}) > 12
    assert len({prompt for _, prompt in epoch0 + _draws(first, 1)}) == 3
    other_seed = _captions_dataset(tmp_path, True, seed=1)
    assert _draws(other_seed, 0) != epoch0
    for index, (caption, _) in enumerate(epoch0):
        assert caption.startswith(f"caption {index} ")


def test_evaluation_uses_the_first_caption_and_prompt_and_keeps_all_references(tmp_path):
    dataset = _captions_dataset(tmp_path, False)
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        item = dataset[4]
        assert item["caption"] == "caption 4 0" and item["prompt"] == PROMPTS[0]
        assert item["captions"] == [f"caption 4 {k}" for k in range(5)]


def test_sampler_order_is_a_permutation_fixed_by_seed_and_epoch():
    sampler = EpochShuffleSampler(50, batch_size=4, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(50))
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    again = EpochShuffleSampler(50, batch_size=4, seed=3)
    torch.manual_seed(7)
    assert list(again) == epoch0
    assert list(EpochShuffleSampler(50, batch_size=4, seed=4)) != epoch0


def test_group_by_length_makes_batches_of_similar_length():
    lengths = [random.Random(i).randint(1, 60) for i in range(400)]
    grouped = EpochShuffleSampler(400, batch_size=8, seed=0, lengths=lengths)
    shuffled = EpochShuffleSampler(400, batch_size=8, seed=0)

    def mean_spread(order):
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)

    order = list(grouped)
    assert sorted(order) == list(range(400))
    assert mean_spread(order) < mean_spread(list(shuffled)) / 3
    grouped.set_epoch(1)
    assert list(grouped) != order


def test_build_train_sampler_uses_caption_lengths_when_grouping(tmp_path):
    dataset = _captions_dataset(tmp_path, True)
    assert build_train_sampler(dataset, data_cfg(), 4, seed=0).lengths is None
    grouped = build_train_sampler(dataset, data_cfg(group_by_length=True), 4, seed=0)
    assert grouped.lengths == dataset.caption_lengths() and len(grouped) == len(dataset)


def test_sampler_under_accelerate_sharding_is_disjoint_and_follows_set_epoch():
    data = list(range(40))

    def shards(epoch):
        result = []
        for process in range(2):
            sampler = EpochShuffleSampler(40, batch_size=4, seed=5, lengths=[i % 7 for i in data])
            loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
            prepared = prepare_data_loader(loader, num_processes=2, process_index=process, put_on_device=False)
            prepared.set_epoch(epoch)
            result.append([int(x) for batch in prepared for x in batch])
        return result

    first, second = shards(0)
    assert not set(first) & set(second) and sorted(first + second) == data
    assert shards(0) == [first, second] and shards(1) != [first, second]
