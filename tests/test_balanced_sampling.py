"""Several data files (--data-path a.json,b.jsonl) and InstructBLIP's balanced sampling (--dataset-balance sqrt):
each global batch from one dataset, dataset d with probability sqrt(S_d) / sum_i sqrt(S_i) (arXiv:2305.06500,
"Balancing Training Datasets"). The sampler against the formula, its streams, ranks and resume; the files as one
dataset; train.main end to end."""

import json
import math

import pytest

import train
from data import BalancedSampler, ChatFormat, DataFiles, LazySupervisedDataset, ModalityLengthGroupedSampler
from test_data import N, conv
from test_train import losses, run
from test_train_faults import main


def lengths_of(sizes):
    """Grouping lengths for datasets of these sizes, concatenated: varied, some text-only (negative)."""
    return [((i * 37) % 23 + 1) * (-1 if i % 5 == 0 else 1) for i in range(sum(sizes))]


def balanced(sizes, rank=0, world=1, accum=1, micro=1, group_by_length=True, seed=0):
    return BalancedSampler(lengths_of(sizes), micro, world, rank, accum, group_by_length, seed, sizes=sizes)


def global_batches(sampler, epochs):
    """Every global batch (a flat list of indices) of the first `epochs` epochs."""
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += [[i for micro in batch for i in micro] for batch in sampler.megabatches()]
    return batches


def dataset_of(batch, sizes):
    starts = [sum(sizes[:d]) for d in range(len(sizes) + 1)]
    (d,) = {next(d for d in range(len(sizes)) if starts[d] <= i < starts[d + 1]) for i in batch}  # one dataset
    return d


def test_datasets_are_drawn_with_the_square_root_rule():
    sizes = [900, 100, 25]
    sampler = balanced(sizes, world=2, accum=2, micro=2)  # global batch 8: 129 steps an epoch
    batches = global_batches(sampler, 40)
    assert sampler.steps_per_epoch() == math.ceil(sum(sizes) / 8) and len(batches) == 40 * 129
    counts = [0] * len(sizes)
    for batch in batches:
        assert len(batch) == 8
        counts[dataset_of(batch, sizes)] += 1
    n, roots = len(batches), [math.sqrt(s) for s in sizes]
    for count, root in zip(counts, roots):
        p = root / sum(roots)  # 2/3, 2/9, 1/9 (sizes in proportion would give 0.88, 0.10, 0.02)
        assert abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p)), (counts, n * p)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_ranks_of_a_step_hold_its_global_batch_and_no_sample_repeats_before_its_dataset_is_seen(group_by_length):
    sizes, world, accum, micro = [40, 5, 23], 2, 2, 2  # 5: smaller than a global batch of 8
    samplers = [balanced(sizes, r, world, accum, micro, group_by_length, seed=3) for r in range(world)]
    per_rank, of_dataset = accum * micro, [[] for _ in sizes]
    for epoch in range(6):
        for s in samplers:
            s.set_epoch(epoch)
        streams = [list(s) for s in samplers]
        for k, megabatch in enumerate(samplers[0].megabatches()):
            batch = [i for micro_batch in megabatch for i in micro_batch]
            parts = [streams[r][k * per_rank:(k + 1) * per_rank] for r in range(world)]
            assert sorted(parts[0] + parts[1]) == sorted(batch)  # the ranks together: exactly the global batch
            d = dataset_of(batch, sizes)
            if sizes[d] >= len(batch):
                assert len(set(batch)) == len(batch)  # so the ranks' parts are disjoint
            of_dataset[d].append(batch)
    for d, batches in enumerate(of_dataset):
        # a dataset's batches in turn: each ceil(size / 8) of them hold all of it, and nothing twice but the samples
        # that fill up the last (taken again from the start of the same shuffle)
        per_shuffle, start = math.ceil(sizes[d] / 8), sum(sizes[:d])
        assert len(batches) >= 2 * per_shuffle
        for c in range(0, len(batches) - per_shuffle + 1, per_shuffle):
            first = [i for batch in batches[c:c + per_shuffle - 1] for i in batch]
            last = batches[c + per_shuffle - 1]
            assert len(set(first)) == len(first) and set(first) | set(last) == set(range(start, start + sizes[d]))
            if sizes[d] >= 8:  # the last batch repeats only the samples it is filled up with
                assert len(set(first) & set(last)) == per_shuffle * 8 - sizes[d]
        cycles = [batches[c:c + per_shuffle] for c in range(0, len(batches) - per_shuffle + 1, per_shuffle)]
        assert all(a != b for a, b in zip(cycles, cycles[1:]))  # shuffled anew each time


def test_balanced_order_is_deterministic_and_a_resumed_epoch_reads_what_the_uninterrupted_one_does():
    sizes = [30, 12, 7]
    a, b, c = (list(balanced(sizes, 1, 2, 2, 2, seed=s)) for s in (5, 5, 6))
    assert a == b and a != c
    whole = balanced(sizes, 1, 2, 2, 2, seed=5)
    whole.set_epoch(2)
    uninterrupted = list(whole)
    resumed = balanced(sizes, 1, 2, 2, 2, seed=5)
    resumed.set_epoch(2, start_step=4)
    assert list(resumed) == uninterrupted[4 * 2 * 2:] and len(resumed) == len(uninterrupted) - 4 * 2 * 2
    assert uninterrupted != a  # the streams run on across epochs


