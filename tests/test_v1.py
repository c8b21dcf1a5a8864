"""The first paper's LLaVA (v1): --mm-use-im-start-end end to end (the two tokens added, only their input-embedding
rows trained in stage 1, saved with the tokenizer, loaded, wrapped around the image, resumed exactly), and the
released checkpoints' delta weights (tools/convert.py apply-delta). CPU, the toy world of test_train.py."""

import pytest
import torch

import checkpoints
import generate
import train
from data import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN_INDEX, load_tokenizer
from test_train import losses, max_diff, run

EMBED, HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"


def base_llm(world):
    from transformers import LlamaForCausalLM

    return {f"language_model.{k}": v for k, v in LlamaForCausalLM.from_pretrained(world["llm"]).state_dict().items()}


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
    """A stage-1 run with --mm-use-im-start-end: (output dir, its full trained state dict)."""
    out = tmp_path_factory.mktemp("stage1")
    return out, run(world, out, stage="pretrain", mm_use_im_start_end=True, template="llava_v0", max_steps=3, lr=1e-2)


def test_stage1_trains_only_the_two_new_rows(world, stage1):
    out, trained = stage1
    ids = load_tokenizer(str(out)).convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    assert IM_START_TOKEN not in load_tokenizer(world["llm"]).get_vocab()  # (added by the run)
    base = base_llm(world)
    others = [i for i in range(trained[EMBED].shape[0]) if i not in ids]
    mean_in, mean_out = (base[k][:min(ids)].mean(0) for k in (EMBED, HEAD))
    for i in ids:  # LLaVA's init: the mean of the old rows; the input rows moved, the output rows did not
        assert (trained[EMBED][i] - mean_in).abs().max() > 1e-3
        torch.testing.assert_close(trained[HEAD][i], mean_out)
    assert torch.equal(trained[EMBED][others], base[EMBED][others])  # every other row exactly as it was
    for k, v in base.items():
        if k != EMBED:
            assert torch.equal(trained[k][:v.shape[0]], v), k  # the rest of the LLM: untouched


def test_stage1_output_loads_with_its_tokens_around_the_image(world, stage1):
    out, trained = stage1
    model, fmt, _ = generate.load(str(out))
    assert model.config.mm_use_im_start_end and fmt.im_start_end
    loaded = model.state_dict()
    for k in (EMBED, HEAD, "multi_modal_projector.linear_1.weight"):
        torch.testing.assert_close(loaded[k], trained[k], rtol=0, atol=1e-6)  # (saved in bf16? no: fp32 run)
    ids = fmt.prompt([{"role": "user", "content": "<image>\nWhat is it?"}])
    start, end = fmt.tokenizer.convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    at = ids.index(IMAGE_TOKEN_INDEX) if isinstance(ids, list) else ids.tolist().index(IMAGE_TOKEN_INDEX)
    ids = ids if isinstance(ids, list) else ids.tolist()
    n = model.num_image_tokens
    assert ids[at - 1] == start and ids[at:at + n] == [IMAGE_TOKEN_INDEX] * n and ids[at + n] == end


def test_stage2_starts_from_stage1_rows_and_resumes_exactly(world, stage1, tmp_path, monkeypatch):
    out, trained = stage1
    common = dict(mm_use_im_start_end=True, template="llava_v0", init_from=str(out), max_steps=4, save_every=2)
    straight = run(world, tmp_path / "straight", **common)
    save = train.save_checkpoint

    def save_then_die(model, optimizer, step, *args):
        save(model, optimizer, step, *args)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "resumed", **common)
    monkeypatch.setattr(train, "save_checkpoint", save)
    resumed = run(world, tmp_path / "resumed", resume=True, **common)
    assert max_diff(straight, resumed) == 0
    assert losses(tmp_path / "straight")[2:] == losses(tmp_path / "resumed")[2:]
    # stage 2 began from stage 1's rows (one step at lr 1e-3 keeps them near), not from the mean
    ids = load_tokenizer(str(tmp_path / "straight")).convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
    model = checkpoints.load(str(tmp_path / "straight"))
    assert model.language_model.get_input_embeddings().weight.shape[0] == trained[EMBED].shape[0]
    assert (model.state_dict()[EMBED][ids] - trained[EMBED][ids]).abs().max() < 0.05
