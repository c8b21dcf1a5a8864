"""The qformer projector (qformer.py) inside the LLaVA skeleton: what it reads, and a run of the whole path (data ->
training -> checkpoint -> generation) with it. Its equality with transformers' InstructBLIP: test_instructblip.py."""

import json

import pytest
import torch

import checkpoints
import data
import generate
from model import LlavaConfig, LlavaModel
from qformer import QFormerConfig, QFormerProjector
from tests.test_train import run
from tools.tiny import bert_tokenizer

SIZES = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_query_tokens=4,
             vocab_size=200)


def projector(seed=0, **sizes):
    """A Q-Former with weights of a trained one's scale (BERT's initialisation, std 0.02, barely mixes anything)."""
    torch.manual_seed(seed)
    p = QFormerProjector(QFormerConfig(**{**SIZES, **sizes}), vision_hidden=24, text_hidden=40).eval()
    with torch.no_grad():
        for param in p.parameters():
            param.normal_(0, 0.3)
    return p


def test_the_queries_read_the_instruction_and_not_its_padding():
    p, features = projector(), torch.randn(2, 9, 24)
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 10, 3, 0, 0]])
    out = p(features, ids, (ids != 0).long())
    assert out.shape == (2, 4, 40)
    # only the instruction differs: other tokens
    other = p(features, torch.tensor([[2, 40, 41, 42, 3]] * 2), torch.ones(2, 5, dtype=torch.long))
    assert (other[0] - out[0]).abs().max() > 1e-4  # (padding alone: below 1e-6, next)
    # only the padding differs: none, or more of it, with other ids under the mask
    alone = p(features[1:], ids[1:, :3], torch.ones(1, 3, dtype=torch.long))
    padded = p(features[1:], torch.tensor([[2, 10, 3, 50, 60, 70, 80]]), torch.tensor([[1, 1, 1, 0, 0, 0, 0]]))
    torch.testing.assert_close(alone, out[1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(padded, out[1:], rtol=0, atol=1e-6)
    # and the image still matters
    assert (p(torch.randn(2, 9, 24), ids, (ids != 0).long()) - out).abs().max() > 1e-3


def test_only_the_queries_see_the_image():
    """The text slice of the Q-Former's output never reads the image features (no cross-attention): with one layer,
    the text positions are the same for any image; the queries are not."""
    p = projector(num_hidden_layers=1)
    ids = torch.tensor([[2, 10, 11, 3]])
    queries = p.query_tokens
    hidden = [p.qformer(queries, p.vision_layernorm(torch.randn(1, 9, 24)), ids, torch.ones_like(ids))
              for _ in range(2)]
    torch.testing.assert_close(hidden[0][:, 4:], hidden[1][:, 4:])
    assert (hidden[0][:, :4] - hidden[1][:, :4]).abs().max() > 1e-3


def test_config_errors_name_the_setting():
    with pytest.raises(data.UserError, match="qformer: unknown Q-Former setting.*num_layers"):
        QFormerConfig.from_dict({"num_layers": 2})
    with pytest.raises(data.UserError, match="hidden_size 30 is not a multiple of num_attention_heads 4"):
        QFormerConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(data.UserError, match="qformer_tokenizer"):
        LlavaConfig(projector_type="qformer")


def test_the_instruction_is_the_turn_with_the_image(llama_tok):
    bert = bert_tokenizer()
    fmt = data.ChatFormat(llama_tok, "vicuna_v1", image_tokens=4, instruction_tokenizer=bert, instruction_length=6)
    messages = [{"role": "user", "content": "<image>\nWhat color is the circle?"},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And the square?"}]
    [ids] = fmt.instructions(messages)
    assert bert.convert_ids_to_tokens(ids) == ["[CLS]", "is", "the", "circle", "?", "[SEP]"]  # cut from the left
    assert data.ChatFormat(llama_tok, "vicuna_v1", 4).instructions(messages) == []  # LLaVA's projectors: nothing
    batch = data.pad_instructions([[2, 5, 3], [2, 3]])
    assert batch["instruction_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["instruction_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.fixture(scope="module")
def qformer_run(world, tmp_path_factory):
    """A short stage-2 run with the qformer projector on the small toy world (LLM frozen, as InstructBLIP)."""
    root = tmp_path_factory.mktemp("qformer")
    texts = [t["value"] for s in json.load(open(world["root"] / "conversations.json")) for t in s["conversations"]]
    bert_tokenizer(extra=texts).save_pretrained(root / "bert")
    out = root / "run"
    sizes = json.dumps({k: v for k, v in SIZES.items() if k != "vocab_size"} | {"vocab_size": 400})
    state = run(world, out, projector_type="qformer", qformer=sizes, qformer_tokenizer=str(root / "bert"),
                train_llm=False, max_steps=3, lr=1e-3)
    return out, state


def test_a_qformer_run_trains_the_projector_saves_its_tokenizer_and_answers(qformer_run, world):
    out, state = qformer_run
    assert (out / "qformer_tokenizer" / "tokenizer.json").exists()
    saved = json.load(open(out / "config.json"))
    assert saved["projector_type"] == "qformer" and saved["qformer"]["num_query_tokens"] == 4
    assert saved["qformer"]["max_text_length"] == 128  # every size is written, defaults too
    model, fmt, processor = generate.load(str(out))
    assert model.num_image_tokens == 4 and fmt.instruction_tokenizer is not None
    # the trained weights, as the run ended
    for name, tensor in model.state_dict().items():
        if name.startswith("multi_modal_projector."):
            torch.testing.assert_close(tensor, state[name])
    image = generate.prepare_images([str(world["root"] / "images" / "00000.png")], processor, "pad")
    question = [{"role": "user", "content": "<image>\nWhat shape is on the left?"}]
    [text] = generate.answer(model, fmt, [question], image, max_new_tokens=4)
    assert isinstance(text, str)
    # the answer depends on the instruction the Q-Former reads: its logits do
    ids = torch.tensor([fmt.prompt(question)])
    logits = [model(ids, pixel_values=image, **data.pad_instructions(fmt.instructions(
        [{"role": "user", "content": f"<image>\n{q}"}]))) for q in ("What shape is on the left?", "How many?")]
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_a_qformer_checkpoint_reloads_to_the_same_logits(qformer_run, world):
    out, _ = qformer_run
    a, b = checkpoints.load(str(out)).eval(), checkpoints.load(str(out)).eval()
    assert isinstance(a, LlavaModel) and isinstance(a.multi_modal_projector, QFormerProjector)
    ids = torch.tensor([[1, 5, 6] + [data.IMAGE_TOKEN_INDEX] * 4 + [7, 8]])
    image, q = torch.randn(1, 3, 48, 48), torch.tensor([[2, 10, 3]])
    torch.testing.assert_close(a(ids, pixel_values=image, instruction_ids=q, instruction_mask=torch.ones_like(q)),
                               b(ids, pixel_values=image, instruction_ids=q, instruction_mask=torch.ones_like(q)))


def test_generate_and_evaluate_command_lines_run_a_qformer_model(qformer_run, world, tmp_path, capsys):
    """The command lines a user runs, over the trained qformer model: each question reaches the Q-Former."""
    import evaluate

    out, _ = qformer_run
    image = str(world["root"] / "images" / "00000.png")
    generate.main(["--model", str(out), "--image", image, "--temperature", "0", "--max-new-tokens", "3",
                   "What color is the shape on the left?"])
    assert capsys.readouterr().out.strip() != ""
    answers = tmp_path / "answers.jsonl"
    evaluate.main(["run", "--model", str(out), "--questions", str(world["root"] / "test.jsonl"), "--image-folder",
                   str(world["root"] / "images"), "--answers", str(answers), "--max-new-tokens", "3"])
    rows = [json.loads(line) for line in open(answers)]
    assert len(rows) == sum(1 for _ in open(world["root"] / "test.jsonl")) and all("text" in r for r in rows)


def test_evaluate_puts_each_question_into_instructblips_prompt(qformer_run, world, tmp_path, monkeypatch):
    """--prompt "Question: {} Short answer:": the text the model (and its Q-Former) is asked is the formatted one."""
    import evaluate

    out, _ = qformer_run
    asked = []
    answer = generate.answer
    monkeypatch.setattr(generate, "answer", lambda model, fmt, conversations, *a, **k: asked.extend(
        conversations) or answer(model, fmt, conversations, *a, **k))
    answers = tmp_path / "answers.jsonl"
    evaluate.main(["run", "--model", str(out), "--questions", str(world["root"] / "test.jsonl"), "--image-folder",
                   str(world["root"] / "images"), "--answers", str(answers), "--max-new-tokens", "2",
                   "--prompt", "Question: {} Short answer:"])
    first = json.loads(open(world["root"] / "test.jsonl").readline())
    assert asked[0][0]["content"] == f"<image>\nQuestion: {first['text']} Short answer:"
    assert json.loads(open(answers).readline())["prompt"] == f"Question: {first['text']} Short answer:"
    with pytest.raises(SystemExit):
        evaluate.main(["run", "--model", str(out), "--questions", str(world["root"] / "test.jsonl"),
                       "--answers", str(tmp_path / "b.jsonl"), "--prompt", "no placeholder"])
