"""Every real CLIP vision layout users hold loads into `ClipVisionTower` and computes the
embeddings of the model it was saved from.

Real transformers models (small, seeded random weights) are saved the way users hold them:
`CLIPVisionModelWithProjection`, `CLIPVisionModel` (transformers 5 saves it unprefixed),
a full `CLIPModel`, open_clip state dicts (`visual.…` / the papers' `model.visual.…`, with
text keys) as .pt, .safetensors and as a merge-output directory without config.json. Nothing
is downloaded.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from pipeline.errors import InputError
from pipeline.io import storage
from pipeline.io.layout import hf_to_open_clip
from pipeline.models.loading import LoadedVision, canonical_tensors, load_vision
from pipeline.models.vit import ClipVisionTower, VisionConfig

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
              image_size=32, patch_size=8, projection_dim=48, hidden_act="quick_gelu")
# What the shapes of a VISION checkpoint say, with OpenAI CLIP's head width 64 (-> 1 head).
INFERRED = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=1, image_size=32, patch_size=8, projection_dim=48)
# A few open_clip text-tower / CLIP-level keys, as the papers' ImageEncoder checkpoints carry.
TEXT_KEYS = {"token_embedding.weight": (100, 32), "positional_embedding": (16, 32),
             "transformer.resblocks.0.attn.in_proj_weight": (96, 32),
             "ln_final.weight": (32,), "text_projection": (32, 48), "logit_scale": ()}


def randomized(model: Any, seed: int) -> Any:
    """Every parameter random (norms and biases too, so a mixed-up key cannot go unseen);
    sdpa attention, the kernel `ClipVisionTower` runs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def vision_config(**overrides) -> CLIPVisionConfig:
    fields: dict[str, Any] = {**VISION, **overrides, "attn_implementation": "sdpa"}
    return CLIPVisionConfig(**fields)


def embeddings(loaded: LoadedVision, pixels: torch.Tensor) -> torch.Tensor:
    tower = ClipVisionTower(loaded.config).eval()
    tower.load_state_dict(loaded.tensors, strict=True)
    with torch.no_grad():
        return tower.embed(pixels)


def text_keys(prefix: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {prefix + k: torch.randn(shape, generator=g) for k, shape in TEXT_KEYS.items()}


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pixels):
    """name -> (location, reference embeddings of the model it was saved from)."""
    root = tmp_path_factory.mktemp("checkpoints")
    out: dict[str, tuple[str, torch.Tensor]] = {}
    with torch.no_grad():
        proj = randomized(CLIPVisionModelWithProjection(vision_config()), 1)
        proj.save_pretrained(root / "hf")
        out["hf"] = (str(root / "hf"), proj(pixel_values=pixels).image_embeds)

        bare = randomized(CLIPVisionModel(vision_config()), 2)
        bare.save_pretrained(root / "bare")
        pooled = bare(pixel_values=pixels).pooler_output
        out["bare"] = (str(root / "bare"), pooled)
        # The same model with the `vision_model.` prefix (as transformers 4 saved it).
        (root / "bare-prefixed").mkdir()
        shutil.copy(root / "bare" / "config.json", root / "bare-prefixed" / "config.json")
        save_file({"vision_model." + k: v.contiguous() for k, v in bare.state_dict().items()},
                  str(root / "bare-prefixed" / "model.safetensors"))
        out["bare-prefixed"] = (str(root / "bare-prefixed"), pooled)

        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, vocab_size=100, max_position_embeddings=16,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1)
        vision = {k: v for k, v in vision_config().to_dict().items() if k != "projection_dim"}
        clip = randomized(CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision,
                                               projection_dim=48)), 3)
        clip.save_pretrained(root / "clip")
        features = clip.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # transformers 5: an output
        out["clip"] = (str(root / "clip"), features)

        heads2 = randomized(CLIPVisionModelWithProjection(vision_config(num_attention_heads=2)),
                            4)
        heads2.save_pretrained(root / "heads2")
        out["heads2"] = (str(root / "heads2"), heads2(pixel_values=pixels).image_embeds)
        save_file(hf_to_open_clip(heads2.state_dict()), str(root / "heads2-open_clip.safetensors"))
        out["heads2-open_clip"] = (str(root / "heads2-open_clip.safetensors"), out["heads2"][1])

        state = proj.state_dict()
        for prefix in ("", "model."):
            oc = {**hf_to_open_clip(state, prefix), **text_keys(prefix)}
            tag = f"open_clip-{prefix or 'bare'}"
            torch.save(oc, root / f"{tag}.pt")
            save_file(oc, str(root / f"{tag}.safetensors"))
            (root / f"{tag}-merged").mkdir()
            save_file(oc, str(root / f"{tag}-merged" / "model.safetensors"))
            for name in (f"{tag}.pt", f"{tag}.safetensors", f"{tag}-merged"):
                out[name] = (str(root / name), out["hf"][1])
    return out


