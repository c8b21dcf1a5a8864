"""The training levers of issue 19 and the step's accounting: selective activation checkpointing, per-block compile,
contiguous micro-batches, packing, the padded fraction, FLOPs and MFU. Each lever must leave the loss and gradients
as they were (fp32, CPU, one process); the counts are checked against hand counts and formulas."""

import itertools
import os

import pytest
import torch

import finetune
import train
from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ModalityLengthGroupedSampler, collate, collate_packed
from tools.tiny import save_tiny_backbones, tiny_clip_vision_config, tiny_llama_config

LAYERS = 5


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    """Tiny backbones with a 5-layer Llama: enough layers for every-K-th checkpointing to pick a proper subset."""
    config = tiny_llama_config()
    config.num_hidden_layers = LAYERS
    return save_tiny_backbones(str(tmp_path_factory.mktemp("five")), llama_config=config)


def config(backbones, **overrides):
    vision, llm = backbones
    settings = {**finetune.STAGE_2, "vision_tower": vision, "llm": llm, "precision": "fp32", "global_batch_size": 4,
                "micro_batch_size": 2, "activation_checkpointing": False, **overrides}
    return train.TrainConfig(**settings)


@pytest.fixture
def one_process():
    device = train.init_distributed()
    yield device
    train.dist.destroy_process_group()


def build(backbones, device, **overrides):
    torch.manual_seed(0)  # the same fresh projector every time
    return train.build_model(config(backbones, **overrides), device)


