"""Checkpoints and backbones that are missing, moved, rebuilt, cut or damaged: a UserError naming the file and what to
do, never a raw traceback, a wait for the network, or a model that silently loads other weights."""

import json
import os
import shutil

import pytest
import torch
from hf_reference import mixed_batch
from safetensors.torch import load_file, save_file
from tools.tiny import save_tiny_backbones

import checkpoints
import model as model_py
from data import UserError
from model import LlavaConfig, LlavaModel, Projector, reading, resolve

STAGE_1, STAGE_2 = ("multi_modal_projector",), ("multi_modal_projector", "language_model")


def logits_of(model):
    input_ids, attention_mask, _, pixel_values = mixed_batch(model.num_image_tokens)
    with torch.no_grad():
        return model.eval()(input_ids, attention_mask, pixel_values)


def tiny_model(root, seed=0, **config):
    vision, llm = save_tiny_backbones(str(root), seed=seed)
    torch.manual_seed(seed)
    return LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm, **config))


def edit_json(file, change):
    with open(file) as f:
        obj = json.load(f)
    change(obj)
    with open(file, "w") as f:
        json.dump(obj, f)


# ----------------------------------------------------------------------------------------------------------------------
# Item 1: a checkpoint finds exactly the backbones it was trained with


def test_backbone_paths_are_saved_absolute_with_a_fingerprint_and_load_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_tiny_backbones("world")
    model = LlavaModel.from_config(LlavaConfig(vision_tower="world/vision", llm="world/llm"))
    checkpoints.save(model, "stage1", modules=STAGE_1)
    checkpoints.save(model, "stage2", modules=STAGE_2)  # stage 2 holds the LLM: only the tower is referenced
    assert set(json.loads((tmp_path / "stage2" / "config.json").read_text())["backbones"]) == {"vision_tower"}
    saved = json.loads((tmp_path / "stage1" / "config.json").read_text())
    world = tmp_path / "world"
    assert (saved["vision_tower"], saved["llm"]) == (str(world / "vision"), str(world / "llm"))
    assert set(saved["backbones"]) == {"vision_tower", "llm"}  # stage 1 holds neither
    assert set(saved["backbones"]["vision_tower"]["fingerprint"]) == {"config.json", "model.safetensors"}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for stage in ("stage1", "stage2"):
        assert torch.equal(logits_of(checkpoints.load(str(tmp_path / stage))), logits_of(model))


def test_a_backbone_rebuilt_with_another_seed_is_refused_and_a_moved_one_can_be_pointed_at(tmp_path):
    model = tiny_model(tmp_path / "world", seed=0)
    checkpoints.save(model, tmp_path / "ckpt", modules=STAGE_2)
    shutil.copytree(tmp_path / "world" / "vision", tmp_path / "kept")
    save_tiny_backbones(str(tmp_path / "world"), seed=1)  # the same shapes, new random weights
    with pytest.raises(UserError, match=r"ckpt was trained with the vision tower at .*world/vision \(fingerprint "
                                        r"\w+\); the files there now differ \(model.safetensors differs; fingerprint"):
        checkpoints.load(str(tmp_path / "ckpt"))
    edit_json(tmp_path / "ckpt" / "config.json", lambda c: c.update(vision_tower=str(tmp_path / "kept")))
    assert torch.equal(logits_of(checkpoints.load(str(tmp_path / "ckpt"))), logits_of(model))


