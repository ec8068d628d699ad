"""Real CLIP architectures at small size: save, merge, reload into the architecture, run.

The q/k/v adapter is checked against the layout the papers' code merges: open_clip's fused
`in_proj_weight`. Nothing is downloaded; every model is built here from a config.
"""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.io import open_checkpoint, write_safetensors
from pipeline.engine.config import MergeConfig
from pipeline.engine.driver import run_merge
from pipeline.bench.examples import VIT_SHAPES, base_weights, finetune_like, vit_shapes

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, projection_dim=16)


def perturb(model, seed):
    """A 'fine-tuned' copy: low-rank + noise on every weight, as fine-tuning leaves it."""
    tuned = finetune_like({k: v.detach().clone() for k, v in model.state_dict().items()}, seed)
    g = torch.Generator().manual_seed(100 + seed)  # norms start at exactly 1 and 0: move them too
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tuned.items()}
    clone = type(model)(model.config)
    clone.load_state_dict(tuned)
    return clone


@pytest.fixture(scope="module", params=["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def hf_models(request, tmp_path_factory):
    """Base + 2 tasks saved by save_pretrained, single-file and sharded with an index."""
    torch.manual_seed(0)
    cls = getattr(transformers, request.param)
    base = cls(transformers.CLIPVisionConfig(**CONFIG)).eval()
    models = [base, perturb(base, 1), perturb(base, 2)]
    root = tmp_path_factory.mktemp(request.param)
    layouts = {}
    for layout, shard in [("single", "1GB"), ("sharded", "40KB")]:
        paths = []
        for i, model in enumerate(models):
            path = root / layout / f"m{i}"
            model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
            paths.append(str(path))
        layouts[layout] = paths
    assert os.path.exists(os.path.join(layouts["sharded"][0], "model.safetensors.index.json"))
    return cls, layouts


@pytest.mark.parametrize("method,alpha", [("iso_cts", 1.0), ("tsv_m", 1.0), ("ties", 0.5),
                                          ("average", None)])
def test_merge_reload_and_run(hf_models, method, alpha, tmp_path):
    cls, layouts = hf_models
    outputs = {}
    for layout, paths in layouts.items():
        out = tmp_path / layout
        run_merge(MergeConfig(base=paths[0], finetuned=paths[1:], method=method, alpha=alpha,
                              out=str(out), engine="local", fuse_qkv=True,
                              max_shard_size="30KB" if layout == "sharded" else "4GB"))
        model = cls.from_pretrained(out).eval()
        with torch.inference_mode():
            pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            result = model(pixel_values=pixels)
        first = result[0]
        assert torch.isfinite(first).all()
        outputs[layout] = model.state_dict()
    base = cls.from_pretrained(layouts["single"][0]).state_dict()
    changed = [k for k in base if not torch.equal(base[k], outputs["single"][k])]
    assert len(changed) > len(base) // 2, "the merge changed the weights"
    for key in base:  # same weights, whatever the files were split into
        assert torch.equal(outputs["single"][key], outputs["sharded"][key]), key


def to_open_clip_fused(state: dict) -> dict:
    """HF q/k/v -> one open_clip-style fused (3d x d) matrix per block."""
    fused = {}
    for key, value in state.items():
        if ".q_proj.weight" in key:
            prefix = key[: key.index(".q_proj.weight")]
            fused[f"{prefix}.in_proj_weight"] = torch.cat(
                [state[f"{prefix}.{p}_proj.weight"] for p in "qkv"])
        elif not any(f".{p}_proj.weight" in key for p in "kv"):
            fused[key] = value
    return fused


@pytest.mark.parametrize("method", ["iso_cts", "tsv_m", "iso_c"])
def test_fused_qkv_merges_like_the_open_clip_layout(hf_models, method, tmp_path):
    _, layouts = hf_models
    fused_paths = []
    for i, path in enumerate(layouts["single"]):
        with open_checkpoint(path) as ckpt:
            state = {k: ckpt.read(k) for k in ckpt.keys()}
        target = tmp_path / f"fused{i}.safetensors"
        write_safetensors(str(target), to_open_clip_fused(state))
        fused_paths.append(str(target))
    outs = {}
    for name, paths, fuse in [("adapter", layouts["single"], True),
                              ("open_clip", fused_paths, False),
                              ("split", layouts["single"], False)]:
        run_merge(MergeConfig(base=paths[0], finetuned=paths[1:], method=method, alpha=1.0,
                              out=str(tmp_path / name), engine="local", fuse_qkv=fuse))
        with open_checkpoint(str(tmp_path / name)) as ckpt:
            outs[name] = {k: ckpt.read(k) for k in ckpt.keys()}
    via_adapter = to_open_clip_fused(outs["adapter"])
    split = to_open_clip_fused(outs["split"])
    fused_keys = [k for k in via_adapter if k.endswith("in_proj_weight")]
    assert fused_keys
    for key in via_adapter:
        assert torch.equal(via_adapter[key], outs["open_clip"][key]), key
    assert any(not torch.allclose(split[k], via_adapter[k], atol=1e-6) for k in fused_keys), \
        "merging q, k, v separately must differ from the fused merge"


def test_open_clip_state_dicts_in_every_container_merge_identically(tmp_path):
    shapes = vit_shapes(VIT_SHAPES["tiny"], "open_clip")
    base = base_weights(shapes, seed=0)
    models = [base, finetune_like(base, 1), finetune_like(base, 2)]
    containers = {"safetensors": [], "pt": [], "training_pt": [], "uri": []}
    for i, weights in enumerate(models):
        st = tmp_path / f"m{i}.safetensors"
        write_safetensors(str(st), weights)
        containers["safetensors"].append(str(st))
        containers["uri"].append(f"file://{st}")
        torch.save(weights, tmp_path / f"m{i}.pt")
        containers["pt"].append(str(tmp_path / f"m{i}.pt"))
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in weights.items()}},
                   tmp_path / f"train{i}.pt")
        containers["training_pt"].append(str(tmp_path / f"train{i}.pt"))
    results = {}
    for name, paths in containers.items():
        run_merge(MergeConfig(base=paths[0], finetuned=paths[1:], method="iso_cts", alpha=1.0,
                              out=str(tmp_path / f"out-{name}"), engine="local"))
        with open_checkpoint(str(tmp_path / f"out-{name}")) as ckpt:
            results[name] = {k: ckpt.read(k) for k in ckpt.keys()}
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in results["pt"]
    for name, result in results.items():
        for key, tensor in results["safetensors"].items():
            assert torch.equal(result[key], tensor), (name, key)