def test_one_file_concatenated_is_the_order_it_always_was():
    """The sampler of one file (--dataset-balance concat): its order for these lengths as produced before several
    files were possible (the sampler's code at commit a74c959), for both groupings."""
    lengths = [(i * 7) % 11 + 1 if i % 4 else -((i * 5) % 9 + 1) for i in range(23)]
    before = {True: [[9, 22, 7, 5, 14, 2, 17, 18, 16, 0, 12, 4], [15, 11, 10, 13, 3, 19, 6, 21, 1, 20, 8, 13]],
              False: [[21, 12, 17, 0, 10, 15, 11, 20, 6, 8, 13, 19], [5, 18, 16, 3, 1, 9, 7, 14, 2, 4, 22, 21]]}
    for group_by_length, order in before.items():
        assert [list(ModalityLengthGroupedSampler(lengths, 2, 2, r, 2, group_by_length, 7)) for r in range(2)] == order


def write(path, samples):
    path.write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    return str(path)


def test_several_files_are_one_dataset_whose_indices_name_their_file(tmp_path, llama_tok):
    fmt = ChatFormat(llama_tok, "vicuna_v1", N)
    long = " ".join(["word"] * 80)
    a = write(tmp_path / "a.jsonl", [{"id": "a0", "conversations": conv("Q?", "A.")},
                                     {"id": "a-long", "conversations": conv(long + "?", "A.")}])
    b = write(tmp_path / "b.jsonl", [{"id": f"b{k}", "conversations": conv(f"Q{k}?" + (long if k == 1 else ""),
                                                                          "B" * (k + 1))} for k in range(3)])
    one = LazySupervisedDataset(b, None, fmt, max_length=64, skip_bad=True)
    alone = DataFiles([one])  # one file: exactly its dataset
    assert len(alone) == 3 and alone.modality_lengths == one.modality_lengths and alone.data_path == b
    assert [alone[i]["input_ids"].tolist() for i in range(3)] == [one[i]["input_ids"].tolist() for i in range(3)]
    assert [alone[i]["skipped"] for i in range(3)] == [[], [1], []]
    both = DataFiles([LazySupervisedDataset(path, None, fmt, max_length=64, skip_bad=True) for path in (a, b)])
    assert both.sizes == [2, 3] and len(both) == 5 and both.data_path == f"{a},{b}"
    assert "b.jsonl, line 2 (id 'b1')" in both.where(3) and "a.jsonl, line 1 (id 'a0')" in both.where(0)
    assert [both[i]["id"] for i in (0, 2, 4)] == ["a0", "b0", "b2"]
    assert both[3]["id"] == "b2" and both[3]["skipped"] == [3]  # b's bad sample, by its index in the whole
    item = both[1]  # a's last sample is too long for any reply to stay: replaced by a's next good one, a's first
    assert item["id"] == "a0" and item["skipped"] == [1] and "a-long" in both.where(1)
    with pytest.raises(IndexError):
        both[5]


def split_data(world, tmp_path, cut=30):
    """The toy world's conversations as two files: `cut` samples and the rest."""
    with open(world["root"] / "conversations.json") as f:
        samples = json.load(f)
    first, second = tmp_path / "first.json", tmp_path / "second.jsonl"
    first.write_text(json.dumps(samples[:cut]))
    write(second, samples[cut:])
    return f"{first},{second}", [cut, len(samples) - cut]


def test_training_on_two_files_balanced_finishes_and_resumes_exactly(world, tmp_path, monkeypatch):
    data_path, sizes = split_data(world, tmp_path)
    built = []

    class Recorded(BalancedSampler):
        def __post_init__(self):
            super().__post_init__()
            built.append(self.sizes)

    monkeypatch.setattr(train, "BalancedSampler", Recorded)
    straight = run(world, tmp_path / "straight", data_path=data_path, dataset_balance="sqrt", max_steps=4,
                   save_every=2)
    assert built == [sizes] and len(losses(tmp_path / "straight")) == 4
    save = train.save_checkpoint

    def save_then_die(model, optimizer, at, *args):
        save(model, optimizer, at, *args)
        if at == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "resumed", data_path=data_path, dataset_balance="sqrt", max_steps=4, save_every=2)
    monkeypatch.setattr(train, "save_checkpoint", save)
    resumed = run(world, tmp_path / "resumed", data_path=data_path, dataset_balance="sqrt", max_steps=4,
                  save_every=2, resume=True)
    assert all((straight[k] == resumed[k]).all() for k in straight)
    assert losses(tmp_path / "straight")[2:] == losses(tmp_path / "resumed")[2:]


def test_a_bad_data_file_or_balance_is_named(world, tmp_path, capsys):
    data_path, _ = split_data(world, tmp_path)
    first = data_path.split(",")[0]
    missing = str(tmp_path / "missing.json")
    status, err = main(world, tmp_path / "out", capsys, data_path=f"{first},{missing}", dataset_balance="sqrt")
    assert status == 2 and f"--data-path {missing}: no such data file" in err and "Traceback" not in err, err
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1, "conversations": []},')
    status, err = main(world, tmp_path / "out", capsys, data_path=f"{first},{broken}")
    assert status == 2 and "broken.json: malformed JSON" in err and "Traceback" not in err, err
    for value, message in [(f"{first},{first}", "is given twice"), (f"{first},", "file 2 of 2 is empty")]:
        status, err = main(world, tmp_path / "out", capsys, data_path=value)
        assert status == 2 and message in err, err
    status, err = main(world, tmp_path / "out", capsys, data_path=data_path, dataset_balance="sqrt2")
    assert status == 2 and "--dataset-balance 'sqrt2': must be 'concat' or 'sqrt'" in err, err


def test_resume_refuses_another_balance(world, tmp_path, capsys):
    data_path, _ = split_data(world, tmp_path)
    run(world, tmp_path / "out", data_path=data_path, dataset_balance="sqrt", max_steps=1, save_every=1)
    status, err = main(world, tmp_path / "out", capsys, data_path=data_path, resume=True, max_steps=2)
    assert status == 2 and "--dataset-balance was 'sqrt', now 'concat'" in err, err
