"""open_clip <-> Hugging Face CLIP layouts: the converters, and merges that do not depend on them.

The papers' results are defined on open_clip's layout (fused q/k/v, `visual.proj` as [W, D]).
A Hugging Face checkpoint merged with `fuse_qkv=True` must give exactly the open_clip twin's
result on every key and for every method, Iso-CTS included (it is not transpose-equivariant, so
HF's `visual_projection.weight` has to be merged turned into open_clip's orientation).
Nothing is downloaded: the models are small random `CLIPVisionModelWithProjection`s.
"""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.io import TensorSpec, open_checkpoint
from pipeline.io.layout import (CORRESPONDENCES, hf_to_open_clip, open_clip_to_hf,
                                         table_keys)
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.errors import InputError
from pipeline.methods import get_method
from pipeline.bench.examples import finetune_like
from pipeline.engine.plan import build_units, unit_outputs
from pipeline.engine.expand import expand_task

transformers = pytest.importorskip("transformers")

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, projection_dim=48, hidden_act="quick_gelu")
NUM_TASKS = 3
# method -> (alpha, params), as in tests/test_engine.py.
METHODS = {
    "average": (None, {}),
    "task_arithmetic": (0.4, {}),
    "ties": (0.5, {"k": 30}),
    "tsv_m": (1.0, {}),
    "iso_c": (1.2, {}),
    "iso_cts": (1.1, {"common_space_fraction": 0.8}),
}
TOLERANCE = 1e-5


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]
                    ) -> dict[str, float]:
    """Per-key relative Frobenius error (absolute where the reference is zero)."""
    assert sorted(got) == sorted(want)
    errors = {}
    for key, reference in want.items():
        assert got[key].shape == reference.shape, key
        diff = (got[key].double() - reference.double()).norm().item()
        scale = reference.double().norm().item()
        errors[key] = diff / scale if scale > 0 else diff
    return errors


def read_all(location: str) -> dict[str, torch.Tensor]:
    with open_checkpoint(location) as ckpt:
        return {k: ckpt.read(k) for k in ckpt.keys()}