def samples(lengths, with_image, image_tokens=4, seed=0):
    """Samples as LazySupervisedDataset gives them: BOS, an image's placeholders (if any), text; the second half of
    each sample's text supervised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, image in zip(lengths, with_image):
        ids = torch.randint(3, 600, (n,), generator=g)
        ids[0] = 1
        if image:
            ids[1:1 + image_tokens] = IMAGE_TOKEN_INDEX
        labels = ids.clone()
        labels[:(n + 1 + image_tokens * image) // 2] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels, "skipped": [],
                    "pixel_values": torch.randn(1, 3, 16, 16, generator=g) if image else None})
    return out


def loss_and_grads(model, micro, device):
    n = sum((train.supervised_targets(b["input_ids"], b["labels"]) != IGNORE_INDEX).sum().item() for b in micro)
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss, _ = train.forward_backward(model, micro, n, trainable, 0.0, device)
    grads = {name: p.grad.full_tensor().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss, grads


def assert_close(a, b, tol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) <= tol * abs(loss_a)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        scale = grads_a[k].abs().max().item() + 1e-12
        assert (grads_a[k] - grads_b[k]).abs().max().item() <= tol * scale, k


MICRO = [[(13, True), (7, False), (5, False)], [(9, True), (11, True), (2, False)]]  # (length, has an image)


def micro_batches(pack=False, row_length=0):
    collated = []
    for k, mb in enumerate(MICRO):
        s = samples(*zip(*mb), seed=k)
        collated.append(collate_packed(s, 0, row_length) if pack else collate(s, 0))
    return collated


# ----------------------------------------------------------------------------------------------------------------------
# Selective activation checkpointing


@pytest.mark.parametrize("on, every, expected", [(True, 1, [0, 1, 2, 3, 4]), (True, 2, [0, 2, 4]), (True, 3, [0, 3]),
                                                 (True, 0, []), (False, 1, []), (True, 9, [0])])
def test_every_kth_layer_is_checkpointed(five_layers, on, every, expected):
    cfg = config(five_layers, activation_checkpointing=on, activation_checkpointing_every=every)
    assert train.checkpointed_layers(cfg, LAYERS) == expected
    from model import LlavaModel
    model = LlavaModel.from_config(cfg.model_config(), empty=True)
    train.prepare(model, cfg)
    wrapped = [i for i, layer in enumerate(model.language_model.base_model.layers) if "forward" in vars(layer)]
    assert wrapped == expected
    assert all(vars(model.language_model.base_model.layers[i])["forward"].func is train.checkpoint for i in wrapped)


def test_checkpointing_any_layers_gives_the_same_loss_and_gradients(five_layers, one_process):
    reference = loss_and_grads(build(five_layers, one_process), micro_batches(), one_process)
    for every in (1, 2, 3):
        model = build(five_layers, one_process, activation_checkpointing=True, activation_checkpointing_every=every)
        assert_close(loss_and_grads(model, micro_batches(), one_process), reference, 1e-6)


def test_activation_checkpointing_every_is_checked():
    with pytest.raises(train.UserError, match="--activation-checkpointing-every -1: must be 0"):
        config(("v", "l"), activation_checkpointing_every=-1)
    with pytest.raises(train.UserError, match="--micro-batch-order 'sorted': must be 'llava' or 'contiguous'"):
        config(("v", "l"), micro_batch_order="sorted")


# ----------------------------------------------------------------------------------------------------------------------
# Per-block compile


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not os.environ.get("LLAVA_TEST_INDUCTOR"), reason="inductor's C++ compile takes a minute on 2 CPU cores: set "
    "LLAVA_TEST_INDUCTOR=1"))])
def test_compiled_blocks_give_the_eager_loss_and_gradients(backbones, one_process, monkeypatch, backend):
    """--compile-blocks under FSDP2 and checkpointing of every other layer. In the suite with dynamo's aot_eager
    backend (the graphs traced and AOT-autograd'ed, then run eagerly: the whole wiring but inductor's code
    generation); LLAVA_TEST_INDUCTOR=1 adds inductor itself (tools/bench_train.py --compile times it)."""
    compile_blocks = train.compile_blocks
    monkeypatch.setattr(train, "compile_blocks", lambda model: compile_blocks(model, backend=backend))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    eager = loss_and_grads(build(backbones, one_process, activation_checkpointing=True,
                                 activation_checkpointing_every=2), micro_batches(), one_process)
    model = build(backbones, one_process, compile_blocks=True, activation_checkpointing=True,
                  activation_checkpointing_every=2)
    layers = model.language_model.base_model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())  # names kept
    compiled = loss_and_grads(model, micro_batches(), one_process)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did trace the layers
    assert_close(compiled, eager, 1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("row_length, rows", [(0, [2, 2]), (32, [1, 1])])
def test_packing_gives_the_unpacked_loss_and_gradients(backbones, one_process, row_length, rows):
    packed = micro_batches(pack=True, row_length=row_length)
    assert [len(b["input_ids"]) for b in packed] == rows  # rows of 13: [13], [7, 5]; of 11: [11], [9, 2]; of 32: all
    model = build(backbones, one_process)
    assert_close(loss_and_grads(model, packed, one_process), loss_and_grads(model, micro_batches(), one_process),
                 1e-5)


def test_a_packed_row_keeps_each_samples_positions_labels_and_images():
    s = samples([6, 3, 9, 2], [True, False, True, False], image_tokens=2, seed=1)
    b = collate_packed(s, pad_id=0)
    # first fit, longest first, rows of 9: [9], [6, 3], [2] + 7 padding
    assert b["input_ids"].shape == (3, 9) and b["lengths"].tolist() == [9, 6, 3, 2]
    assert b["position_ids"].tolist() == [list(range(9)), list(range(6)) + list(range(3)), list(range(9))]
    assert torch.equal(b["input_ids"][1, 6:], s[1]["input_ids"]) and torch.equal(b["input_ids"][2, :2],
                                                                                  s[3]["input_ids"])
    assert b["labels"][1, 6] == IGNORE_INDEX and torch.equal(b["labels"][1, 7:], s[1]["labels"][1:])
    assert b["attention_mask"].sum().item() == 20 and b["has_image"].tolist() == [True, True, False, False]
    assert torch.equal(b["pixel_values"], torch.cat([s[2]["pixel_values"], s[0]["pixel_values"]]))  # row order
    unpackable = samples([5, 4], [False, False])
    assert collate_packed(unpackable, 0).keys() == collate(unpackable, 0).keys()  # nothing fits: collate's batch
    supervised = (train.supervised_targets(b["input_ids"], b["labels"]) != IGNORE_INDEX).sum()
    assert supervised == sum((x["labels"][1:] != IGNORE_INDEX).sum() for x in s)


# ----------------------------------------------------------------------------------------------------------------------
# Contiguous micro-batches


def skewed_lengths(n=96):
    """Mostly short samples and a few long ones (LLaVA's mix: short answers, long descriptions), some text-only."""
    g = torch.Generator().manual_seed(5)
    lengths = (torch.rand(n, generator=g) ** 4 * 400 + 1).long().tolist()
    return [-n if i % 7 == 0 else n for i, n in enumerate(lengths)]


def steps_of(order, lengths, world=2, accum=3, micro=4, start_step=0, sampler=ModalityLengthGroupedSampler):
    """Each global step as a list of (rank, accumulation step, micro-batch) read from every rank's sampler."""
    ranks = []
    for r in range(world):
        s = sampler(lengths, micro, world, r, accum, True, seed=1, micro_batch_order=order)
        s.set_epoch(0, start_step)
        ranks.append(list(s))
    steps = len(ranks[0]) // (micro * accum)
    return [[(r, a, ranks[r][(t * accum + a) * micro:(t * accum + a + 1) * micro]) for r in range(world)
             for a in range(accum)] for t in range(steps)]


def padded_fraction(steps, lengths):
    positions = sum(len(mb) * max(abs(lengths[i]) for i in mb) for step in steps for _, _, mb in step)
    return 1 - sum(abs(lengths[i]) for step in steps for _, _, mb in step for i in mb) / positions


def test_contiguous_micro_batches_pad_less_and_keep_each_steps_samples():
    lengths = skewed_lengths()
    llava, contiguous = steps_of("llava", lengths), steps_of("contiguous", lengths)
    assert len(llava) == len(contiguous) == 4
    for t, (a, b) in enumerate(zip(llava, contiguous)):
        together = [i for _, _, mb in b for i in mb]
        assert sorted(i for _, _, mb in a for i in mb) == sorted(together)  # the same global batch
        assert len(set(together)) == len(together) == 24  # each rank: accum x micro of its own
        assert all(len(mb) == 4 for _, _, mb in b)
        if t < 3:  # (the full batches: the modalities' leftovers, 10 + 14, go last, in one mixed batch)
            assert len({lengths[i] > 0 for i in together}) == 1  # one modality per global batch
        runs = sorted((mb for _, _, mb in b), key=lambda mb: -abs(lengths[mb[0]]))
        for longer, shorter in zip(runs, runs[1:]):  # consecutive runs of the sorted batch
            assert min(abs(lengths[i]) for i in longer) >= max(abs(lengths[i]) for i in shorter)
    before, after = padded_fraction(llava, lengths), padded_fraction(contiguous, lengths)
    assert after < 0.5 * before, (before, after)
    assert steps_of("contiguous", lengths, start_step=2) == contiguous[2:]  # resumable mid-epoch


def test_contiguous_deal_is_a_snake_over_ranks():
    s = ModalityLengthGroupedSampler([10, 9, 8, 7, 6, 5, 4, 3], 1, 2, 0, 4, True, micro_batch_order="contiguous")
    assert s.deal(list(range(8))) == [[0], [1], [3], [2], [4], [5], [7], [6]]  # step 1: ranks swapped


def test_balanced_sampler_deals_contiguously_too():
    from data import BalancedSampler

    lengths = skewed_lengths(60)
    steps = steps_of("contiguous", lengths, sampler=lambda *a, **k: BalancedSampler(*a, **k, sizes=[40, 20]))
    for step in steps:
        runs = sorted((mb for _, _, mb in step), key=lambda mb: -abs(lengths[mb[0]]))
        for longer, shorter in zip(runs, runs[1:]):
            assert min(abs(lengths[i]) for i in longer) >= max(abs(lengths[i]) for i in shorter)


# ----------------------------------------------------------------------------------------------------------------------
# The step's counts: padded fraction, FLOPs, MFU


def test_metrics_count_padding_and_report_per_gpu(backbones, one_process):
    model = build(backbones, one_process)
    micro = micro_batches()  # 13, 7, 5 in rows of 13; 9, 11, 2 in rows of 11
    flops = train.FlopCounter(model, True, one_process)
    cfg = config(backbones, warmup_ratio=0.0)
    record = train.train_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                              iter(micro), 2, 0, 10, cfg, flops, one_process)
    assert (record["tokens"], record["positions"], record["samples"]) == (47, 3 * 13 + 3 * 11, 6)
    assert record["padded_fraction"] == pytest.approx(1 - 47 / 72)
    assert record["tokens_per_s_per_gpu"] == pytest.approx(record["tokens_per_s"])  # one rank
    assert record["mfu"] is None  # a CPU has no peak
    packed = train.global_counts(micro_batches(pack=True), flops, one_process)
    assert (packed["tokens"], packed["positions"], packed["samples"], packed["image_samples"]) == \
        (47, 2 * 13 + 2 * 11, 6, 3)
    unpacked = train.global_counts(micro_batches(), flops, one_process)
    assert packed["flops"] == unpacked["flops"] and packed["supervised_tokens"] == unpacked["supervised_tokens"]