def test_a_backbone_that_is_gone_is_named(tmp_path):
    model = tiny_model(tmp_path / "world")
    checkpoints.save(model, tmp_path / "ckpt", modules=STAGE_2)
    shutil.rmtree(tmp_path / "world" / "vision")
    with pytest.raises(UserError, match=r"ckpt was trained with the vision tower at .*world/vision, which is not there "
                                        r"now: restore it, or write where it is now into .*config.json"):
        checkpoints.load(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("relative", ["runs/toy/world/vision", "world/vision"])  # the second looks like a hub id
def test_an_old_checkpoint_loads_and_its_relative_path_that_is_not_there_is_explained(tmp_path, monkeypatch, relative):
    """Checkpoints saved before fingerprints: an absolute path loads as it did; a relative path (relative to where
    its training ran, unknown now) that is not a directory from here says so."""
    model = tiny_model(tmp_path / "world")
    checkpoints.save(model, tmp_path / "ckpt", modules=STAGE_2)
    edit_json(tmp_path / "ckpt" / "config.json", lambda c: c.pop("backbones"))
    assert torch.equal(logits_of(checkpoints.load(str(tmp_path / "ckpt"))), logits_of(model))
    edit_json(tmp_path / "ckpt" / "config.json", lambda c: c.update(vision_tower=relative))
    monkeypatch.chdir(tmp_path / "ckpt")
    with pytest.raises(UserError, match=r"relative to the directory its training ran in: run from there, or write the "
                                        r"vision tower's absolute path into .*ckpt/config.json"):
        checkpoints.load(str(tmp_path / "ckpt"))


def fake_hub_snapshot(cache, repo, commit, files_from):
    """huggingface_hub's cache layout for one commit of `repo`, refs/main pointing at it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files_from, folder / "snapshots" / commit)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def test_a_hub_backbone_is_taken_at_the_commit_it_was_trained_with(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_py, "_snapshots", {})
    vision, llm = save_tiny_backbones(str(tmp_path / "v1"), seed=0)
    first, second = "a" * 40, "b" * 40
    fake_hub_snapshot(tmp_path / "cache", "tiny/clip", first, vision)
    model = LlavaModel.from_config(LlavaConfig(vision_tower="tiny/clip", llm=llm))
    checkpoints.save(model, tmp_path / "ckpt", modules=STAGE_2)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["vision_tower"] == "tiny/clip" and saved["backbones"]["vision_tower"]["revision"] == first
    fake_hub_snapshot(tmp_path / "cache", "tiny/clip", second, save_tiny_backbones(str(tmp_path / "v2"), seed=1)[0])
    monkeypatch.setattr(model_py, "_snapshots", {})  # (another process, after the repo moved on)
    assert torch.equal(logits_of(checkpoints.load(str(tmp_path / "ckpt"))), logits_of(model))
    shutil.rmtree(tmp_path / "cache" / "models--tiny--clip" / "snapshots" / first)
    monkeypatch.setattr(model_py, "_snapshots", {})
    with pytest.raises(UserError, match=f"tiny/clip is not a directory here, and as a hub repo id it is not in the "
                                        f"local hub cache at revision {first} and the hub cannot be reached"):
        checkpoints.load(str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------------------------------------------------
# Item 2: a path that is not there


def test_a_path_that_is_not_there_is_a_user_error_saying_so(tmp_path, backbones):
    vision, llm = backbones
    for path in (str(tmp_path / "nope"), "runs/no-such-world/vision", "./no-such-vision", ""):
        with pytest.raises(UserError, match="is not a directory here, and not a hub repo id \\(owner/name\\)"):
            resolve(path)
    with pytest.raises(UserError, match="nobody/nothing is not a directory here, and as a hub repo id it is not in "
                                        "the local hub cache and the hub cannot be reached \\(HF_HUB_OFFLINE=1\\); "
                                        "download it first"):
        resolve("nobody/nothing")
    with pytest.raises(UserError, match="config.json is a file, not a directory"):
        resolve(os.path.join(vision, "config.json"))
    for empty in (False, True):  # every way a backbone is loaded goes through resolve
        with pytest.raises(UserError, match=f"{tmp_path}/tower is not a directory here"):
            LlavaModel.from_config(LlavaConfig(vision_tower=str(tmp_path / "tower"), llm=llm), empty=empty)
        with pytest.raises(UserError, match="no/llm is not a directory here"):
            LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm="no/llm"), empty=empty)
    with pytest.raises(UserError, match="is not a directory here"):
        checkpoints.load(str(tmp_path / "checkpoint"))
    for empty in (False, True):  # each backbone where the other should be
        with pytest.raises(UserError, match=f"vision tower {llm}: a llama model, not a vision model"):
            LlavaModel.from_config(LlavaConfig(vision_tower=llm, llm=llm), empty=empty)
        with pytest.raises(UserError, match=f"LLM {vision}: its files cannot be read \\(ValueError: Unrecognized"):
            LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=vision), empty=empty)


# ----------------------------------------------------------------------------------------------------------------------
# Items 3 and 6: cut or malformed files


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A full checkpoint of ours (every module), sharded, on the tiny backbones."""
    root = tmp_path_factory.mktemp("saved")
    model = tiny_model(root)
    checkpoints.save(model, root / "full", max_shard_bytes=40_000)
    return root / "full", model


@pytest.fixture
def damaged(saved_model, tmp_path):
    """A copy of the saved checkpoint to damage."""
    shutil.copytree(saved_model[0], tmp_path / "ckpt")
    return tmp_path / "ckpt"


CONFIG_DAMAGE = {  # name: (what config.json becomes, given its text, and the error)
    "cut": (lambda text: text[:len(text) // 2], r"config.json: not readable JSON \(.*\): the file is cut short"),
    "not JSON": (lambda text: "<html>", "config.json: not readable JSON"),
    "not UTF-8": (lambda text: "\udcff", "config.json: not readable JSON"),
    "a list": (lambda text: "[1, 2]", "config.json: a JSON list, not an object"),
    "projector_type 5": ({"projector_type": 5}, "config.json: projector_type 5: not a string"),
    "vision_feature_layer 'x'": ({"vision_feature_layer": "x"}, "config.json: vision_feature_layer 'x': not an int"),
    "vision_feature_layer true": ({"vision_feature_layer": True}, "vision_feature_layer True: not an integer"),
    "vision_feature_layer 99": ({"vision_feature_layer": 99}, "config.json: vision_feature_layer 99: .* has 3 layers"),
    "template": ({"template": "alpaca"}, "config.json: template 'alpaca': not one of plain, vicuna_v1"),
    "projector_type mlp9999x_gelu": ({"projector_type": "mlp9999x_gelu"}, "unknown projector type 'mlp9999x_gelu'"),
    "text_config []": ({"text_config": []}, "config.json: text_config is not a model config"),
    "unknown model_type": ({"vision_config": {"model_type": "no_such_model"}},
                           r"checkpoint .*ckpt: its files cannot be read \(ValueError: .*no_such_model"),
    "a width changed": ({"text_config": "hidden_size=64"}, r"ckpt: tensor \S+ is \(.*48.*\) torch.float32 in the "
                        r"weight files but \(.*64.*\) torch.float32 in the model its config.json describes"),
    "a field missing": ({"vision_tower": None}, "config.json lacks vision_tower, which checkpoints.save writes"),
    "backbones damaged": ({"backbones": {"vision_tower": "abc"}}, "config.json: backbones is not what"),
    "a revision escaping": ({"backbones": {"vision_tower": {"fingerprint": {}, "revision": "../../x"}}},
                            "config.json: backbones is not what"),
    "another model's config": (lambda text: json.dumps({"model_type": "llama", "hidden_size": 8}),
                               r"config.json is a 'llama' model's config, in none of the layouts this project reads: "
                               r"ours \(checkpoints.save.*the original LLaVA's .*transformers' Llava"),
}


@pytest.mark.parametrize("name", CONFIG_DAMAGE)
def test_a_damaged_config_json_is_a_user_error_naming_it(damaged, name):
    change, error = CONFIG_DAMAGE[name]
    file = damaged / "config.json"
    if callable(change):
        file.write_text(change(file.read_text()), errors="surrogateescape")
    else:
        saved = json.loads(file.read_text())
        for key, value in change.items():
            if value is None:
                del saved[key]
            elif isinstance(value, str) and "=" in value and key.endswith("_config"):
                field, number = value.split("=")
                saved[key][field] = int(number)
            else:
                saved[key] = value
        file.write_text(json.dumps(saved))
    with pytest.raises(UserError, match=error):
        checkpoints.load(str(damaged))


def test_a_directory_without_config_json_names_the_layouts_read(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty holds no config.json, so it is no checkpoint in a layout this project "
                                        r"reads \(ours .*the original LLaVA's .*transformers' Llava"):
        checkpoints.load(str(tmp_path / "empty"))


def shards(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("model-"))


WEIGHT_DAMAGE = {  # name: (what is done to the checkpoint directory, the error)
    "a cut shard": (lambda d: (d / shards(d)[0]).write_bytes((d / shards(d)[0]).read_bytes()[:5000]),
                    r"model-00001-of-\d+.safetensors: not a readable safetensors file \(.*\): it is cut short"),
    "a shard of junk": (lambda d: (d / shards(d)[1]).write_bytes(b"\xff" * 100), "model-00002-of-.* not a readable"),
    "an empty shard": (lambda d: (d / shards(d)[1]).write_bytes(b""), "model-00002-of-.* not a readable"),
    "a missing shard": (lambda d: (d / shards(d)[-1]).unlink(), r"model.safetensors.index.json names model-(\d+)-of-"
                        r"\1.safetensors, which is not in .*ckpt \(1 of \d+ shards missing\): the download or copy"),
    "an index of junk": (lambda d: (d / "model.safetensors.index.json").write_text("{"),
                         "index.json: not readable JSON"),
    "an index escaping": (lambda d: edit_json(d / "model.safetensors.index.json", lambda i: i["weight_map"].update(
        {"x": "../../elsewhere.safetensors"})), "index.json: its weight_map is not a map of tensor names to shard"),
    "no weights": (lambda d: [(d / f).unlink() for f in shards(d) + ["model.safetensors.index.json"]],
                   "ckpt has no model.safetensors, pytorch_model.bin or their sharded index"),
}


@pytest.mark.parametrize("name", WEIGHT_DAMAGE)
def test_damaged_weight_files_are_a_user_error_naming_them(damaged, name):
    damage, error = WEIGHT_DAMAGE[name]
    damage(damaged)
    with pytest.raises(UserError, match=error):
        checkpoints.load(str(damaged))


def rewrite_tensors(folder, change):
    for f in shards(folder):
        state = load_file(folder / f)
        change(state)
        save_file(state, folder / f, {"format": "pt"})


def test_tensors_that_do_not_fit_the_config_are_named_with_their_shapes(damaged):
    rewrite_tensors(damaged, lambda s: s.update({k: torch.zeros(3, 5) for k in s if k.endswith("linear_2.weight")}))
    with pytest.raises(UserError, match=r"ckpt: tensor multi_modal_projector.linear_2.weight is \(3, 5\) torch.float32 "
                                        r"in the weight files but \(48, 48\) torch.float32 in the model"):
        checkpoints.load(str(damaged))


def test_a_float_tensor_stored_as_integers_is_refused(damaged):
    rewrite_tensors(damaged, lambda s: s.update({k: s[k].long() for k in s if k.endswith("linear_2.weight")}))
    with pytest.raises(UserError, match=r"linear_2.weight is \(48, 48\) torch.int64 in the weight files but"):
        checkpoints.load(str(damaged))


def test_tensors_the_model_lacks_or_needs_are_named(damaged, tmp_path):
    rewrite_tensors(damaged, lambda s: s.update({"language_model.extra.weight": torch.zeros(2)}
                                                if "multi_modal_projector.linear_1.bias" in s else {}))
    with pytest.raises(UserError, match=r"ckpt: the weight files hold tensors the model its config.json describes "
                                        r"does not have \(language_model.extra.weight; 1 in all\)"):
        checkpoints.load(str(damaged))
    rewrite_tensors(damaged, lambda s: [s.pop(k) for k in list(s) if k in (
        "language_model.extra.weight", "language_model.lm_head.weight")])
    with pytest.raises(UserError, match=r"ckpt: weights missing for language_model.lm_head.weight \(1 in all\)"):
        checkpoints.load(str(damaged))


def test_damaged_backbone_files_are_a_user_error_naming_the_backbone(tmp_path):
    vision, llm = save_tiny_backbones(str(tmp_path))
    tower, config = os.path.join(vision, "model.safetensors"), os.path.join(vision, "config.json")
    with open(tower, "rb") as f:
        data = f.read()
    with open(tower, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(UserError, match=f"vision tower {vision}: its files cannot be read \\(SafetensorError: .*\\); "
                                        "is it complete"):
        LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm))
    with open(tower, "wb") as f:
        f.write(data)
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:
        f.write(text[:len(text) // 2])
    with pytest.raises(UserError, match=f"vision tower {vision}: its files cannot be read"):
        LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm), empty=True)
    with open(config, "w") as f:
        f.write(text)
    edit_json(os.path.join(llm, "config.json"), lambda c: c.update(hidden_size=64))
    with pytest.raises(UserError, match=r"LLM .*llm: tensor \S+ has shape \(\d+, 48\) in the weight files but \(\d+, "
                                        r"64\) in the model its config.json describes"):
        LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm))