def vision_config():
    return transformers.CLIPVisionConfig(**CONFIG)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Base + 3 fine-tunes, each saved twice: HF sharded by transformers, and open_clip
    (the papers' `model.visual.` keys) through `hf_to_open_clip`."""
    torch.manual_seed(0)
    base = transformers.CLIPVisionModelWithProjection(vision_config()).eval()
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    states = [base_state]
    for seed in range(1, NUM_TASKS + 1):
        tuned = finetune_like(base_state, seed)  # low-rank + noise on every matrix
        g = torch.Generator().manual_seed(100 + seed)  # norms start at exactly 1 and 0
        states.append({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tuned.items()})
    root = tmp_path_factory.mktemp("layouts")
    hf, open_clip = [], []
    for i, state in enumerate(states):
        model = transformers.CLIPVisionModelWithProjection(vision_config())
        model.load_state_dict(state)
        model.save_pretrained(root / f"hf{i}", max_shard_size="100KB")
        hf.append(str(root / f"hf{i}"))
        torch.save(hf_to_open_clip(state, model_prefix="model."), root / f"open_clip{i}.pt")
        open_clip.append(str(root / f"open_clip{i}.pt"))
    assert os.path.exists(os.path.join(hf[0], "model.safetensors.index.json"))
    return {"hf": hf, "open_clip": open_clip, "states": states}


def merge(paths: list[str], out, method: str, **options) -> str:
    alpha, params = METHODS.get(method, (None, {}))
    run_merge(MergeConfig(base=paths[0], finetuned=paths[1:], method=method, alpha=alpha,
                          params=params, out=str(out), engine="local", **options))
    return str(out)


# -- the converters ----------------------------------------------------------------------------
def test_round_trip_is_exact_and_key_sets_follow_the_table(twins):
    hf = twins["states"][1]
    open_clip = hf_to_open_clip(hf)
    assert list(open_clip) and sorted(open_clip) == sorted(table_keys("open_clip", 2))
    assert sorted(hf) == sorted(table_keys("hf", 2))
    assert open_clip["visual.proj"].shape == (64, 48)
    assert open_clip["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (192, 64)
    assert open_clip["visual.transformer.resblocks.1.attn.in_proj_bias"].shape == (192,)
    back = open_clip_to_hf(open_clip)
    assert sorted(back) == sorted(hf)
    for key, tensor in hf.items():
        assert torch.equal(back[key], tensor), key
    papers = hf_to_open_clip(hf, model_prefix="model.")
    assert sorted(papers) == sorted(f"model.{k}" for k in open_clip)
    assert all(torch.equal(open_clip_to_hf(papers)[k], t) for k, t in hf.items())
    assert {row.op for row in CORRESPONDENCES} == {"rename", "fuse", "transpose"}


def test_text_keys_are_dropped_and_unprefixed_hf_keys_are_accepted(twins):
    hf = twins["states"][0]
    papers = hf_to_open_clip(hf, model_prefix="model.")
    with_text = {**papers, "model.token_embedding.weight": torch.zeros(10, 8),
                 "model.positional_embedding": torch.zeros(7, 8), "model.logit_scale":
                 torch.tensor(4.6), "model.text_projection": torch.zeros(8, 48),
                 "model.ln_final.weight": torch.ones(8),
                 "model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(24, 8)}
    assert sorted(open_clip_to_hf(with_text)) == sorted(hf)
    clip_model = {**hf, "text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
                  "text_projection.weight": torch.zeros(48, 8), "logit_scale": torch.tensor(4.6)}
    assert sorted(hf_to_open_clip(clip_model)) == sorted(hf_to_open_clip(hf))
    # transformers 5.x saves a bare CLIPVisionModel without the `vision_model.` prefix.
    bare = {k.removeprefix("vision_model."): v for k, v in hf.items()
            if k.startswith("vision_model.")}
    converted = hf_to_open_clip(bare)
    assert sorted(converted) == sorted(k for k in hf_to_open_clip(hf) if k != "visual.proj")
    assert sorted(open_clip_to_hf(converted, vision_prefix="")) == sorted(bare)


@pytest.mark.parametrize("convert,state,key", [
    (open_clip_to_hf, {"visual.bogus.weight": torch.zeros(2)}, "visual.bogus.weight"),
    (open_clip_to_hf, {"visual.transformer.resblocks.0.attn.qkv.weight": torch.zeros(6, 2)},
     "visual.transformer.resblocks.0.attn.qkv.weight"),
    (hf_to_open_clip, {"vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(2, 2)},
     "vision_model.encoder.layers.0.mlp.fc3.weight"),
    (hf_to_open_clip, {"vision_model.encoder.layers.0.self_attn.q_proj.weight":
                       torch.zeros(2, 2)}, "vision_model.encoder.layers.0.self_attn.k_proj"),
])
def test_unknown_or_incomplete_keys_are_input_errors_naming_the_key(convert, state, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        convert(state)


def test_planner_merges_the_hf_projection_in_open_clip_orientation(twins):
    with open_checkpoint(twins["hf"][0]) as ckpt:
        specs = ckpt.specs()
    units = {u.name: u for u in build_units(specs, fuse_qkv=True)}
    projection = units["visual_projection.weight"]
    assert projection.transposed and projection.shape == (64, 48)
    assert unit_outputs(projection, get_method("iso_cts"), "model", "F32", NUM_TASKS, True) == [
        ("visual_projection.weight", "F32", (48, 64))]
    assert not any(u.transposed for name, u in units.items() if name != projection.name)
    open_clip_units = build_units({"visual.proj": TensorSpec("F32", (64, 48))})
    assert not open_clip_units[0].transposed


# -- merges: HF with fuse_qkv=True gives the open_clip result --------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_hf_merges_exactly_like_its_open_clip_twin(twins, method, tmp_path):
    hf = read_all(merge(twins["hf"], tmp_path / "hf", method, fuse_qkv=True,
                        output="task_vector"))
    open_clip = read_all(merge(twins["open_clip"], tmp_path / "oc", method,
                               output="task_vector"))
    errors = relative_errors(hf, open_clip_to_hf(open_clip))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, (method, worst, errors[worst])


def test_tsv_c_artefacts_expand_to_the_same_task_model(twins, tmp_path):
    expanded = {}
    for layout, options in [("hf", {"fuse_qkv": True}), ("open_clip", {})]:
        artefact = merge(twins[layout], tmp_path / f"{layout}-art", "tsv_c", **options)
        expanded[layout] = read_all(expand_task(artefact, twins[layout][0], 0,
                                                str(tmp_path / f"{layout}-task0")))
    errors = relative_errors(expanded["hf"], open_clip_to_hf(expanded["open_clip"]))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, (worst, errors[worst])
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf-task0")
    assert torch.equal(model.state_dict()["visual_projection.weight"],
                       expanded["hf"]["visual_projection.weight"])


def test_merged_hf_model_reloads_in_transformers_and_matches_open_clip(twins, tmp_path):
    out = merge(twins["hf"], tmp_path / "hf", "iso_cts", fuse_qkv=True)
    model, info = transformers.CLIPVisionModelWithProjection.from_pretrained(
        out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged = read_all(out)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    state = model.state_dict()
    assert all(torch.equal(state[k], t) for k, t in merged.items())
    open_clip = read_all(merge(twins["open_clip"], tmp_path / "oc", "iso_cts"))
    errors = relative_errors(merged, open_clip_to_hf(open_clip))
    assert max(errors.values()) <= TOLERANCE
    with torch.inference_mode():
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(model.eval()(pixel_values=pixels).image_embeds).all()