CASES = [  # name, expected layout, expected config (None: the saved model's own)
    ("hf", "hf", INFERRED),
    ("bare", "hf-unprefixed+identity-projection", None),
    ("bare-prefixed", "hf+identity-projection", None),
    ("clip", "clip-model", INFERRED),
    ("heads2", "hf", VisionConfig(**{**INFERRED.__dict__, "num_attention_heads": 2})),
    ("open_clip-bare.pt", "open_clip", INFERRED),
    ("open_clip-bare.safetensors", "open_clip", INFERRED),
    ("open_clip-bare-merged", "open_clip", INFERRED),
    ("open_clip-model..pt", "open_clip-model-prefix", INFERRED),
    ("open_clip-model..safetensors", "open_clip-model-prefix", INFERRED),
    ("open_clip-model.-merged", "open_clip-model-prefix", INFERRED),
]


@pytest.mark.parametrize("name,layout,config", CASES, ids=[c[0] for c in CASES])
def test_every_layout_computes_the_saved_models_embeddings(saved, pixels, name, layout, config):
    location, reference = saved[name]
    loaded = load_vision(location)
    assert loaded.layout == layout
    expected = config or VisionConfig(**{**INFERRED.__dict__, "projection_dim": 64})
    assert loaded.config == expected
    assert all(t.dtype == torch.float32 for t in loaded.tensors.values())
    got = embeddings(loaded, pixels)
    assert got.shape == reference.shape
    # q/k/v splits and the projection's transpose are exact copies, the kernels are the same.
    assert torch.equal(got, reference), (got - reference).abs().max()


def test_bare_vision_model_gets_an_exact_identity_projection(saved):
    loaded = load_vision(saved["bare"][0])
    assert torch.equal(loaded.tensors["visual_projection.weight"], torch.eye(64))
    assert loaded.config.projection_dim == 64  # config.json's 48 describes no tensor


def test_heads_come_from_the_base_config_when_the_file_has_none(saved, pixels):
    location, reference = saved["heads2-open_clip"]
    inferred = load_vision(location)
    assert inferred.config.num_attention_heads == 1  # OpenAI head width 64
    assert not torch.equal(embeddings(inferred, pixels), reference)
    base = load_vision(saved["heads2"][0]).config
    loaded = load_vision(location, config=base)
    assert loaded.config == base
    assert torch.equal(embeddings(loaded, pixels), reference)


def test_same_tensors_whatever_the_container(saved):
    ref = load_vision(saved["hf"][0]).tensors
    for name in ("open_clip-bare.pt", "open_clip-model.-merged"):
        got = load_vision(saved[name][0]).tensors
        assert list(got) == list(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_object_store_uri(saved, s3_prefix, pixels):
    location, reference = saved["open_clip-model.-merged"]
    storage.copy_tree(location, s3_prefix)
    loaded = load_vision(s3_prefix)
    assert loaded.layout == "open_clip-model-prefix"
    assert torch.equal(embeddings(loaded, pixels), reference)


def test_dtype_is_kept(tmp_path):
    model = randomized(CLIPVisionModelWithProjection(vision_config()), 5).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    loaded = load_vision(str(tmp_path / "bf16"))
    state = model.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in loaded.tensors.values())
    assert all(torch.equal(loaded.tensors[k], state[k]) for k in loaded.tensors)


# -- canonical_tensors on partial dicts (task vectors) ---------------------------------------
@pytest.fixture(scope="module")
def two_states():
    a = randomized(CLIPVisionModelWithProjection(vision_config()), 10).state_dict()
    b = randomized(CLIPVisionModelWithProjection(vision_config()), 11).state_dict()
    return a, b


@pytest.mark.parametrize("prefix,layout",
                         [("", "open_clip"), ("model.", "open_clip-model-prefix")])
def test_open_clip_task_vector_subset(two_states, prefix, layout):
    a, b = two_states
    oc_a, oc_b = hf_to_open_clip(a, prefix), hf_to_open_clip(b, prefix)
    keep = [k for k in oc_a if ".resblocks.1." in k or k.endswith("visual.proj")]
    tau = {k: oc_a[k] - oc_b[k] for k in keep}
    tau.update(text_keys(prefix))
    got, found = canonical_tensors(tau, "tau.safetensors")
    assert found == layout
    # Independent reference: the Hugging Face task vector of the same block and projection.
    wanted = {k: a[k] - b[k] for k in a
              if ".layers.1." in k or k == "visual_projection.weight"}
    assert sorted(got) == sorted(wanted)
    for k in wanted:
        assert torch.equal(got[k], wanted[k]), k


def test_hf_subsets_are_prefixed_and_text_dropped(two_states):
    a, _ = two_states
    block = {k: v for k, v in a.items() if ".layers.0.self_attn." in k}
    unprefixed = {k[len("vision_model."):]: v for k, v in block.items()}
    got, layout = canonical_tensors(unprefixed, "x")
    assert layout == "hf-unprefixed"
    assert got.keys() == block.keys() and all(got[k] is block[k] for k in block)
    clip = {**block, "text_model.final_layer_norm.weight": torch.ones(4),
            "text_projection.weight": torch.ones(2, 4), "logit_scale": torch.tensor(1.0),
            "vision_model.embeddings.position_ids": torch.arange(3)}
    got, layout = canonical_tensors(clip, "x")
    assert layout == "clip-model" and got.keys() == block.keys()


