"""The planner is pure: layer groups, output files and shards follow from the inputs alone."""

from __future__ import annotations

import pytest

from pipeline.io.layout import block_of, group_of, qkv_fusions
from pipeline.io.reader import TensorSpec
from pipeline.bench.examples import VIT_SHAPES, vit_shapes
from pipeline.methods import get_method
from pipeline.engine.plan import pack_shards, plan_files


def specs(layout="hf", shape="vit-b-32"):
    return {k: TensorSpec("F32", s) for k, s in vit_shapes(VIT_SHAPES[shape], layout).items()}


def test_block_keys_group_by_layer_and_the_rest_by_module():
    assert block_of("vision_model.encoder.layers.11.mlp.fc1.weight") == (
        "vision_model.encoder.layers.11", 11)
    assert group_of("visual.transformer.resblocks.3.attn.in_proj_weight") == \
        "visual.transformer.resblocks.3"
    assert group_of("vision_model.embeddings.class_embedding") == "vision_model"
    assert group_of("visual.proj") == "visual"
    assert group_of("logit_scale") == "logit_scale"


def test_qkv_fusion_finds_every_attention_triple():
    fused = qkv_fusions({k: s.shape for k, s in specs().items()})
    assert len(fused) == 12
    name, triple = next(iter(sorted(fused.items())))
    assert name.endswith("self_attn.in_proj_weight") and triple[0].endswith("q_proj.weight")


@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_one_file_per_layer_group_in_model_order(layout):
    files = plan_files(specs(layout), get_method("iso_cts"), 8, mode="model")
    assert len(files) == 12 + 1  # the blocks, then the stem and head of the tower together
    keys = [k for f in files for k, _, _ in f.layout]
    assert sorted(keys) == sorted(specs(layout)), "every key written exactly once"
    blocks = [block_of(f.layout[0][0]) for f in files if block_of(f.layout[0][0])]
    assert [b[1] for b in blocks] == list(range(12))


def test_max_file_bytes_splits_a_group_but_keeps_units_whole():
    files = plan_files(specs(), get_method("iso_c"), 8, mode="model", max_file_bytes=5 << 20)
    assert all(f.nbytes <= 5 << 20 or len(f.units) == 1 for f in files)
    assert len(files) > 13


def test_costs_follow_the_svd_work():
    iso_c = plan_files(specs(), get_method("iso_c"), 8, mode="model")
    iso_cts = plan_files(specs(), get_method("iso_cts"), 8, mode="model")
    average = plan_files(specs(), get_method("average"), 8, mode="model")
    block = 5  # a transformer block
    assert average[block].cost < iso_c[block].cost < iso_cts[block].cost


@pytest.mark.parametrize("num_shards", [1, 2, 3, 8, 100])
def test_lpt_packing_covers_every_file_once_and_balances(num_shards):
    files = plan_files(specs(), get_method("iso_cts"), 8, mode="model")
    shards = pack_shards(files, num_shards)
    names = sorted(f.name for s in shards for f in s.files)
    assert names == sorted(f.name for f in files)
    assert len(shards) == min(num_shards, len(files))
    costs = [s.cost for s in shards]
    assert costs == sorted(costs, reverse=True), "costliest shard starts first"
    lower_bound = max(sum(costs) / len(shards), max(f.cost for f in files))
    assert max(costs) <= 4 / 3 * lower_bound + 1e-9  # Graham's LPT bound


def test_output_layout_does_not_depend_on_worker_count():
    files = plan_files(specs(), get_method("tsv_m"), 8, mode="model")
    layouts = {tuple(sorted((f.name, f.layout) for s in pack_shards(files, n) for f in s.files))
               for n in (1, 2, 3, 8)}
    assert len(layouts) == 1


def test_compressed_layout_stores_k_m_n_plus_one_numbers_per_task():
    files = plan_files(specs(), get_method("tsv_c"), 8, mode="compressed")
    entries = {k: s for f in files for k, _, s in f.layout}
    u = entries["vision_model.encoder.layers.0.mlp.fc1.weight::U"]
    s = entries["vision_model.encoder.layers.0.mlp.fc1.weight::S"]
    vh = entries["vision_model.encoder.layers.0.mlp.fc1.weight::Vh"]
    assert u == (8, 3072, 96) and s == (8, 96) and vh == (8, 96, 768)