def test_a_corrupt_tokenizer_file_is_a_user_error_naming_its_directory(tmp_path, llama_tok):
    from transformers import AutoTokenizer

    llama_tok.save_pretrained(tmp_path / "tok")
    text = (tmp_path / "tok" / "tokenizer.json").read_text()
    (tmp_path / "tok" / "tokenizer.json").write_text(text[:len(text) // 2])
    with pytest.raises(UserError, match=r"tokenizer .*tok: its files cannot be read \(JSONDecodeError"):
        with reading(str(tmp_path / "tok"), "tokenizer"):
            AutoTokenizer.from_pretrained(tmp_path / "tok")


# ----------------------------------------------------------------------------------------------------------------------
# Item 4: --init-from with a projector of another type or width


def test_a_projector_of_another_type_or_width_is_refused_saying_which(tmp_path):
    model = tiny_model(tmp_path / "world")
    checkpoints.save(model, tmp_path / "stage1", modules=STAGE_1)
    stage1 = str(tmp_path / "stage1")
    assert checkpoints.projector_weights(stage1, expected=model.multi_modal_projector).keys() == \
        model.multi_modal_projector.state_dict().keys()
    with pytest.raises(UserError, match=r"stage1 holds a mlp2x_gelu projector \(linear_1 32→48, linear_2 48→48\); "
                                        r"this model's projector type is linear \(linear_1 32→48\): pass "
                                        r"--projector-type mlp2x_gelu"):
        checkpoints.projector_weights(stage1, expected=Projector("linear", 32, 48))
    with pytest.raises(UserError, match=r"stage1 holds a projector for another vision tower or LLM \(linear_1 32→48, "
                                        r"linear_2 48→48\); this model's is linear_1 32→64, linear_2 64→64: pass "
                                        r"the --vision-tower and --llm"):
        checkpoints.projector_weights(stage1, expected=Projector("mlp2x_gelu", 32, 64))
    odd = {"multi_modal_projector.linear_1.weight": torch.zeros(48, 32), "multi_modal_projector.linear_3.weight":
           torch.zeros(48, 48)}
    save_file(odd, tmp_path / "odd.safetensors")
    with pytest.raises(UserError, match=r"odd.safetensors holds projector weights of no type this project builds "
                                        r"\(linear_1.weight, linear_3.weight\)"):
        checkpoints.projector_weights(str(tmp_path / "odd.safetensors"), expected=model.multi_modal_projector)


def test_train_names_the_flags_of_a_projector_mismatch(tmp_path, backbones):
    import finetune
    import train

    vision, llm = backbones
    checkpoints.save(LlavaModel.from_config(LlavaConfig(vision_tower=vision, llm=llm)), tmp_path / "stage1",
                     modules=STAGE_1)
    cfg = train.TrainConfig(**{**finetune.STAGE_2, "vision_tower": vision, "llm": llm, "projector_type": "linear",
                               "init_from": str(tmp_path / "stage1"), "output_dir": str(tmp_path / "out"),
                               "data_path": str(tmp_path / "unused.json"), "global_batch_size": 1,
                               "micro_batch_size": 1})
    (tmp_path / "unused.json").write_text("[]")
    try:
        with pytest.raises(UserError, match=r"--init-from .*stage1 holds a mlp2x_gelu projector \(linear_1 32→48, "
                                            r"linear_2 48→48\); this model's projector type is linear"):
            train.train(cfg)
    finally:
        if train.dist.is_initialized():
            train.dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# Item 5: writes that survive a crash and a power cut


def test_atomic_write_flushes_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_ino)) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))
    target = tmp_path / "config.json"
    checkpoints.atomic_write(str(target), lambda tmp: checkpoints.write_json(tmp, {"a": 1}))
    assert events == [("fsync", target.stat().st_ino), ("replace", str(target)), ("fsync", tmp_path.stat().st_ino)]
    assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]