def llama_params(c, head=True):
    """A Llama's parameters without its input embedding, by hand from its config."""
    d, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = 2 * d * d + 2 * d * kv + 3 * d * c.intermediate_size + 2 * d
    return c.num_hidden_layers * layer + d, c.vocab_size * d


def test_flop_counter_against_a_hand_count(backbones):
    from model import LlavaModel

    model = LlavaModel.from_config(config(backbones).model_config(), empty=True)
    text, vision = tiny_llama_config(), tiny_clip_vision_config()
    body, head = llama_params(text)
    h, ff, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    patches = (vision.image_size // p) ** 2
    n_vision = 3 * p * p * h + h + (patches + 1) * h + 2 * h + vision.num_hidden_layers * (
        4 * (h * h + h) + 4 * h + 2 * h * ff + ff + h) + 2 * h
    n_proj = h * text.hidden_size + text.hidden_size + text.hidden_size ** 2 + text.hidden_size
    lengths, images, supervised = [30, 12], 1, 9
    for train_llm, k in ((True, 6), (False, 4)):
        expected = sum(k * body * t + 12 * text.num_hidden_layers * text.hidden_size * t * t for t in lengths) + \
            k * head * supervised + images * (2 * n_vision * (patches + 1) + 4 * vision.num_hidden_layers * h *
                                              (patches + 1) ** 2 + 6 * n_proj * patches)
        assert train.FlopCounter(model, train_llm)(torch.tensor(lengths), images, supervised) == expected


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
                                        ("Tesla T4", None)])