# -- errors: one line, starting with the location, naming the key or field ------------------
def raised(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_random_non_clip_keys(tmp_path):
    (tmp_path / "junk").mkdir()
    save_file({"foo.weight": torch.ones(2), "bar.bias": torch.ones(2)},
              str(tmp_path / "junk" / "model.safetensors"))
    message = raised(load_vision, str(tmp_path / "junk"))
    assert message.startswith(str(tmp_path / "junk") + ":") and "'bar.bias'" in message


def test_unknown_key_among_clip_keys(saved, tmp_path):
    state = hf_to_open_clip(load_vision(saved["hf"][0]).tensors)
    state["visual.adapter.weight"] = torch.ones(2)
    path = str(tmp_path / "x.safetensors")
    save_file(state, path)
    message = raised(load_vision, path)
    assert message.startswith(path + ":") and "'visual.adapter.weight'" in message


def test_mixed_layouts(two_states):
    a, _ = two_states
    mixed = {**hf_to_open_clip(a),
             "vision_model.post_layernorm.bias": a["vision_model.post_layernorm.bias"]}
    message = raised(canonical_tensors, mixed, "s3://b/tau")
    assert message.startswith("s3://b/tau:") and "'vision_model.post_layernorm.bias'" in message


@pytest.mark.parametrize("source", ["open_clip-model..pt", "hf"])
def test_missing_block_key(saved, tmp_path, source):
    path = str(tmp_path / "ckpt.safetensors")
    if source == "hf":  # with config.json, a directory
        shutil.copytree(saved["hf"][0], tmp_path / "dir")
        path = str(tmp_path / "dir")
        state = load_vision(path).tensors
        del state["vision_model.encoder.layers.1.mlp.fc1.bias"]
        save_file(state, str(tmp_path / "dir" / "model.safetensors"))
    else:
        state = torch.load(saved[source][0], weights_only=True)
        del state["model.visual.transformer.resblocks.1.mlp.c_fc.bias"]
        save_file(state, path)
    message = raised(load_vision, path)
    assert message.startswith(path + ":")
    assert "'vision_model.encoder.layers.1.mlp.fc1.bias' is missing" in message


def test_last_block_missing_is_named_when_config_json_says_so(saved, tmp_path):
    shutil.copytree(saved["hf"][0], tmp_path / "dir")
    state = {k: v for k, v in load_vision(saved["hf"][0]).tensors.items()
             if ".layers.1." not in k}
    save_file(state, str(tmp_path / "dir" / "model.safetensors"))
    message = raised(load_vision, str(tmp_path / "dir"))
    first = next(n for n, _ in ClipVisionTower(INFERRED).named_parameters() if ".layers.1." in n)
    assert f"{first!r} is missing" in message


def test_architecture_mismatch_against_base(saved):
    wider = VisionConfig(**{**INFERRED.__dict__, "intermediate_size": 256})
    location = saved["open_clip-bare.safetensors"][0]
    message = raised(load_vision, location, config=wider)
    assert message.startswith(location + ":") and "intermediate_size is 128" in message
    # config.json's heads count, unlike inferred heads, must match the base too.
    location = saved["heads2"][0]
    message = raised(load_vision, location, config=INFERRED)
    assert message.startswith(location + ":") and "num_attention_heads is 2" in message
    # a vision model without projection is not the base's architecture either.
    location = saved["bare"][0]
    message = raised(load_vision, location, config=INFERRED)
    assert "projection_dim is 64" in message


def test_config_json_contradicting_the_tensors(saved, tmp_path):
    shutil.copytree(saved["hf"][0], tmp_path / "dir")
    config_path = tmp_path / "dir" / "config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, "projection_dim": 32}))
    message = raised(load_vision, str(tmp_path / "dir"))
    assert message.startswith(str(config_path) + ":") and "projection_dim is 32" in message
    config_path.write_text(json.dumps({**raw, "intermediate_size": 96}))
    message = raised(load_vision, str(tmp_path / "dir"))
    assert message.startswith(str(config_path) + ":")
    assert "intermediate_size is 96, but the tensors have 128" in message


def test_bogus_block_index_is_a_missing_key_not_a_huge_model(saved, tmp_path):
    state = dict(load_vision(saved["hf"][0]).tensors)
    state["vision_model.encoder.layers.99999999.layer_norm1.bias"] = torch.ones(64)
    path = str(tmp_path / "x.safetensors")
    save_file(state, path)
    message = raised(load_vision, path)
    first = next(n for n, _ in ClipVisionTower(INFERRED).named_parameters() if ".layers.0." in n)
    assert message.startswith(path + ":")
    assert f"{first.replace('.0.', '.2.')!r} is missing" in message