def test_a_save_cut_short_over_an_earlier_checkpoint_is_refused_not_loaded_mixed(saved_model, tmp_path, monkeypatch):
    """Saving unsharded over a sharded checkpoint, interrupted before config.json: the old config and shard index must
    not be left to be read with (or instead of) the new weights."""
    shutil.copytree(saved_model[0], tmp_path / "ckpt")
    write = checkpoints.atomic_write

    def crash_at_config(path, fn):
        if path.endswith("config.json"):
            raise KeyboardInterrupt
        write(path, fn)

    monkeypatch.setattr(checkpoints, "atomic_write", crash_at_config)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(tiny_model(tmp_path / "other", seed=3), tmp_path / "ckpt")
    monkeypatch.undo()
    assert "model.safetensors.index.json" not in os.listdir(tmp_path / "ckpt")
    with pytest.raises(UserError, match="ckpt holds no config.json, .*a save cut short leaves none: save it again"):
        checkpoints.load(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "model.safetensors.tmp99999").write_bytes(b"half")  # as a save killed mid-write leaves
    model = tiny_model(tmp_path / "other", seed=3)
    checkpoints.save(model, tmp_path / "ckpt")  # the save again, uninterrupted
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    assert torch.equal(logits_of(checkpoints.load(str(tmp_path / "ckpt"))), logits_of(model))