def test_each_device_gets_its_own_peak(name, peak):
    assert train.device_peak(name) == peak


def test_mfu_is_every_ranks_flops_over_every_ranks_peak(backbones, one_process, monkeypatch):
    flops = train.FlopCounter.__new__(train.FlopCounter)
    flops.peak = 989e12
    assert train.global_peak(flops, one_process) == 989e12
    flops = train.FlopCounter.__new__(train.FlopCounter)
    flops.peak = None
    assert train.global_peak(flops, one_process) is None


def test_sampler_orders_listed():
    from data import MICRO_BATCH_ORDERS

    assert MICRO_BATCH_ORDERS == ("llava", "contiguous")
    assert list(itertools.islice(iter(ModalityLengthGroupedSampler([3, 2, 1, 4], 2)), 4))  # the default still runs


def test_a_run_with_the_levers_trains_the_same_model_with_less_padding(world, tmp_path):
    """finetune.py end to end (test_train.py's toy-world run, 4 steps of 4 x 2): contiguous micro-batches, packing
    and checkpointing of every other layer give the weights of a run without them, from less padding."""
    import json

    from test_train import max_diff, run

    plain = run(world, tmp_path / "plain")
    levers = run(world, tmp_path / "levers", micro_batch_order="contiguous", pack=True, activation_checkpointing=True,
                 activation_checkpointing_every=2)
    assert max_diff(plain, levers) < 1e-5

    def records(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    before, after = records("plain"), records("levers")
    assert [r["tokens"] for r in before] == [r["tokens"] for r in after]  # the same samples each step
    assert [r["samples"] for r in before] == [r["samples"] for r in after] == [8] * 4
    assert sum(r["positions"] for r in after) < sum(r["positions"] for r in before)
    assert all(0 <= r["padded_fraction"] < 1 and r["mfu"] is None for r in before + after)
